"""The controller's invoker client (http.client, pooled) against scripted loopback servers.

Each server answers a fixed script per connection, so the tests can cut a
chunked stream short, close an idle keep-alive connection, or go silent,
which a real invoker does only when it dies.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from sllm.controller._invokers import InvokerClient, InvokerLost
from sllm.core.errors import Overloaded, PlatformError


class Peer:
    """The server's side of one connection: read whole requests (recorded), send bytes."""

    def __init__(self, conn: socket.socket, n: int, requests: list[bytes]) -> None:
        self.conn, self.n, self._requests = conn, n, requests

    def read(self) -> bytes:
        """The next request, or b"" once the client closed the connection."""
        req = _read_request(self.conn)
        if req:
            self._requests.append(req)
        return req

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)


Script = Callable[[Peer], None]
SILENT_FOR = 30.0  # how long a silent server holds a connection at most (released earlier)


def _read_request(conn: socket.socket) -> bytes:
    """One whole request (headers + Content-Length body), or b"" when the peer closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:  # the client closed with unread data: closed all the same
            return b""
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(body) < length:
        body += conn.recv(65536)
    return head + b"\r\n\r\n" + body


def _json_answer(doc: object, status: str = "200 OK", extra: str = "") -> bytes:
    body = json.dumps(doc).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


@contextmanager
def scripted_server(script: Script) -> Iterator[tuple[str, list[bytes]]]:
    """A loopback server running `script` on each accepted connection; yields (url, requests)."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.settimeout(0.2)
    requests: list[bytes] = []
    stop = threading.Event()

    def accept() -> None:
        index = 0
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            peer, index = Peer(conn, index, requests), index + 1

            def run(peer: Peer = peer) -> None:
                with peer.conn:
                    script(peer)

            threading.Thread(target=run, daemon=True).start()

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}", requests
    finally:
        stop.set()
        srv.close()
        t.join(timeout=5)


def test_call_posts_json_with_the_token_and_reuses_the_connection() -> None:
    accepted: list[int] = []

    def script(peer: Peer) -> None:
        accepted.append(peer.n)
        while peer.read():
            peer.send(_json_answer({"ok": True, "conn": peer.n}))

    client = InvokerClient("tok")
    with scripted_server(script) as (url, requests):
        first = client.call(url, "/v1/invoke", {"prompt": "hi"}, 5.0)
        second = client.call(url, "/v1/invoke", {"prompt": "again"}, 5.0)
        client.close()
    assert first == {"ok": True, "conn": 0}
    assert second == {"ok": True, "conn": 0}, "the keep-alive connection was not reused"
    assert accepted == [0]
    head, _, body = requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"POST /v1/invoke HTTP/1.1")
    assert b"Authorization: Bearer tok" in head
    assert json.loads(body) == {"prompt": "hi"}


def test_an_idle_connection_the_invoker_closed_is_replaced_transparently() -> None:
    closed = threading.Event()

    def script(peer: Peer) -> None:
        if peer.read():
            # Keep-alive promised, then closed while idle (a restart, an idle timeout).
            peer.send(_json_answer({"conn": peer.n}))
            peer.conn.close()
            closed.set()

    client = InvokerClient("tok")
    with scripted_server(script) as (url, requests):
        assert client.call(url, "/x", {}, 5.0) == {"conn": 0}
        assert closed.wait(10), "the server did not close connection 0"
        assert client.call(url, "/x", {}, 5.0) == {"conn": 1}
        client.close()
    assert len(requests) == 2, "the request must reach the invoker exactly once more"


def test_error_answers_become_their_sllm_errors() -> None:
    def script(peer: Peer) -> None:
        if peer.read():
            peer.send(
                _json_answer(
                    {"error": {"code": "overloaded", "message": "full"}},
                    "429 Too Many Requests",
                    "Retry-After: 2\r\n",
                )
            )

    client = InvokerClient("tok")
    with scripted_server(script) as (url, _):
        with pytest.raises(Overloaded) as err:
            client.call(url, "/v1/invoke", {}, 5.0)
        client.close()
    assert err.value.message == "full"
    assert err.value.retry_after == 2.0


