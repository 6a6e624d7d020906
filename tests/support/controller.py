"""A controller on loopback for integration tests: in-process (threaded) or as a process."""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from werkzeug.serving import make_server

from sllm.controller import Controller, ControllerConfig, create_app
from sllm.db import Database
from tests.support.invoker import TOKEN, InvokerProcess
from tests.support.process import ServiceProcess
from tests.support.s3 import free_port

ADMIN_KEY = "admin0000000000:test-admin-secret"


class ControllerThread:
    """The controller's Flask app served by werkzeug's threaded server in this process."""

    def __init__(self, database_url: str, **settings: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        values: dict[str, Any] = {
            "database_url": database_url,
            "internal_token": TOKEN,
            "admin_key": ADMIN_KEY,
            "port": self.port,
            "heartbeat_timeout": 3.0,
            "maintenance_interval": 0.2,
            **settings,
        }
        self.config = ControllerConfig(**values)
        self.db = Database(database_url)
        self.db.upgrade()
        self.controller = Controller(self.config, self.db)
        self._server = make_server(
            "127.0.0.1", self.port, create_app(self.controller), threaded=True
        )
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
    """`sllm controller start` as a real process (gunicorn workers)."""

    name = "controller"

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        super().__init__(
            [sys.executable, "-m", "sllm", "controller", "start", "--port", str(self.port)],
            {
                **os.environ,
                "SLLM_INTERNAL_TOKEN": TOKEN,
                "SLLM_ADMIN_KEY": ADMIN_KEY,
                "SLLM_DATABASE_URL": database_url,
                "SLLM_HEARTBEAT_TIMEOUT": "3",
                "SLLM_MAINTENANCE_INTERVAL": "0.2",
                **(env or {}),
            },
            f"http://127.0.0.1:{self.port}",
            log_dir / f"controller-{self.port}.log",
        )

    def admin(self, timeout: float = 60.0) -> httpx.Client:
        """A client with the admin key."""
        return client(self.url, ADMIN_KEY, timeout)


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
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [i for i in api.get("/api/v1/invokers").json() if i["state"] == "active"]
        if len(found) >= count:
            return found
        time.sleep(0.1)
    raise AssertionError(f"fewer than {count} invokers registered within {timeout}s")


def api(stack: Mapping[str, Any], ns: str = "alpha") -> httpx.Client:
    """A client of the stack's controller with namespace `ns`'s key."""
    return client(stack["ctl"].url, stack["keys"][ns], timeout=120)


def make_fn(c: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    """Create function `name` in the key's namespace (model "llama" unless given)."""
    r = c.put(f"/api/v1/namespaces/_/functions/{name}", json={"model": "llama", **body})
    assert r.status_code == 201, r.text
    doc: dict[str, Any] = r.json()
    return doc
