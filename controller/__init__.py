"""Controller: the front door. Functions, invocations and activations in the database,
dispatch to invokers, the OpenAI-compatible and Knative-compatible HTTP surfaces.

ControllerConfig.from_env(env)  configuration (SLLM_* variables, flags override)
Controller(config, db)          the operations (stateless between requests: all state in the db)
create_app(controller)          the Flask app
serve(config)                   gunicorn: several workers sharing the database
"""

from ._app import create_app
from ._auth import Principal, new_key
from ._config import ControllerConfig, FunctionDefaults
from ._scheduler import Candidate, LocalityScheduler, Scheduler
from ._server import serve
from ._service import Controller

__all__ = [
    "Candidate",
    "Controller",
    "ControllerConfig",
    "FunctionDefaults",
    "LocalityScheduler",
    "Principal",
    "Scheduler",
    "create_app",
    "new_key",
    "serve",
]
