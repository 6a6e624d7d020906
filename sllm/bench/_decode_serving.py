"""The decode benchmark's servers: invoker processes, and a client that streams many requests.

`InvokerServer` runs `python -m sllm invoker start` on loopback in its own
process group (no controller: the benchmark calls /v1/invoke with the
internal token), with batching on or off. `stream_requests` sends requests
at given arrival times, one thread and one NDJSON stream each, and records
when every token event arrived.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from ._decode_stats import StreamTimes
from ._overhead_stack import Server, free_port

FUNCTION = "bench/decode"
CONCURRENCY = 64  # the instance's slots: no run of the benchmark queues on them
REQUEST_TIMEOUT = 600.0


class InvokerServer:
    """One invoker process serving the benchmark's model from a local folder store."""

    def __init__(
        self, name: str, *, batching: bool, store_uri: str, workdir: Path, device: str
    ) -> None:
        self.name = name
        self.batching = batching
        self.token = secrets.token_urlsafe(24)
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        base = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
        base["SLLM_HOME"] = str(workdir / "home")
        self.server = Server(
            name,
            [
                "invoker",
                "start",
                "--port",
                str(port),
                "--cache-dir",
                str(workdir / f"cache-{name}"),
                "--store",
                store_uri,
                "--no-measure",
                "--threads",
                str(CONCURRENCY + 8),
                "--device",
                device,
                "--nvme-capacity",
                "8GiB",
                "--dram-capacity",
                "8GiB",
                "--batching" if batching else "--no-batching",
            ],
            {**base, "SLLM_INTERNAL_TOKEN": self.token},
            workdir / f"invoker-{name}.log",
        )

    def launch(self) -> None:
        """Start the process (returns at once)."""
        self.server.launch()

    def wait_ready(self) -> None:
        """Wait for /readyz (RuntimeError with the log's tail if it exits or times out)."""
        self.server.wait_ready(f"{self.url}/readyz", self.headers())

    def stop(self) -> None:
        """Stop the process group (bounded in time)."""
        self.server.stop()

    def headers(self) -> dict[str, str]:
        """The internal token."""
        return {"Authorization": f"Bearer {self.token}"}

    def client(self, connections: int) -> httpx.Client:
        """A client for this invoker with room for `connections` streams at once."""
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        return httpx.Client(
            base_url=self.url, headers=self.headers(), timeout=REQUEST_TIMEOUT, limits=limits
        )


def invoke_body(model: str, tokens: list[int], max_tokens: int) -> dict[str, Any]:
    """The /v1/invoke body of one greedy streamed request of `tokens`."""
    return {
        "function": FUNCTION,
        "model": model,
        "concurrency": CONCURRENCY,
        "tokens": tokens,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    }


def stream_requests(
    server: InvokerServer,
    model: str,
    prompts: Sequence[list[int]],
    max_tokens: Sequence[int],
    arrivals: Sequence[float] | None = None,
) -> tuple[list[StreamTimes], list[list[int]]]:
    """Send each prompt at its arrival time (default: all at once); times and tokens per stream.

    RuntimeError when a stream fails or ends with another number of tokens
    than asked for (the model has no end-of-sequence token, so none may).
    """
    n = len(prompts)
    offsets = list(arrivals) if arrivals is not None else [0.0] * n
    times = [StreamTimes(sent=0.0) for _ in range(n)]
    outputs: list[list[int]] = [[] for _ in range(n)]
    errors: list[str] = []
    with server.client(n) as client:
        start = time.perf_counter()

        def one(i: int) -> None:
            delay = start + offsets[i] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            body = invoke_body(model, prompts[i], max_tokens[i])
            try:
                _stream_one(client, body, times[i], outputs[i])
            except (httpx.HTTPError, RuntimeError, ValueError) as exc:
                errors.append(f"request {i}: {exc}")

        threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError(f"{server.name}: {len(errors)} of {n} requests failed: {errors[0]}")
    for i, (out, want) in enumerate(zip(outputs, max_tokens, strict=True)):
        if len(out) != want:
            raise RuntimeError(
                f"{server.name}: request {i} produced {len(out)} tokens, asked for {want}"
            )
    return times, outputs


def _stream_one(
    client: httpx.Client, body: dict[str, Any], times: StreamTimes, out: list[int]
) -> None:
    times.sent = time.perf_counter()
    with client.stream("POST", "/v1/invoke", json=body) as response:
        if response.status_code != 200:
            response.read()
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line:
                continue
            ev = json.loads(line)
            kind = ev.get("event")
            if kind == "token" and ev.get("token") is not None:
                times.tokens.append(time.perf_counter())
                out.append(int(ev["token"]))
            elif kind == "error":
                raise RuntimeError(f"error event: {ev}")
