"""Running the controller under gunicorn: several workers, threads, one database.

The master migrates the database once before forking; each worker builds its
own Controller (connection pools, background threads) after the fork.
Prometheus counters of all workers are aggregated through a shared folder
that lives as long as the server. Workers read request heads without tying
up a thread and bound how long a client may take (`_worker`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication
from prometheus_client import values

from sllm.core.listen import bound_port, publish_port

from ._config import ControllerConfig
from ._worker import ConnectionLimits

log = logging.getLogger("sllm.controller")


class ControllerServer(BaseApplication):
    """A gunicorn application serving the controller's Flask app from ControllerWorkers."""

    def __init__(self, config: ControllerConfig) -> None:
        self.controller_config = config
        self.connection_limits = ConnectionLimits(
            header_timeout=config.header_timeout,
            body_timeout=config.body_timeout,
            max_header_bytes=config.max_header_bytes,
        )
        super().__init__()

    def load_config(self) -> None:
        """gunicorn settings from the controller config."""
        c = self.controller_config
        settings: dict[str, Any] = {
            "bind": f"{c.host}:{c.port}",
            "workers": c.workers,
            "worker_class": "sllm.controller._worker.ControllerWorker",
            "threads": c.threads,
            "worker_connections": c.max_connections,
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
    with multiprocess_metrics():
        ControllerServer(config).run()


@contextmanager
def multiprocess_metrics() -> Iterator[str]:
    """The folder every worker writes its metrics to, for as long as the server runs.

    PROMETHEUS_MULTIPROC_DIR when the operator set it (its stale files are
    removed: prometheus_client wants it wiped between runs), else a fresh
    temporary folder that is removed again when the server stops.
    """
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    folder = given or tempfile.mkdtemp(prefix="sllm-metrics-")
    if given:
        for stale in Path(given).glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    # prometheus_client chose in-memory values when sllm.controller imported it, before
    # the variable was set; workers forked from here must count in the shared folder.
    previous, values.ValueClass = values.ValueClass, values.get_value_class()
    master = os.getpid()
    try:
        yield folder
    finally:
        # Workers leave run() through here too (SystemExit after the fork): only the
        # master restores and removes.
        if os.getpid() == master:
            values.ValueClass = previous
            if not given:
                del os.environ["PROMETHEUS_MULTIPROC_DIR"]
                shutil.rmtree(folder, ignore_errors=True)