def test_refused_and_silent_invokers_are_lost() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    client = InvokerClient("tok", connect_timeout=1.0)
    with pytest.raises(InvokerLost, match="unreachable"):
        client.call(f"http://127.0.0.1:{port}", "/v1/invoke", {}, 5.0)

    released = threading.Event()

    def silent(peer: Peer) -> None:
        peer.read()
        released.wait(SILENT_FOR)  # no answer until the test is over

    with scripted_server(silent) as (url, _):
        started = time.monotonic()
        with pytest.raises(InvokerLost, match="did not answer"):
            client.call(url, "/v1/invoke", {}, 0.3)
        # Gave up on its own timeout, long before the server would have said anything.
        assert time.monotonic() - started < SILENT_FOR / 2
        released.set()
    client.close()


def test_stream_yields_events_split_across_chunks_and_reuses_the_connection() -> None:
    def script(peer: Peer) -> None:
        while peer.read():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            peer.send(_chunk(b'{"event": "start"}\n{"event": "tok'))
            peer.send(_chunk(b'en", "text": "a"}\n\n'))
            peer.send(_chunk(b'{"event": "done", "conn": %d}\n' % peer.n))
            peer.send(b"0\r\n\r\n")

    client = InvokerClient("tok")
    with scripted_server(script) as (url, requests):
        events = list(client.stream(url, {"prompt": "x"}, 5.0))
        again = list(client.stream(url, {"prompt": "y"}, 5.0))
        client.close()
    assert [e["event"] for e in events] == ["start", "token", "done"]
    assert events[1]["text"] == "a"
    assert again[-1] == {"event": "done", "conn": 0}
    assert json.loads(requests[0].partition(b"\r\n\r\n")[2]) == {"prompt": "x", "stream": True}


def test_a_stream_cut_short_is_an_invoker_loss_not_an_end() -> None:
    def script(peer: Peer) -> None:
        if peer.read():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            peer.send(_chunk(b'{"event": "start"}\n'))
            peer.send(_chunk(b'{"event": "token", "text": "a"}\n'))
            peer.conn.shutdown(socket.SHUT_WR)  # the invoker died: no terminating chunk

    client = InvokerClient("tok")
    seen: list[str] = []
    with scripted_server(script) as (url, _):
        with pytest.raises(InvokerLost, match="broke the stream"):
            for event in client.stream(url, {}, 5.0):
                seen.append(event["event"])
        client.close()
    assert seen == ["start", "token"]


def test_error_event_ends_the_stream_with_its_error() -> None:
    def script(peer: Peer) -> None:
        if peer.read():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            peer.send(_chunk(b'{"event": "start"}\n'))
            err = {"event": "error", "error": {"code": "platform_error", "message": "boom"}}
            peer.send(_chunk(json.dumps(err).encode() + b"\n"))
            peer.send(b"0\r\n\r\n")

    client = InvokerClient("tok")
    with scripted_server(script) as (url, _):
        with pytest.raises(PlatformError, match="boom"):
            list(client.stream(url, {}, 5.0))
        client.close()


def test_closing_a_stream_early_drops_its_connection() -> None:
    accepted: list[int] = []

    def script(peer: Peer) -> None:
        accepted.append(peer.n)
        while peer.read():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for _ in range(3):
                peer.send(_chunk(b'{"event": "token"}\n'))
            peer.send(b"0\r\n\r\n")

    client = InvokerClient("tok")
    with scripted_server(script) as (url, _):
        events = client.stream(url, {}, 5.0)
        assert next(events)["event"] == "token"
        events.close()  # the client went away: the rest is still on the wire
        assert len(list(client.stream(url, {}, 5.0))) == 3
        client.close()
    assert accepted == [0, 1], "a half-read connection must not go back to the pool"


def test_a_length_delimited_stream_leaves_a_clean_connection() -> None:
    accepted: list[int] = []

    def script(peer: Peer) -> None:
        accepted.append(peer.n)
        while peer.read():
            body = b'{"event": "start"}\n{"event": "done"}\n'
            peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    client = InvokerClient("tok")
    with scripted_server(script) as (url, requests):
        for _ in range(3):
            assert [e["event"] for e in client.stream(url, {}, 5.0)] == ["start", "done"]
        client.close()
    assert accepted == [0] and len(requests) == 3


