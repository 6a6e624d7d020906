"""The overhead benchmark's system under test: a controller and an invoker as real processes.

`Stack` starts `python -m sllm controller start` (gunicorn workers) on a
database and `python -m sllm invoker start` registered with it by heartbeat,
both on loopback in their own process groups, then creates the namespace,
key and function the benchmark invokes. `stop()` ends both groups (SIGTERM,
then SIGKILL after a bounded wait). CPU time is read per process group from
/proc, so a run can say how busy each side was.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import httpx

NAMESPACE = "bench"
FUNCTION = "tiny"
MODEL = "tiny"
CONCURRENCY = 64  # the function's concurrency limit: no client count here queues on it
PROMPT = "hello"
CONTROLLER_BODY: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 1, "temperature": 0}
FUNCTION_DEF: dict[str, Any] = {
    "model": MODEL,
    "limits": {"concurrency": CONCURRENCY, "max_tokens": 1},
    "scaling": {"max_instances": 1, "target_concurrency": CONCURRENCY},
}
# What the controller sends the invoker for CONTROLLER_BODY (the same function id, so
# both paths hit the same warm instance), minus "stream": true.
DIRECT_BODY: dict[str, Any] = {
    "function": f"{NAMESPACE}/{FUNCTION}",
    "model": MODEL,
    "task": "generate",
    "concurrency": CONCURRENCY,
    **CONTROLLER_BODY,
}
INVOCATION_PATH = (
    f"/api/v1/namespaces/{NAMESPACE}/functions/{FUNCTION}/invocations?blocking=true&result=true"
)
METRIC_ENDPOINT = "/api/v1/namespaces/<ns>/functions/<name>/invocations"
START_TIMEOUT = 120.0
STOP_WAIT = 15.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def group_cpu_seconds(pgid: int) -> float:
    """User + system CPU seconds of the live processes in process group `pgid` (Linux /proc)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue  # it ended meanwhile
        fields = raw[raw.rfind(")") + 2 :].split()
        # fields[0] is the state (stat field 3): pgrp is field 5, utime 14, stime 15.
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def host_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of all CPUs since boot, from /proc/stat."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


class Server:
    """One `python -m sllm ...` server process in its own process group, logging to a file."""

    def __init__(self, name: str, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.name = name
        self.args = [sys.executable, "-m", "sllm", *args]
        self.env = dict(env)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def launch(self) -> None:
        """Start the process (returns at once; see `wait_ready`)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.args,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, ready_url: str, headers: Mapping[str, str] | None = None) -> None:
        """Wait until `ready_url` answers 200; RuntimeError if the process exits or time runs out."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                if httpx.get(ready_url, headers=dict(headers or {}), timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} not ready in {START_TIMEOUT:g} s:\n{self.log_tail()}")

    @property
    def pgid(self) -> int:
        """The process group (the server's pid: it leads its own session)."""
        if self.proc is None:
            raise RuntimeError(f"{self.name} was not started")
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU seconds its process group used so far (live processes only)."""
        return group_cpu_seconds(self.pgid)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of its log."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def terminate(self) -> None:
        """Send SIGTERM to the group, without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        """SIGTERM the group, SIGKILL it after STOP_WAIT s; returns once the leader is reaped."""
        if self.proc is None:
            return
        self.terminate()
        try:
            self.proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        # Workers the leader left behind (it died first) go too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)


