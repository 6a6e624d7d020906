"""A stand-in invoker on loopback that the test steers: held invocations, failing loads.

It speaks the controller-facing part of the invoker's HTTP API (/v1/invoke, as
one JSON answer or, with "stream": true, as the NDJSON events of a one-token
generation; /v1/load, /v1/unload), records every call, and registers
with a controller only when the test sends a heartbeat for it (`status`), so
the test decides what the controller believes the invoker holds.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOLD_LIMIT_S = 30.0  # a held invocation answers after this long even if never released

ANSWER = {
    "text": "ok",
    "finish_reason": "stop",
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    "timing": {"ttft_s": 0.001, "tpot_s": 0.001},
    "load": {"cold": False},
}


class StubInvoker:
    """An HTTP server bound to 127.0.0.1 on a port the OS picked at start-up."""

    def __init__(self, name: str = "stub") -> None:
        self.name = name
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.draining = False  # invocations are refused with 503 "draining", as at a SIGTERM
        self.hold = False  # invocations wait for `release` (or HOLD_LIMIT_S)
        self.release = threading.Event()
        self.load_error: dict[str, Any] | None = None  # answered by /v1/load with a 500
        self.hold_loads = False  # loads wait for `release_loads` (or HOLD_LIMIT_S)
        self.release_loads = threading.Event()
        self._cond = threading.Condition()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with stub._cond:
                    stub.calls.append((self.path, body))
                    stub._cond.notify_all()
                status, answer = stub._answer(self.path)
                streamed = status == 200 and self.path == "/v1/invoke" and body.get("stream")
                if streamed:
                    lines = _events(answer, body.get("activation"), bool(body.get("resumable")))
                    raw = "".join(json.dumps(e) + "\n" for e in lines).encode()
                else:
                    raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header(
                    "Content-Type", "application/x-ndjson" if streamed else "application/json"
                )
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

        return Handler

    def _answer(self, path: str) -> tuple[int, dict[str, Any]]:
        if path == "/v1/invoke":
            if self.draining:
                return 503, {"error": {"code": "draining", "message": "draining"}}
            if self.hold:
                self.release.wait(HOLD_LIMIT_S)
            return 200, ANSWER
        if path == "/v1/load":
            if self.hold_loads:
                self.release_loads.wait(HOLD_LIMIT_S)
            if self.load_error is not None:
                return 500, {"error": self.load_error}
            return 200, {"cold": True, "tier": "remote", "load_seconds": 0.01}
        if path == "/v1/unload":
            return 200, {"unloaded": True}
        return 404, {"error": {"code": "not_found", "message": path}}

    def called(self, path: str) -> list[dict[str, Any]]:
        """The bodies of the calls to `path` so far."""
        with self._cond:
            return [body for p, body in self.calls if p == path]

    def wait_for(
        self, what: str, predicate: Callable[[StubInvoker], bool], timeout: float = 10.0
    ) -> None:
        """Wait (bounded) until `predicate(self)` holds after some call; AssertionError if not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                self._cond.wait(left)

    def status(
        self,
        instances: list[Mapping[str, Any]] | None = None,
        *,
        generations: list[str] | None = None,
        draining: Mapping[str, float] | None = None,
    ) -> dict[str, Any]:
        """A heartbeat body for a controller: this stub holding `instances`, running
        `generations` (ids), draining itself when `draining` ({since, grace_s})."""
        status: dict[str, Any] = {"instances": list(instances or [])}
        if generations is not None:
            status["generations"] = [{"id": g} for g in generations]
        return {
            "name": self.name,
            "url": self.url,
            "device": "cpu",
            "capacity": {},
            "draining": None if draining is None else dict(draining),
            "status": status,
        }

    @contextmanager
    def running(self) -> Iterator[StubInvoker]:
        """Serve while the block runs; held invocations are released at the end."""
        self._thread.start()
        try:
            yield self
        finally:
            self.release.set()
            self.release_loads.set()
            self._server.shutdown()
            self._server.server_close()


def _events(answer: Mapping[str, Any], gen_id: Any, resumable: bool) -> list[dict[str, Any]]:
    """`answer` as the invoker streams it: start, one token, finish, done (invoker/_stream)."""
    end = {"finish_reason": answer["finish_reason"], "stop_reason": None}
    start: dict[str, Any] = {
        "event": "start",
        "load": answer["load"],
        "prompt_tokens": answer["usage"]["prompt_tokens"],
        "generation": gen_id,
        "instance": "stub",
        "n": 1,
    }
    if resumable:
        start["states"] = [{"tokens": [1], "prompt_len": 1, "params": {}, "sampler": {}}]
    token = {"event": "token", "choice": 0, "index": 1, "token": 7, "text": answer["text"]}
    if resumable:
        token["text_state"] = {}
    return [
        start,
        token,
        {"event": "finish", "choice": 0, **end},
        {
            "event": "done",
            **end,
            "usage": answer["usage"],
            "timing": answer["timing"],
            "choices": [{"index": 0, **end}],
        },
    ]