def test_a_stream_refused_up_front_raises_its_error() -> None:
    def script(peer: Peer) -> None:
        if peer.read():
            peer.send(
                _json_answer(
                    {"error": {"code": "overloaded", "message": "queue full"}},
                    "429 Too Many Requests",
                )
            )

    client = InvokerClient("tok")
    with scripted_server(script) as (url, _):
        with pytest.raises(Overloaded, match="queue full"):
            list(client.stream(url, {}, 5.0))
        client.close()


def test_a_stream_that_goes_silent_is_lost_within_its_timeout() -> None:
    released = threading.Event()

    def script(peer: Peer) -> None:
        if peer.read():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            peer.send(_chunk(b'{"event": "start"}\n'))
            released.wait(SILENT_FOR)  # nothing more until the test is over

    client = InvokerClient("tok")
    with scripted_server(script) as (url, _):
        started = time.monotonic()
        with pytest.raises(InvokerLost, match="stopped answering"):
            list(client.stream(url, {}, 0.3))
        assert time.monotonic() - started < SILENT_FOR / 2
        released.set()
        client.close()


def test_a_request_the_invoker_dropped_after_reading_is_not_sent_again() -> None:
    def script(peer: Peer) -> None:
        if peer.read():
            peer.send(_json_answer({"ok": True}))  # keep-alive: the next call reuses this
        if peer.read():
            time.sleep(0.2)  # it ran a while, then the invoker died: no answer

    client = InvokerClient("tok")
    with scripted_server(script) as (url, requests):
        assert client.call(url, "/v1/invoke", {}, 5.0) == {"ok": True}
        with pytest.raises(InvokerLost, match="broke the connection"):
            client.call(url, "/v1/invoke", {}, 5.0)
        client.close()
    assert len(requests) == 2, "the dropped request must not be sent again"


def test_a_started_stream_silent_past_its_stall_bound_is_lost_as_stalled() -> None:
    """The answer may take the whole timeout (a cold load); once it streams, a silence
    longer than `stall` is a lost invoker, long before the timeout."""
    released = threading.Event()

    def script(peer: Peer) -> None:
        if peer.read():
            time.sleep(0.4)  # loading: longer than the stall bound, within the timeout
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            peer.send(_chunk(b'{"event": "start"}\n'))
            released.wait(SILENT_FOR)

    client = InvokerClient("tok")
    seen: list[str] = []
    with scripted_server(script) as (url, requests):
        started = time.monotonic()
        with pytest.raises(InvokerLost, match="stopped answering") as err:
            for event in client.stream(url, {}, SILENT_FOR, path="/v1/generations", stall=0.2):
                seen.append(event["event"])
        took = time.monotonic() - started
        released.set()
        client.close()
    assert seen == ["start"]
    assert err.value.reason == "stalled"
    assert 0.55 <= took < 5, took
    assert requests[0].startswith(b"POST /v1/generations HTTP/1.1")


def test_losses_say_how_the_invoker_was_lost() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there
    client = InvokerClient("tok", connect_timeout=1.0)
    with pytest.raises(InvokerLost) as refused:
        list(client.stream(f"http://127.0.0.1:{port}", {}, 5.0))
    assert refused.value.reason == "unreachable"

    def cut(peer: Peer) -> None:
        if peer.read():
            peer.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            peer.send(_chunk(b'{"event": "start"}\n'))
            peer.conn.shutdown(socket.SHUT_WR)

    with scripted_server(cut) as (url, _), pytest.raises(InvokerLost) as broken:
        list(client.stream(url, {}, 5.0))
    assert broken.value.reason == "broken"
    client.close()


def test_cancel_deletes_the_generation_and_ignores_an_invoker_that_is_gone() -> None:
    def script(peer: Peer) -> None:
        while peer.read():
            peer.send(_json_answer({"error": {"code": "not_found", "message": "gone"}}, "404 X"))

    client = InvokerClient("tok")
    with scripted_server(script) as (url, requests):
        client.cancel(url, "act.1", 1.0)  # not running there: nothing to do, no error
        client.close()
    assert requests[0].startswith(b"DELETE /v1/generations/act.1 HTTP/1.1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client.cancel(f"http://127.0.0.1:{port}", "act.1", 1.0)  # unreachable: no error either
