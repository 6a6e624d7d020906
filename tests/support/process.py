"""A service as a real process on loopback: start it, wait for /readyz, read its log, stop it."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TypeVar

import httpx

P = TypeVar("P", bound="ServiceProcess")


class ServiceProcess:
    """The command `args` with `env`, its output in `log_path`, ready when `url`/readyz is 200."""

    name = "service"

    def __init__(self, args: list[str], env: Mapping[str, str], url: str, log_path: Path) -> None:
        self.args = args
        self.env = dict(env)
        self.url = url
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def ready_headers(self) -> dict[str, str]:
        """Headers the readiness probe sends."""
        return {}

    def start(self: P, timeout: float = 60.0) -> P:
        """Start and wait until /readyz answers 200."""
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}/readyz", headers=self.ready_headers(), timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout}s:\n{self.log()}")

    def log(self) -> str:
        """The process's output so far (last 4000 characters)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the whole process group (gunicorn master and workers), bounded in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
