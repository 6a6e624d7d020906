"""A resumable stream's feed (invoker/_feed.py): the primary reader steps it, leaving early
detaches it (a thread steps on), followers read everything from the start, and a detached
feed nobody reads is closed after its grace."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import Any

from invoker._feed import Feed
from sllm.core.errors import PlatformError
from tests.support.waiting import wait_until


class Source:
    """An event stream of `n` tokens, each released by `gate` (or at once)."""

    def __init__(self, n: int, gate: threading.Semaphore | None = None) -> None:
        self.n, self.gate = n, gate
        self.closed_at: int | None = None  # tokens produced when it was closed

    def events(self) -> Generator[dict[str, Any], None, None]:
        produced = 0
        try:
            yield {"event": "start"}
            for i in range(1, self.n + 1):
                if self.gate is not None:
                    self.gate.acquire()
                produced = i
                yield {"event": "token", "index": i}
            yield {"event": "done"}
        except GeneratorExit:
            self.closed_at = produced
            raise


def test_the_primary_reader_reads_the_stream_and_a_follower_gets_it_all() -> None:
    src = Source(5)
    feed = Feed(src.events(), grace=10)
    assert [e.get("index") for e in feed.primary()] == [None, 1, 2, 3, 4, 5, None]
    assert feed.ended and src.closed_at is None
    assert [e.get("index") for e in feed.follow()] == [None, 1, 2, 3, 4, 5, None]


def test_a_primary_leaving_early_detaches_and_the_stream_runs_on() -> None:
    src = Source(50)
    feed = Feed(src.events(), grace=10)
    reader = feed.primary()
    assert next(reader)["event"] == "start" and next(reader)["index"] == 1
    reader.close()
    assert feed.detached
    wait_until(lambda: feed.ended, 5, "the detached stream run to its end")
    assert src.closed_at is None  # not cancelled
    assert [e.get("index") for e in feed.follow()][-2:] == [50, None]


def test_a_detached_feed_without_readers_is_closed_after_the_grace() -> None:
    gate = threading.Semaphore(0)
    src = Source(1000, gate)
    feed = Feed(src.events(), grace=0.3)
    reader = feed.primary()
    next(reader)
    gate.release()
    next(reader)
    reader.close()
    began = time.monotonic()
    for _ in range(20):  # tokens keep coming while nobody reads
        gate.release()
        time.sleep(0.02)
    wait_until(lambda: feed.ended, 5, "the abandoned stream closed")
    for _ in range(5):
        gate.release()  # a step blocked on the gate ends
    assert src.closed_at is not None and src.closed_at < 1000
    assert time.monotonic() - began >= 0.3


def test_a_follower_keeps_a_detached_feed_alive_past_the_grace() -> None:
    gate = threading.Semaphore(0)
    src = Source(30, gate)
    feed = Feed(src.events(), grace=0.2)
    reader = feed.primary()
    next(reader)
    reader.close()
    got: list[Any] = []
    follower = threading.Thread(target=lambda: got.extend(feed.follow()))
    follower.start()
    time.sleep(0.4)  # past the grace, with a reader attached
    for _ in range(30):
        gate.release()
    follower.join(5)
    assert [e.get("index") for e in got][-2:] == [30, None] and src.closed_at is None


def test_no_grace_cancels_at_once_and_an_error_reaches_every_reader() -> None:
    src = Source(10)
    feed = Feed(src.events(), grace=0)
    reader = feed.primary()
    next(reader)
    reader.close()
    assert feed.ended and src.closed_at == 0

    def failing() -> Generator[dict[str, Any], None, None]:
        yield {"event": "start"}
        raise PlatformError("boom")

    feed = Feed(failing(), grace=5)
    out: list[Any] = []
    try:
        for ev in feed.primary():
            out.append(ev)
    except PlatformError as exc:
        out.append(exc.message)
    assert out == [{"event": "start"}, "boom"]
    followed: list[Any] = []
    try:
        for ev in feed.follow():
            followed.append(ev)
    except PlatformError as exc:
        followed.append(exc.message)
    assert followed == out
