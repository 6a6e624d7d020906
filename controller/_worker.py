"""The controller's gunicorn worker: gthread, with each request head read before a thread is taken.

gunicorn's gthread worker hands a connection to a pool thread as soon as its
first byte arrives, and the thread then blocks until the whole head is in: a
few dozen clients sending their headers slowly hold every thread, and the
controller stops answering. This worker collects the head in its event loop
without blocking, as nginx or Knative's queue-proxy would in front of it, and
takes a thread only for a complete head. The limits (`ConnectionLimits`):

    header_timeout    the head must be complete this long after the connection
                      opened (on a kept-alive connection: after the next
                      request's first byte; before that, gunicorn's keep-alive
                      timeout applies): 408, connection closed
    max_header_bytes  a larger head: 431, connection closed
    body_timeout      the thread reads the rest of the request (the body) for at
                      most this long after the head: 408, connection closed; a
                      body the app did not read (an unauthenticated request's)
                      is not waited for: the connection closes
    connections       gunicorn's worker_connections per worker; beyond it new
                      connections wait in the listen backlog

A connection closed after an answer lingers (its late bytes are discarded
for up to 2 s, so a reset cannot destroy the answer) in the poller; gunicorn
lingers blocking its event loop, which stalls every connection of the worker
behind clients that never close.

Errors gunicorn itself answers (a bad request line, headers over its limits)
use the API's JSON error shape, not gunicorn's HTML page. TLS is not handled
here (the controller serves plain HTTP behind an ingress).
"""

from __future__ import annotations

import contextlib
import errno
import http
import json
import selectors
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from gunicorn import util
from gunicorn.http import errors as gerrors
from gunicorn.workers.gthread import TConn, ThreadWorker
from werkzeug.exceptions import RequestTimeout

HEAD_ENDS = (b"\r\n\r\n", b"\n\n")
UNREAD_BODY_GRACE_S = 0.05  # how long the rest of a body the app did not read may take
LINGER_S = 2.0  # how long a closing connection's late bytes are read and discarded


@dataclass(frozen=True)
class ConnectionLimits:
    """How long and how much a client may take to send a request."""

    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_header_bytes: int = 64 * 1024


class ReadTimeout(RequestTimeout):
    """The request's body did not arrive within the body timeout (408 from the app too)."""

    description = "the request body did not arrive in time"


class _Conn(TConn):
    """A connection with the head bytes read so far and the deadline of the current read."""

    def __init__(self, *args: Any, linger: Callable[[socket.socket], None]) -> None:
        super().__init__(*args)
        self._linger = linger
        self.head = bytearray()
        self.deadline = 0.0
        self.timed_out = False
        self.data_ready = True  # heads arrive complete: a thread never waits for a first byte

    def init(self) -> None:
        """Build the parser (once) and give it the head read by the event loop."""
        fresh = not self.initialized
        super().init()
        if fresh:
            self.parser.unreader.sock = _DeadlineSocket(self)
        if self.head:
            self.parser.unreader.unread(bytes(self.head))
            self.head.clear()

    def close(self, graceful: bool = False) -> None:
        """Close; gracefully means lingering in the event loop, not blocking it (gunicorn's way)."""
        if graceful:
            self._linger(self.sock)
        else:
            super().close()


class _DeadlineSocket:
    """The socket as the request parser reads it: each recv bounded by the connection's deadline.

    Only reads are bounded; the response (a stream may last minutes) is written
    to the socket itself. gunicorn's keep-alive drain sets a shorter timeout of
    its own through settimeout; it applies on top of the deadline.
    """

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._timeout: float | None = None

    def gettimeout(self) -> float | None:
        """The timeout set by the caller (None: only the deadline)."""
        return self._timeout

    def settimeout(self, timeout: float | None) -> None:
        """A per-read timeout on top of the deadline."""
        self._timeout = timeout

    def recv(self, size: int) -> bytes:
        """Up to `size` bytes; ReadTimeout once the deadline passed."""
        conn, sock = self._conn, self._conn.sock
        left = conn.deadline - time.monotonic()
        if left <= 0:
            conn.timed_out = True
            raise ReadTimeout()
        sock.settimeout(left if self._timeout is None else min(left, self._timeout))
        try:
            data: bytes = sock.recv(size)
            return data
        except TimeoutError:
            if conn.deadline - time.monotonic() > 0:
                raise  # the caller's own, shorter timeout
            conn.timed_out = True
            raise ReadTimeout() from None
        finally:
            sock.settimeout(None)