class Stack:
    """Controller + invoker on loopback, with the benchmark's namespace, key and function."""

    def __init__(
        self,
        *,
        database_url: str,
        store_uri: str,
        workdir: Path,
        workers: int,
        invoker_threads: int,
        device: str,
    ) -> None:
        self.token = secrets.token_urlsafe(24)
        self.admin_key = f"{secrets.token_hex(8)}:{secrets.token_urlsafe(24)}"
        self.key = ""
        ctl_port, inv_port = free_port(), free_port()
        self.controller_url = f"http://127.0.0.1:{ctl_port}"
        self.invoker_url = f"http://127.0.0.1:{inv_port}"
        metrics_dir = workdir / f"metrics-{ctl_port}"
        metrics_dir.mkdir(parents=True, exist_ok=True)
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
        base["SLLM_HOME"] = str(workdir / "home")
        self.controller = Server(
            "controller",
            ["controller", "start", "--port", str(ctl_port)],
            {
                **base,
                "SLLM_INTERNAL_TOKEN": self.token,
                "SLLM_ADMIN_KEY": self.admin_key,
                "SLLM_DATABASE_URL": database_url,
                "SLLM_WORKERS": str(workers),
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            },
            workdir / f"controller-{ctl_port}.log",
        )
        self.invoker = Server(
            "invoker",
            [
                "invoker",
                "start",
                "--port",
                str(inv_port),
                "--cache-dir",
                str(workdir / "invoker-cache"),
                "--store",
                store_uri,
                "--controller",
                self.controller_url,
                "--name",
                "bench-inv",
                "--heartbeat-interval",
                "1",
                "--no-measure",
                "--threads",
                str(invoker_threads),
                "--device",
                device,
                "--nvme-capacity",
                "1GiB",
                "--dram-capacity",
                "1GiB",
            ],
            {**base, "SLLM_INTERNAL_TOKEN": self.token},
            workdir / f"invoker-{inv_port}.log",
        )

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start both, wait for the invoker's registration, create namespace, key, function."""
        # Side by side: both spend seconds importing; the invoker retries its heartbeat.
        self.controller.launch()
        self.invoker.launch()
        self.controller.wait_ready(f"{self.controller_url}/readyz")
        self.invoker.wait_ready(f"{self.invoker_url}/readyz", self.invoker_headers())
        with httpx.Client(
            base_url=self.controller_url, headers=self._bearer(self.admin_key), timeout=30
        ) as admin:
            self._wait_for_invoker(admin)
            created = admin.put(f"/api/v1/namespaces/{NAMESPACE}")
            if created.status_code != 409:  # 409: it exists (a reused database)
                _ok(created)
            self.key = _ok(admin.post(f"/api/v1/namespaces/{NAMESPACE}/keys", json={}))["key"]
            _ok(
                admin.put(
                    f"/api/v1/namespaces/{NAMESPACE}/functions/{FUNCTION}?overwrite=true",
                    json=FUNCTION_DEF,
                )
            )

    def stop(self) -> None:
        """Stop both (SIGTERM to both first: each takes seconds to drain; bounded in time)."""
        self.invoker.terminate()
        self.controller.terminate()
        try:
            self.invoker.stop()
        finally:
            self.controller.stop()

    def logs(self) -> str:
        """Both logs' tails, for an error message."""
        return (
            f"--- controller log ({self.controller.log_path}):\n{self.controller.log_tail()}\n"
            f"--- invoker log ({self.invoker.log_path}):\n{self.invoker.log_tail()}"
        )

    @staticmethod
    def _wait_for_invoker(admin: httpx.Client, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = _ok(admin.get("/api/v1/invokers"))
            if any(i["name"] == "bench-inv" and i["state"] == "active" for i in found):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the invoker did not register with the controller in {timeout:g} s")

    # ------------------------------------------------------------ clients
    @staticmethod
    def _bearer(key: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    def controller_headers(self) -> dict[str, str]:
        """Headers of an invocation through the controller (the namespace's key)."""
        return self._bearer(self.key)

    def invoker_headers(self) -> dict[str, str]:
        """Headers of a call straight to the invoker (the internal token)."""
        return self._bearer(self.token)

    def controller_client(self, timeout: float = 60.0) -> httpx.Client:
        """A keep-alive client for invocations through the controller."""
        return httpx.Client(
            base_url=self.controller_url, headers=self.controller_headers(), timeout=timeout
        )

    def invoker_client(self, timeout: float = 60.0) -> httpx.Client:
        """A keep-alive client for invocations straight to the invoker."""
        return httpx.Client(
            base_url=self.invoker_url, headers=self.invoker_headers(), timeout=timeout
        )

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds of the controller's and the invoker's process groups so far."""
        return {"controller": self.controller.cpu_seconds(), "invoker": self.invoker.cpu_seconds()}

    def server_latency(self) -> tuple[float, float]:
        """(sum of seconds, count) of the controller's own invocation-request latency histogram."""
        text = httpx.get(f"{self.controller_url}/metrics", timeout=10).text
        return parse_histogram(text, "sllm_controller_request_seconds", METRIC_ENDPOINT)

    def activation(self, client: httpx.Client, activation_id: str) -> dict[str, Any]:
        """One activation record (read with the namespace's key)."""
        doc: dict[str, Any] = _ok(
            client.get(f"/api/v1/namespaces/{NAMESPACE}/activations/{activation_id}")
        )
        return doc


def parse_histogram(text: str, metric: str, endpoint: str) -> tuple[float, float]:
    """(sum, count) of a Prometheus histogram's series for one `endpoint` label value."""
    total = count = 0.0
    label = f'endpoint="{endpoint}"'
    for line in text.splitlines():
        if label not in line or line.startswith("#"):
            continue
        name = line.split("{", 1)[0]
        value = float(line.rsplit(" ", 1)[1])
        if name == f"{metric}_sum":
            total += value
        elif name == f"{metric}_count":
            count += value
    return total, count


def _ok(response: httpx.Response) -> Any:
    if response.status_code >= 400:
        raise RuntimeError(
            f"{response.request.method} {response.request.url.path} answered "
            f"{response.status_code}: {response.text[:500]}"
        )
    return response.json()


# ---------------------------------------------------------------------- PostgreSQL
def postgres_unreachable(admin_url: str, timeout_s: int = 3) -> str | None:
    """None when `admin_url` accepts a connection, else why not (one line)."""
    from sllm.db import postgres_unreachable as unreachable

    return unreachable(admin_url, timeout_s=timeout_s)


def postgres_database(admin_url: str) -> AbstractContextManager[str]:
    """A fresh database sllm_bench_<hex> on `admin_url`'s server: its URL, dropped after."""
    from sllm.db import scratch_postgres_database

    return scratch_postgres_database(admin_url, "sllm_bench")


def hide_password(url: str) -> str:
    """`url` with any password replaced by ***."""
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)
