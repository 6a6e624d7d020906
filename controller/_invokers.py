"""Talking to invokers: one pooled HTTP client per controller process.

Calls carry the internal token. A streamed invocation is read as the
invoker's NDJSON events; a connection that breaks, or an invoker that stops
answering, surfaces as `InvokerLost` so the dispatcher can retry elsewhere
(when nothing was relayed yet) or fail the activation cleanly.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import select
import threading
import time
from collections.abc import Generator, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from sllm.core.errors import PlatformError, SllmError, Unauthorized

# A reused connection that fails this soon after the request went out was closed by the
# invoker before it read the request: the request is sent again on a fresh connection.
STALE_CLOSE_WINDOW_S = 0.05

# An invoker names itself (`--name`, by default HOST:PORT): any printable text, so a
# host name with dots and a port fits; no control character (PostgreSQL refuses NUL).
INVOKER_NAME_RULE = "1-128 printable characters"


def is_invoker_name(value: object) -> bool:
    """Whether `value` may name an invoker (INVOKER_NAME_RULE)."""
    return isinstance(value, str) and 1 <= len(value) <= 128 and value.isprintable()


class InvokerLost(PlatformError):
    """The invoker went away (refused, reset, or silent past the deadline).

    `reason` says how, for the relay's records: "unreachable" (nothing was sent),
    "broken" (the connection was reset or cut short), "stalled" (silent too long).
    """

    status = 503
    code = "invoker_lost"

    def __init__(self, message: str, *, reason: str = "broken", **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reason = reason


def error_from(doc: Any, status: int, retry_after: str | None = None) -> SllmError:
    """The SllmError an invoker's error body (or event) stands for."""
    err = doc.get("error") if isinstance(doc, Mapping) else None
    exc = PlatformError.from_json(err, f"invoker answered {status}")
    if isinstance(exc, Unauthorized):  # the controller's token was refused: that is our fault
        exc = PlatformError(exc.message)
    if retry_after:
        with contextlib.suppress(ValueError):  # a malformed header is no hint at all
            exc.retry_after = float(retry_after)
    return exc


