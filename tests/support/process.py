"""A service as a real process on loopback: start it on port 0, read back the port it bound,
wait for /readyz, read its log, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TypeVar

import httpx

P = TypeVar("P", bound="ServiceProcess")


class ServiceProcess:
    """The command `args` + `--port PORT --port-file FILE` with `env`, its output in a log under
    `log_dir`; ready when /readyz answers 200.

    PORT is 0 unless given: the service binds a free port itself and writes it to FILE, so no
    other process can take the port between choosing and binding it.
    """

    name = "service"

    def __init__(
        self, args: list[str], env: Mapping[str, str], log_dir: Path, *, port: int = 0
    ) -> None:
        tag = f"{self.name}-{uuid.uuid4().hex[:8]}"
        self.port_file = log_dir / f"{tag}.port"
        self.log_path = log_dir / f"{tag}.log"
        self.args = [*args, "--port", str(port), "--port-file", str(self.port_file)]
        self.env = dict(env)
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The service's base URL (known once started)."""
        if not self.port:
            raise RuntimeError(f"{self.name} has no port yet: start it first")
        return f"http://127.0.0.1:{self.port}"

    def ready_headers(self) -> dict[str, str]:
        """Headers the readiness probe sends."""
        return {}

    def start(self: P, timeout: float = 60.0) -> P:
        """Start, learn the bound port, and wait until /readyz answers 200."""
        self.port_file.unlink(missing_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            if self._ready():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout}s:\n{self.log()}")

    def _ready(self) -> bool:
        if not self.port_file.exists():  # published by rename: whole or absent
            return False
        self.port = int(self.port_file.read_text())
        try:
            r = httpx.get(f"{self.url}/readyz", headers=self.ready_headers(), timeout=2)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def log(self) -> str:
        """The process's output so far (last 4000 characters)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def running(self) -> bool:
        """Whether the process is alive."""
        return self.proc is not None and self.proc.poll() is None

    def send_signal(self, sig: int) -> None:
        """Send `sig` to the process group (gunicorn master and workers); returns at once."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the whole process group (gunicorn master and workers), bounded in time."""
        self.send_signal(sig)
        self.wait_stopped()

    def wait_stopped(self, timeout: float = 15.0) -> None:
        """Wait for the process to exit; kill its group if it lingers past `timeout`."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def stop_all(services: Iterable[ServiceProcess]) -> None:
    """Stop services together: SIGTERM to each, then wait for each (their grace periods
    overlap instead of adding up)."""
    started = list(services)
    for service in started:
        service.send_signal(signal.SIGTERM)
    for service in started:
        service.wait_stopped()
