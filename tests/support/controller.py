"""A controller on loopback for integration tests: in-process (threaded) or as a process."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from werkzeug.serving import make_server

from sllm.controller import Controller, ControllerConfig, create_app
from sllm.db import Database
from tests.support.invoker import TOKEN, InvokerProcess
from tests.support.process import ServiceProcess
from tests.support.waiting import wait_until

ADMIN_KEY = "admin0000000000:test-admin-secret"


class ControllerThread:
    """The controller's Flask app served by werkzeug's threaded server in this process."""

    def __init__(self, database_url: str, **settings: Any) -> None:
        self.db = Database(database_url)
        self.db.upgrade()
        self.config = controller_config(database_url, **settings)
        self.controller = Controller(self.config, self.db)
        # Port 0: bound here, at once; the config records the port the kernel chose.
        self._server = make_server("127.0.0.1", 0, create_app(self.controller), threaded=True)
        self.port = self._server.server_port
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> ControllerThread:
        """Serve and run the background threads."""
        self.controller.start()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close."""
        self._server.shutdown()
        self.controller.close()
        self.db.dispose()

    def admin(self, timeout: float = 60.0) -> httpx.Client:
        """A client with the admin key."""
        return client(self.url, ADMIN_KEY, timeout)


class ControllerProcess(ServiceProcess):
    """`sllm controller start` as a real process: a gunicorn master and `workers` workers.

    `port` 0 (the default) binds a free port; a restart passes the port the first start got.
    """

    name = "controller"

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        port: int = 0,
        workers: int = 2,
    ) -> None:
        settings = {
            "SLLM_INTERNAL_TOKEN": TOKEN,
            "SLLM_ADMIN_KEY": ADMIN_KEY,
            "SLLM_DATABASE_URL": database_url,
            "SLLM_HEARTBEAT_TIMEOUT": "3",
            "SLLM_MAINTENANCE_INTERVAL": "0.2",
            "SLLM_WORKERS": str(workers),
            **(env or {}),
        }
        super().__init__(
            [sys.executable, "-m", "sllm", "controller", "start"],
            {**os.environ, **settings},
            log_dir,
            port=port,
        )
        # What each worker runs with, for tests that build a Controller of their own beside it.
        self.config = ControllerConfig.from_env(settings)

    def admin(self, timeout: float = 60.0) -> httpx.Client:
        """A client with the admin key."""
        return client(self.url, ADMIN_KEY, timeout)


def controller_config(database_url: str, **settings: Any) -> ControllerConfig:
    """The test controllers' settings (fast heartbeats and maintenance); `settings` override."""
    values: dict[str, Any] = {
        "database_url": database_url,
        "internal_token": TOKEN,
        "admin_key": ADMIN_KEY,
        "heartbeat_timeout": 3.0,
        "maintenance_interval": 0.2,
        **settings,
    }
    return ControllerConfig(**values)


def client(url: str, key: str, timeout: float = 60.0) -> httpx.Client:
    """An HTTP client for the controller with an API key."""
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def registered_invoker(
    cache_dir: Path, store_uri: str, controller_url: str, name: str, *, heartbeat: float = 0.5
) -> InvokerProcess:
    """An invoker process (not started) that registers with the controller as `name`."""
    return InvokerProcess(
        cache_dir,
        store_uri,
        extra=(
            "--controller",
            controller_url,
            "--name",
            name,
            "--heartbeat-interval",
            str(heartbeat),
        ),
    )


def wait_for_invokers(api: httpx.Client, count: int, timeout: float = 30.0) -> list[Any]:
    """Wait until `count` invokers are active at the controller."""

    def active() -> list[Any]:
        found = [i for i in api.get("/api/v1/invokers").json() if i["state"] == "active"]
        return found if len(found) >= count else []

    return wait_until(active, timeout, f"{count} active invokers")


def api(stack: Mapping[str, Any], ns: str = "alpha") -> httpx.Client:
    """A client of the stack's controller with namespace `ns`'s key."""
    return client(stack["ctl"].url, stack["keys"][ns], timeout=120)


def make_fn(c: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    """Create function `name` in the key's namespace (model "llama" unless given)."""
    r = c.put(f"/api/v1/namespaces/_/functions/{name}", json={"model": "llama", **body})
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc
