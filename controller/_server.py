"""Running the controller under gunicorn: several workers, threads, one database.

The master migrates the database once before forking; each worker builds its
own Controller (connection pools, background threads) after the fork.
Prometheus counters of all workers are aggregated through a shared folder.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from gunicorn.app.base import BaseApplication

from sllm.core.listen import bound_port, publish_port

from ._config import ControllerConfig

log = logging.getLogger("sllm.controller")


class ControllerServer(BaseApplication):
    """A gunicorn application serving the controller's Flask app from gthread workers."""

    def __init__(self, config: ControllerConfig) -> None:
        self.controller_config = config
        super().__init__()

    def load_config(self) -> None:
        """gunicorn settings from the controller config."""
        c = self.controller_config
        settings: dict[str, Any] = {
            "bind": f"{c.host}:{c.port}",
            "workers": c.workers,
            "worker_class": "gthread",
            "threads": c.threads,
            "timeout": 120,
            "graceful_timeout": 10,
            "keepalive": 30,
            "proc_name": f"sllm-controller-{c.port}",
            "loglevel": "info",
            "control_socket_disable": True,
            "on_starting": self._on_starting,
            "when_ready": self._when_ready,
            "child_exit": _child_exit,
        }
        for key, value in settings.items():
            if key in self.cfg.settings:
                self.cfg.set(key, value)

    def _on_starting(self, _arbiter: Any) -> None:
        from sllm.db import Database

        if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="sllm-metrics-")
        db = Database(self.controller_config.database_url)
        try:
            db.upgrade()
        finally:
            db.dispose()

    def _when_ready(self, arbiter: Any) -> None:
        if self.controller_config.port_file:  # listening now, so port 0 has become a real one
            publish_port(self.controller_config.port_file, bound_port(arbiter))

    def load(self) -> Any:
        """Build the controller and its Flask app (in the worker)."""
        from sllm.db import Database

        from ._app import create_app
        from ._service import Controller

        controller = Controller(
            self.controller_config, Database(self.controller_config.database_url)
        )
        controller.start()
        return create_app(controller)


def _child_exit(_server: Any, worker: Any) -> None:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def serve(config: ControllerConfig) -> None:
    """Run the controller until SIGTERM / SIGINT."""
    config.validate()
    ControllerServer(config).run()
