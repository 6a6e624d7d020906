"""Running the invoker under gunicorn: one worker process holds the models, threads serve."""

from __future__ import annotations

import logging
import math
import signal
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

    SIGTERM drains first (see _drain): the worker keeps serving while its
    running generations finish, up to `drain_grace`, and only then starts
    gunicorn's own graceful shutdown; the master's graceful timeout covers
    both (the grace plus GRACEFUL_MARGIN_S).
    """

    GRACEFUL_MARGIN_S = 10  # gunicorn's own shutdown after the drain (kept-alive connections)

    def __init__(self, config: InvokerConfig, cache_lock: CacheLock) -> None:
        self.invoker_config = config
        self.cache_lock = cache_lock  # taken by the master; the forked worker inherits it
        self._invoker: Any = None  # built in the worker by load()
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
            "graceful_timeout": math.ceil(c.drain_grace + self.GRACEFUL_MARGIN_S),  # an int
            "keepalive": 30,
            "proc_name": f"sllm-invoker-{c.port}",
            "loglevel": "info",
            # Several invokers share a host in tests and benchmarks; the control
            # socket's default path would collide, and nothing here uses it.
            "control_socket_disable": True,
            "when_ready": self._when_ready,
            "post_worker_init": self._post_worker_init,
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

    def _post_worker_init(self, worker: Any) -> None:
        # In the worker, its signal handlers installed: SIGTERM drains before gunicorn's exit.
        invoker, exit_now = self._invoker, worker.handle_exit

        def on_term(signum: int, frame: Any) -> None:
            invoker.drain_then(lambda: exit_now(signum, frame))

        signal.signal(signal.SIGTERM, on_term)
        signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn has it: no EINTR in requests

    def load(self) -> Any:
        """Build the invoker and its Flask app (in the worker)."""
        from ._app import create_app
        from ._service import Invoker

        invoker = self._invoker = Invoker(self.invoker_config, cache_lock=self.cache_lock)
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
