"""The migration benchmark's cluster: two controller processes and two invokers on loopback.

    live controller     the default round policy (SLLM_MIGRATION_MAX_ROUNDS 4)
    stop controller     SLLM_MIGRATION_MAX_ROUNDS=0: a migration pauses the source first
                        and the destination prefills everything (stop-and-recompute)
    inv-a, inv-b        invokers heartbeating to the live controller; the stop controller
                        sees them through the shared SQLite database

Both controllers run on one database, as replicas do, so one function (min_instances 2:
a warm instance on each invoker) serves every variant, and a migration is relayed by the
controller whose stream it moves. An invoker killed with SIGKILL is restarted on the same
port and name; `wait_warm` waits until the controller has placed its instance again (the
function's min_instances), so every round starts from the same state: both instances
loaded and idle.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from ._overhead_stack import Server, free_port

NAMESPACE = "bench"
FUNCTION = "migrating"
INVOKERS = ("inv-a", "inv-b")
WARM_TIMEOUT_S = 180.0


class Cluster:
    """The processes of one run (see the module docstring) and the calls the benchmark makes."""

    def __init__(
        self, *, store_uri: str, workdir: Path, model: str, torch_threads: int, output_len: int
    ) -> None:
        self.model = model
        self.output_len = output_len
        self.token = secrets.token_urlsafe(24)
        self.admin_key = f"{secrets.token_hex(8)}:{secrets.token_urlsafe(24)}"
        self.key = ""
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
        base["SLLM_HOME"] = str(workdir / "home")
        database = f"sqlite:///{(workdir / 'sllm.db').resolve()}"
        self.controllers: dict[str, Server] = {}
        self.urls: dict[str, str] = {}
        for name, max_rounds in (("live", 4), ("stop", 0)):
            port = free_port()
            metrics = workdir / f"metrics-{name}"
            metrics.mkdir(parents=True, exist_ok=True)
            self.urls[name] = f"http://127.0.0.1:{port}"
            self.controllers[name] = Server(
                f"{name} controller",
                ["controller", "start", "--port", str(port)],
                {
                    **base,
                    "SLLM_INTERNAL_TOKEN": self.token,
                    "SLLM_ADMIN_KEY": self.admin_key,
                    "SLLM_DATABASE_URL": database,
                    "SLLM_WORKERS": "1",
                    "SLLM_HEARTBEAT_TIMEOUT": "3",
                    "SLLM_MIGRATION_MAX_ROUNDS": str(max_rounds),
                    "PROMETHEUS_MULTIPROC_DIR": str(metrics),
                },
                workdir / f"controller-{name}.log",
            )
        self.invokers: dict[str, Server] = {}
        for name in INVOKERS:
            port = free_port()
            self.urls[name] = f"http://127.0.0.1:{port}"
            args = [
                "invoker",
                "start",
                "--port",
                str(port),
                "--cache-dir",
                str(workdir / f"cache-{name}"),
                "--store",
                store_uri,
                "--controller",
                self.urls["live"],
                "--name",
                name,
                "--heartbeat-interval",
                "0.5",
                "--no-measure",
                "--device",
                "cpu",
                "--nvme-capacity",
                "4GiB",
                "--dram-capacity",
                "4GiB",
            ]
            env = {**base, "SLLM_INTERNAL_TOKEN": self.token, "OMP_NUM_THREADS": str(torch_threads)}
            self.invokers[name] = Server(name, args, env, workdir / f"{name}.log")

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start every process, create the namespace, key and function; both instances warm."""
        for server in (*self.controllers.values(), *self.invokers.values()):
            server.launch()
        for name, server in self.controllers.items():
            server.wait_ready(f"{self.urls[name]}/readyz")
        for name in INVOKERS:
            self._invoker_ready(name)
        with self.admin() as admin:
            self._wait_active(admin)
            created = admin.put(f"/api/v1/namespaces/{NAMESPACE}")
            if created.status_code != 409:
                ok(created)
            self.key = ok(admin.post(f"/api/v1/namespaces/{NAMESPACE}/keys", json={}))["key"]
            definition = {
                "model": self.model,
                "limits": {"concurrency": 1, "max_tokens": self.output_len, "timeout": 900},
                "scaling": {"min_instances": 2, "max_instances": 2, "keep_alive": 3600},
                "on_invoker_loss": "resume",
                "params": {"temperature": 0},
            }
            ok(
                admin.put(
                    f"/api/v1/namespaces/{NAMESPACE}/functions/{FUNCTION}?overwrite=true",
                    json=definition,
                )
            )
        self.wait_warm()

    def stop(self) -> None:
        """Stop every process (SIGTERM to all first; bounded in time)."""
        servers = [*self.invokers.values(), *self.controllers.values()]
        for server in servers:
            server.terminate()
        for server in servers:
            with contextlib.suppress(OSError, RuntimeError):
                server.stop()

    def kill(self, name: str) -> float:
        """SIGKILL invoker `name`'s process group; the wall time of the kill."""
        proc = self.invokers[name].proc
        if proc is None:
            raise RuntimeError(f"{name} is not running")
        at = time.time()
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        return at

    def restart(self, name: str) -> None:
        """Start a killed invoker again (same port, name and cache folder)."""
        self.invokers[name].launch()
        self._invoker_ready(name)

    def wait_warm(
        self, names: Sequence[str] = INVOKERS, timeout: float = WARM_TIMEOUT_S
    ) -> dict[str, dict[str, Any]]:
        """Wait until each of `names` has a loaded, idle instance of the function and no
        generation; each one's instance (its status view)."""
        deadline = time.monotonic() + timeout
        seen: dict[str, Any] = {}
        while time.monotonic() < deadline:
            warm = {}
            for name in names:
                with contextlib.suppress(httpx.HTTPError):
                    seen[name] = status = self.invoker_status(name)
                    mine = [
                        i
                        for i in status["instances"]
                        if i.get("function") == f"{NAMESPACE}/{FUNCTION}"
                    ]
                    ready = [i for i in mine if not i.get("loading") and not i.get("active")]
                    if ready and not status["generations"]:
                        warm[name] = ready[0]
            if len(warm) == len(names):
                return warm
            time.sleep(0.2)
        raise RuntimeError(f"the instances were not warm and idle in {timeout:g} s: {seen}")

    def logs(self) -> str:
        """Every process's log tail, for an error message."""
        servers = [*self.controllers.values(), *self.invokers.values()]
        return "\n".join(f"--- {s.name} ({s.log_path}):\n{s.log_tail(2500)}" for s in servers)

    # ------------------------------------------------------------ calls
    def admin(self, controller: str = "live") -> httpx.Client:
        """A client of `controller` with the admin key."""
        return self._client(self.urls[controller], self.admin_key)

    def api(self, controller: str = "live") -> httpx.Client:
        """A client of `controller` with the namespace's key (the function's callers)."""
        return self._client(self.urls[controller], self.key)

    def invoker(self, name: str) -> httpx.Client:
        """A client straight to invoker `name` (the internal token)."""
        return self._client(self.urls[name], self.token)

    def invoker_status(self, name: str) -> dict[str, Any]:
        """Invoker `name`'s /v1/status."""
        with self.invoker(name) as client:
            doc: dict[str, Any] = ok(client.get("/v1/status", timeout=5))
            return doc

    def migrate(self, activation_id: str, to: str) -> dict[str, Any]:
        """Ask for the live migration of a running activation to invoker `to` (202)."""
        with self.admin() as admin:
            path = f"/api/v1/namespaces/{NAMESPACE}/activations/{activation_id}/migrate"
            doc: dict[str, Any] = ok(admin.post(path, json={"to": to}))
            return doc

    def activation(self, activation_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """The activation's record once it is stored as ended, with its log lines."""
        deadline = time.monotonic() + timeout
        with self.api() as api:
            path = f"/api/v1/namespaces/{NAMESPACE}/activations/{activation_id}"
            while True:
                got = api.get(path)
                if got.status_code == 200 and got.json().get("status") not in (None, "running"):
                    doc: dict[str, Any] = got.json()
                    logs = api.get(f"{path}/logs")
                    if logs.status_code == 200:
                        body = logs.json()
                        doc["log_lines"] = (
                            body.get("logs", body) if isinstance(body, dict) else body
                        )
                    return doc
                if time.monotonic() > deadline:
                    raise RuntimeError(f"activation {activation_id} not stored: {got.text[:300]}")
                time.sleep(0.1)

    # ------------------------------------------------------------ internals
    def _invoker_ready(self, name: str) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        self.invokers[name].wait_ready(f"{self.urls[name]}/readyz", headers)

    @staticmethod
    def _client(url: str, key: str) -> httpx.Client:
        return httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=httpx.Timeout(600.0)
        )

    @staticmethod
    def _wait_active(admin: httpx.Client, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = {i["name"]: i["state"] for i in ok(admin.get("/api/v1/invokers"))}
            if all(found.get(n) == "active" for n in INVOKERS):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the invokers did not register in {timeout:g} s")


def ok(response: httpx.Response) -> Any:
    """The JSON of a successful response; RuntimeError naming the call otherwise."""
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    return response.json()