class InvokerClient:
    """HTTP calls to invokers over keep-alive connections (http.client, pooled per invoker).

    http.client rather than a richer client: this is the controller's hot
    path, and it costs a third of the CPU per call. A connection is used by
    one thread at a time and goes back to the pool only when its response was
    read to the end. An idle one the invoker closed meanwhile is noticed
    before reuse (it polls readable) and dropped; one that fails at once after
    the request went out was closed before the invoker read the request, and
    the request goes again on a fresh connection. A request is never sent
    twice otherwise.
    """

    MAX_IDLE = 128  # idle connections kept per invoker

    def __init__(self, token: str, *, connect_timeout: float = 2.0) -> None:
        self._headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        self._connect = connect_timeout
        self._lock = threading.Lock()
        self._idle: dict[str, list[http.client.HTTPConnection]] = {}

    def close(self) -> None:
        """Drop the pooled connections."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def call(self, url: str, path: str, body: Mapping[str, Any], timeout: float) -> Any:
        """POST a JSON body and return the JSON answer; errors become SllmErrors."""
        conn, response = self._send(url, path, body, timeout)
        try:
            raw = response.read()
        except TimeoutError as exc:
            conn.close()
            raise InvokerLost(
                f"invoker {url} did not answer within {timeout:.0f} s", reason="stalled"
            ) from exc
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise InvokerLost(f"invoker {url} broke the connection: {exc}") from exc
        self._put(url, conn, response)
        return _answer(response, raw)

    def get(self, url: str, path: str, timeout: float) -> tuple[str, bytes]:
        """GET an operator's page (metrics, status): its content type and body.

        Not the hot path: a connection of its own, closed after the answer.
        """
        parts = urlsplit(url)
        cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        conn = cls(parts.hostname or "", parts.port, timeout=timeout)
        try:
            conn.request("GET", path, headers=self._headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise InvokerLost(f"invoker {url} did not answer {path}: {exc}") from exc
        finally:
            conn.close()
        if response.status >= 400:
            _answer(response, raw)
        return response.getheader("Content-Type") or "application/octet-stream", raw

    def stream(
        self,
        url: str,
        body: Mapping[str, Any] | None,
        timeout: float,
        *,
        path: str = "/v1/invoke",
        stall: float | None = None,
    ) -> Generator[dict[str, Any], None, None]:
        """The invoker's generation events; closing the generator closes the connection.
        With `body` None, a GET of `path` (a running generation's events, see _attach).

        `timeout` bounds the wait for the answer (the model's load comes first) and
        the whole stream's silences; once the answer started, `stall` (when smaller)
        bounds each silence between events. An error before the stream starts
        raises its SllmError; an "error" event ends the stream with the SllmError
        it carries.
        """
        if body is None:
            conn, response = self._send(url, path, None, timeout, method="GET")
        else:
            conn, response = self._send(url, path, {**body, "stream": True}, timeout)
        silence = timeout
        try:
            if response.status != 200:
                _answer(response, response.read())
            if stall is not None and stall < timeout and conn.sock is not None:
                silence = stall
                conn.sock.settimeout(stall)
            for line in _lines(response):
                event = json.loads(line)
                if event.get("event") == "error":
                    raise error_from(event, 502)
                yield event
        except TimeoutError as exc:
            raise InvokerLost(
                f"invoker {url} stopped answering mid-stream (silent for {silence:g} s)",
                reason="stalled",
            ) from exc
        except (OSError, http.client.HTTPException, json.JSONDecodeError) as exc:
            raise InvokerLost(f"invoker {url} broke the stream: {exc}") from exc
        finally:
            self._put(url, conn, response)  # closed instead if the rest is still on the wire

    def cancel(self, url: str, generation: str, timeout: float) -> None:
        """Cancel generation `generation` on an invoker (gone or not running: nothing)."""
        try:
            conn, response = self._send(url, f"/v1/generations/{generation}", None, timeout)
            raw = response.read()
        except (InvokerLost, OSError, http.client.HTTPException):
            return
        self._put(url, conn, response)
        with contextlib.suppress(SllmError):
            _answer(response, raw)

    def _send(
        self,
        url: str,
        path: str,
        body: Mapping[str, Any] | None,
        timeout: float,
        method: str | None = None,
    ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        """POST `body` (DELETE `path` without one, or `method`); the response, body unread."""
        method = method or ("POST" if body is not None else "DELETE")
        payload = json.dumps(body).encode() if body is not None else None
        while True:
            conn, reused = self._take(url)
            try:
                if conn.sock is None:
                    conn.connect()  # under the connect timeout
                conn.sock.settimeout(timeout)
            except OSError as exc:
                conn.close()
                raise InvokerLost(
                    f"invoker {url} is unreachable: {exc}", reason="unreachable"
                ) from exc
            sent = time.monotonic()
            try:
                conn.request(method, path, body=payload, headers=self._headers)
                return conn, conn.getresponse()
            except TimeoutError as exc:
                conn.close()
                raise InvokerLost(
                    f"invoker {url} did not answer within {timeout:.0f} s", reason="stalled"
                ) from exc
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected) as exc:
                conn.close()
                # A reused connection the invoker closed just as it was taken (the check in
                # _take came too early): refused at once, nothing ran. Anything later may
                # have run, and is not sent again.
                if reused and time.monotonic() - sent < STALE_CLOSE_WINDOW_S:
                    continue
                raise InvokerLost(f"invoker {url} broke the connection: {exc}") from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise InvokerLost(f"invoker {url} broke the connection: {exc}") from exc

    def _take(self, url: str) -> tuple[http.client.HTTPConnection, bool]:
        while True:
            with self._lock:
                idle = self._idle.get(url)
                conn = idle.pop() if idle else None
            if conn is None:
                break
            if _usable(conn):
                return conn, True
            conn.close()  # closed by the invoker while idle (keep-alive timeout, restart)
        parts = urlsplit(url)
        if parts.scheme == "https":
            return http.client.HTTPSConnection(
                parts.hostname or "", parts.port, timeout=self._connect
            ), False
        return http.client.HTTPConnection(
            parts.hostname or "", parts.port, timeout=self._connect
        ), False

    def _put(
        self, url: str, conn: http.client.HTTPConnection, response: http.client.HTTPResponse
    ) -> None:
        # Only a response read to its end leaves the connection ready for the next request.
        if response.will_close or not response.isclosed():
            conn.close()
            return
        with self._lock:
            idle = self._idle.setdefault(url, [])
            if len(idle) < self.MAX_IDLE:
                idle.append(conn)
                return
        conn.close()


def _usable(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection is usable while nothing waits to be read on it.

    Readable while idle means the invoker closed it (or sent something it
    should not have): either way it cannot carry the next request.
    """
    if conn.sock is None:
        return False
    poller = select.poll()
    poller.register(conn.sock, select.POLLIN)
    return not poller.poll(0)


def _lines(response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The non-blank lines of a streamed body, as they arrive.

    On `read1`, not `readline`: readline takes a chunked body cut short (the
    invoker died) for its end, read1 raises IncompleteRead.
    """
    pending = b""
    while True:
        data = response.read1(65536)
        if not data:
            if response.length:  # a length-delimited body cut short
                raise http.client.IncompleteRead(pending, response.length)
            response.read()  # b"": marks a length-delimited body finished (closes it)
            if pending.strip():
                yield pending
            return
        pending += data
        while True:
            line, newline, rest = pending.partition(b"\n")
            if not newline:
                break
            pending = rest
            if line.strip():
                yield line


def _answer(response: http.client.HTTPResponse, raw: bytes) -> Any:
    try:
        doc = json.loads(raw)
    except ValueError:
        doc = None
    if response.status >= 400:
        raise error_from(doc, response.status, response.getheader("Retry-After"))
    return doc