class ControllerWorker(ThreadWorker):
    """gthread with heads read in the event loop, read deadlines and JSON errors."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits: ConnectionLimits = getattr(self.app, "connection_limits", ConnectionLimits())
        self.heads: deque[_Conn] = deque()  # sorted by deadline: all get the same timeout
        self.lingering: dict[socket.socket, float] = {}  # in deadline order, as inserted

    def accept(self, listener: socket.socket) -> None:
        """A new connection waits in the event loop for its head."""
        try:
            sock, addr = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = _Conn(self.cfg, sock, addr, listener.getsockname(), linger=self._linger)
        self._await_head(conn)

    def on_client_socket_readable(self, conn: _Conn, client: socket.socket) -> None:
        """A kept-alive connection's next request began: its head is awaited like a new one's."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._await_head(conn)

    def enqueue_req(self, conn: _Conn) -> None:
        """Hand a connection to a thread once its head is complete."""
        if conn.parser is not None and conn.parser.unreader.buf.getvalue():
            # Pipelined bytes read ahead past the last request: perhaps only part of a head.
            conn.head[:0] = conn.parser.unreader.take_buffered()
        if _head_end(conn.head, 0) < 0:
            self._await_head(conn)
            return
        super().enqueue_req(conn)

    def handle(self, conn: _Conn) -> Any:
        """Serve one request (in a thread), its body read under the body timeout."""
        conn.deadline = time.monotonic() + self.limits.body_timeout
        return super().handle(conn)

    def _keepalive_after(self, conn: _Conn, keepalive: bool) -> bool:
        """Keep the connection only if what the app left of the body is already here.

        gunicorn waits up to 5 s for the rest of an unread body (a 401 before
        the upload was read, say); a client trickling it would hold the thread
        that long, so a body still on its way closes the connection instead.
        """
        if not keepalive or conn.timed_out:  # timed out: the next request's start is unknown
            return False
        try:
            return bool(conn.parser.finish_body(deadline=time.monotonic() + UNREAD_BODY_GRACE_S))
        except ReadTimeout:
            return False

    def murder_pending(self) -> None:
        """Close connections whose head is late or whose linger is over (all when stopping)."""
        super().murder_pending()
        now = time.monotonic()
        while self.lingering:
            sock, deadline = next(iter(self.lingering.items()))
            if deadline > now and self.alive:
                break
            self._end_linger(sock)
        while self.heads and (self.heads[0].deadline <= now or not self.alive):
            conn = self.heads[0]
            late = bool(conn.head) and self.alive
            self._drop_head(
                conn,
                _error_response(
                    408,
                    "request_timeout",
                    f"the request head did not arrive within {self.limits.header_timeout:g} s",
                )
                if late
                else b"",
            )

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """gunicorn's answer to a request it could not parse or serve, as a JSON error."""
        status, code = _classify(exc)
        if status >= 500:
            self.log.exception("Error handling request")
            message = "internal server error"
        else:
            self.log.warning("Invalid request from ip=%s: %s", (addr or ("",))[0], exc)
            message = str(exc) or http.HTTPStatus(status).phrase
        try:
            util.write_nonblock(client, _error_response(status, code, message))
        except OSError:
            self.log.debug("Failed to send error message.")

    def _await_head(self, conn: _Conn) -> None:
        conn.deadline = time.monotonic() + self.limits.header_timeout
        conn.sock.setblocking(False)
        self.heads.append(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_head_bytes, conn))

    def _on_head_bytes(self, conn: _Conn, _sock: socket.socket) -> None:
        try:
            data = conn.sock.recv(self.limits.max_header_bytes + 1)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # the client went away before its request was complete
            self._drop_head(conn, b"")
            return
        start = max(0, len(conn.head) - 3)
        conn.head += data
        if _head_end(conn.head, start) >= 0:
            self.poller.unregister(conn.sock)
            self.heads.remove(conn)
            super().enqueue_req(conn)
        elif len(conn.head) > self.limits.max_header_bytes:
            limit = self.limits.max_header_bytes
            self._drop_head(
                conn,
                _error_response(
                    431,
                    "request_header_fields_too_large",
                    f"the request line and headers exceed {limit} bytes",
                ),
            )

    def _drop_head(self, conn: _Conn, answer: bytes) -> None:
        self.heads.remove(conn)
        self.poller.unregister(conn.sock)
        self.nr_conns -= 1
        if answer:
            with contextlib.suppress(OSError):  # non-blocking, best effort: the client may be gone
                conn.sock.send(answer)
        self._linger(conn.sock)

    def _linger(self, sock: socket.socket) -> None:
        """Close after the client has read the answer: FIN, then discard what it still sends.

        Closing with unread bytes would send a reset that can destroy the
        answer before the client reads it.
        """
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            sock.close()
            return
        sock.setblocking(False)
        self.lingering[sock] = time.monotonic() + LINGER_S
        self.poller.register(sock, selectors.EVENT_READ, self._on_linger_bytes)

    def _on_linger_bytes(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end_linger(sock)  # the client closed (or reset): done

    def _end_linger(self, sock: socket.socket) -> None:
        del self.lingering[sock]
        self.poller.unregister(sock)
        sock.close()


def _head_end(data: bytes | bytearray, start: int) -> int:
    """Where the blank line ending a request head is (-1 when it has not arrived)."""
    found = [i for i in (data.find(end, start) for end in HEAD_ENDS) if i >= 0]
    return min(found) if found else -1


# gunicorn's parse errors whose status is not 400; checked in order (subclasses first).
_STATUSES: tuple[tuple[type[BaseException], int, str], ...] = (
    (ReadTimeout, 408, "request_timeout"),
    (gerrors.InvalidResponseHeader, 500, "internal"),
    (gerrors.InvalidResponseHeaderName, 500, "internal"),
    (gerrors.ConfigurationProblem, 500, "internal"),
    (gerrors.LimitRequestLine, 414, "uri_too_long"),
    (gerrors.LimitRequestHeaders, 431, "request_header_fields_too_large"),
    (gerrors.ExpectationFailed, 417, "expectation_failed"),
    (gerrors.ForbiddenProxyRequest, 403, "forbidden"),
    (gerrors.UnsupportedTransferCoding, 501, "not_implemented"),
    (gerrors.ParseException, 400, "bad_request"),
)


def _classify(exc: BaseException) -> tuple[int, str]:
    for cls, status, code in _STATUSES:
        if isinstance(exc, cls):
            return status, code
    return 500, "internal"


def _error_response(status: int, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response carrying `{"error": {"code", "message"}}`; it closes."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = (
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
        "Connection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("latin-1") + body
