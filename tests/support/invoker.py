"""Invoker processes on loopback for integration tests: start, wait until ready, stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from tests.support.s3 import free_port

TOKEN = "test-internal-token"


class InvokerProcess:
    """`sllm invoker start` as a real process with its own port, cache folder and budgets."""

    def __init__(
        self,
        cache_dir: Path,
        store_uri: str,
        *,
        env: Mapping[str, str] | None = None,
        nvme: str = "1GiB",
        dram: str = "1GiB",
        extra: tuple[str, ...] = (),
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cache_dir = cache_dir
        self.log_path = cache_dir.parent / f"invoker-{self.port}.log"
        self.args = [
            sys.executable,
            "-m",
            "sllm",
            "invoker",
            "start",
            "--port",
            str(self.port),
            "--cache-dir",
            str(cache_dir),
            "--store",
            store_uri,
            "--nvme-capacity",
            nvme,
            "--dram-capacity",
            dram,
            "--threads",
            "8",
            *extra,
        ]
        self.env = {**os.environ, "SLLM_INTERNAL_TOKEN": TOKEN, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> InvokerProcess:
        """Start and wait until /readyz answers 200."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child writes to it
        self.proc = subprocess.Popen(
            self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"invoker exited with {self.proc.returncode}:\n{self.log()}")
            try:
                r = httpx.get(f"{self.url}/readyz", headers=self.headers(), timeout=2)
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"invoker did not become ready in {timeout}s:\n{self.log()}")

    def headers(self, token: str = TOKEN) -> dict[str, str]:
        """Headers with the internal token."""
        return {"Authorization": f"Bearer {token}"}

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """An HTTP client for this invoker, authenticated."""
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 120.0) -> httpx.Response:
        """POST JSON with the token."""
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers(), timeout=timeout)

    def log(self) -> str:
        """The process's output so far (last 4000 characters)."""
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except FileNotFoundError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Stop the whole process group (gunicorn master and worker), bounded in time."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
