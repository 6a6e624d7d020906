"""Running the invoker under gunicorn: one worker process holds the models, threads serve."""

from __future__ import annotations

import logging
from typing import Any

from gunicorn.app.base import BaseApplication

from sllm.core.listen import bound_port, publish_port

from ._cachelock import CacheLock
from ._config import InvokerConfig

log = logging.getLogger("sllm.invoker")


class InvokerServer(BaseApplication):
    """A gunicorn application whose single gthread worker builds the Invoker after the fork.

    One process, because the models (and their pinned DRAM copies) must not
    be duplicated per worker; threads, so streams and loads run side by side.
    The invoker is built in the worker, never in the master, so CUDA is
    initialised after the fork.
    """

    def __init__(self, config: InvokerConfig, cache_lock: CacheLock) -> None:
        self.invoker_config = config
        self.cache_lock = cache_lock  # taken by the master; the forked worker inherits it
        super().__init__()

    def load_config(self) -> None:
        """gunicorn settings from the invoker config."""
        c = self.invoker_config
        settings: dict[str, Any] = {
            "bind": f"{c.host}:{c.port}",
            "workers": 1,
            "worker_class": "gthread",
            "threads": c.threads,
            "timeout": 0,  # a cold load of a large model may take minutes
            "graceful_timeout": 10,
            "keepalive": 30,
            "proc_name": f"sllm-invoker-{c.port}",
            "loglevel": "info",
            # Several invokers share a host in tests and benchmarks; the control
            # socket's default path would collide, and nothing here uses it.
            "control_socket_disable": True,
            "when_ready": self._when_ready,
        }
        for key, value in settings.items():
            if key in self.cfg.settings:  # older gunicorn versions lack some settings
                self.cfg.set(key, value)

    def _when_ready(self, arbiter: Any) -> None:
        # Listening, the worker not yet forked: it registers with the port actually bound.
        c = self.invoker_config
        port = bound_port(arbiter)
        self.invoker_config = c.replace(port=port)
        if c.port_file:
            publish_port(c.port_file, port)

    def load(self) -> Any:
        """Build the invoker and its Flask app (in the worker)."""
        from ._app import create_app
        from ._service import Invoker

        invoker = Invoker(self.invoker_config, cache_lock=self.cache_lock)
        invoker.start()
        log.info(
            "invoker ready on %s:%s (device %s, bandwidths %s)",
            self.invoker_config.host,
            self.invoker_config.port,
            invoker.device,
            invoker.bandwidths.to_json(),
        )
        return create_app(invoker)


def serve(config: InvokerConfig) -> None:
    """Run the invoker until SIGTERM / SIGINT; CacheFolderBusy when another holds its cache."""
    config.validate()
    # Claimed in the master, before gunicorn starts: a second invoker on the same
    # folder fails here with a clear message instead of in a worker that fails to boot.
    cache_lock = CacheLock.acquire(config.cache_dir)
    try:
        InvokerServer(config, cache_lock).run()
    finally:
        cache_lock.release()
