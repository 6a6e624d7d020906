"""Invoker processes on loopback for integration tests: start, wait until ready, stop."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.process import ServiceProcess

TOKEN = "test-internal-token"


class InvokerProcess(ServiceProcess):
    """`sllm invoker start` as a real process with its own port, cache folder and budgets."""

    name = "invoker"

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
        self.cache_dir = cache_dir
        args = [
            sys.executable,
            "-m",
            "sllm",
            "invoker",
            "start",
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
        # A stream a test leaves runs on detached for 10 s at most, not the default 30 s,
        # so abandoned generations do not load the machine for the tests after it.
        settings = {"SLLM_INTERNAL_TOKEN": TOKEN, "SLLM_DETACH_GRACE": "10", **(env or {})}
        super().__init__(args, {**os.environ, **settings}, cache_dir.parent)

    def start(self, timeout: float = 60.0) -> InvokerProcess:
        """Create the cache folder, start, and wait until /readyz answers 200."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return super().start(timeout)

    def ready_headers(self) -> dict[str, str]:
        """The readiness probe needs the token too."""
        return self.headers()

    def headers(self, token: str = TOKEN) -> dict[str, str]:
        """Headers with the internal token."""
        return {"Authorization": f"Bearer {token}"}

    def client(self, timeout: float = 120.0) -> httpx.Client:
        """An HTTP client for this invoker, authenticated."""
        return httpx.Client(base_url=self.url, headers=self.headers(), timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 120.0) -> httpx.Response:
        """POST JSON with the token."""
        return httpx.post(f"{self.url}{path}", json=body, headers=self.headers(), timeout=timeout)

    def metric(self, name: str, **labels: str) -> float:
        """The sum of sample `name` over the series matching `labels` in this invoker's /metrics."""
        r = httpx.get(f"{self.url}/metrics", headers=self.headers(), timeout=10)
        r.raise_for_status()
        return metric_value(r.text, name, **labels)


def metric_value(text: str, name: str, **labels: str) -> float:
    """The sum of sample `name` over the series whose labels include `labels` (0 when none)."""
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )
