"""A resumable stream's events, recorded, so that it outlives its reader: detach and attach.

    feed = Feed(events, grace)       wrap one invocation's event stream (see _stream)
    feed.primary()                   the requester's reader: it steps the generation itself
    feed.follow()                    another reader: every event from the first, then live

A resumable generation (the controller's relay asks for every one) must not end because
its controller went away: the controller replica may have died, or its client dropped
the connection and will reconnect, to that replica or another, with `Last-Event-ID`.
So when the primary reader leaves before the end, the feed detaches: a thread of its own
steps the generation on, and any reader may attach (`GET /v1/generations/{id}/events`,
see _app) and read the whole stream from its start event, then live. While nobody reads,
the generation runs at most `grace` seconds more; then the stream is closed, which
cancels it (its finish reads "cancelled") and frees its memory. A reader that attaches
and leaves again restarts that clock.

States (data: the recorded events, the readers, who steps the stream):

    attached(primary steps it) --primary leaves early---------> detached(thread steps it)
    detached --no reader for `grace` s-------------------------> ended (cancelled)
    attached | detached --the stream's last event--------------> ended

Only one thread steps the stream at a time: the primary reader until it leaves, then the
feed's thread. Followers wait for what the stepping thread records. The events are kept
until the feed is dropped with its registry entries (_generations RETAIN_S after the end),
a few hundred bytes per token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator
from typing import Any

from sllm.core.errors import SllmError

log = logging.getLogger("sllm.invoker")
Event = dict[str, Any]
WAIT_S = 0.5  # a follower wakes this often to see whether the feed ended


class Feed:
    """One invocation's events, recorded as they are read (see the module docstring)."""

    def __init__(
        self,
        events: Generator[Event, None, None],
        grace: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._events = events
        self._grace = grace
        self._clock = clock
        self._log: list[Event] = []
        self._cond = threading.Condition()
        self._ended = False
        self._error: SllmError | None = None
        self._detached = False
        self._readers = 0
        self._unread_since = 0.0  # when the last follower left (detached feeds)

    @property
    def ended(self) -> bool:
        return self._ended

    @property
    def detached(self) -> bool:
        return self._detached

    def primary(self) -> Generator[Event, None, None]:
        """The requester's stream: it steps the generation; leaving early detaches it."""
        pos = 0
        try:
            while True:
                with self._cond:
                    if pos < len(self._log):
                        event = self._log[pos]
                    elif self._ended:
                        if self._error is not None:
                            raise self._error
                        return
                    else:
                        event = None
                if event is None:
                    self._step()  # records the next event, or the end
                    continue
                pos += 1
                yield event
        except GeneratorExit:
            self._detach()
            raise

    def follow(self) -> Generator[Event, None, None]:
        """Every event from the start event on, then the live ones, to the end."""
        pos = 0
        with self._cond:
            self._readers += 1
        try:
            while True:
                with self._cond:
                    while pos >= len(self._log) and not self._ended:
                        self._cond.wait(WAIT_S)
                    if pos >= len(self._log):
                        if self._error is not None:
                            raise self._error
                        return
                    batch = self._log[pos:]
                pos += len(batch)
                yield from batch
        finally:
            with self._cond:
                self._readers -= 1
                self._unread_since = self._clock()

    # ------------------------------------------------------------ stepping
    def _step(self) -> bool:
        """Read the stream's next event into the log; False at its end."""
        try:
            event = next(self._events)
        except StopIteration:
            self._finish(None)
            return False
        except SllmError as exc:
            self._finish(exc)
            return False
        except BaseException:
            self._finish(None)
            raise
        with self._cond:
            self._log.append(event)
            self._cond.notify_all()
        return True

    def _finish(self, error: SllmError | None) -> None:
        with self._cond:
            self._ended, self._error = True, error
            self._cond.notify_all()

    def _detach(self) -> None:
        """The primary reader left before the end: step on in a thread of the feed's own."""
        with self._cond:
            if self._ended:
                return
            self._detached = True
            self._unread_since = self._clock()
        if self._grace <= 0:
            self._events.close()  # no grace: the generation is cancelled at once
            self._finish(None)
            return
        threading.Thread(target=self._run_detached, daemon=True, name="sllm-detached").start()

    def _run_detached(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._readers == 0 and self._clock() - self._unread_since > self._grace:
                        abandoned = True
                        break
                if not self._step():
                    abandoned = False
                    break
        except Exception:  # a failure is recorded in the stream already; nothing reads it
            log.exception("a detached generation's stream failed")
            self._finish(None)
            return
        if abandoned:
            log.info("a detached generation had no reader for %.0f s: cancelled", self._grace)
            self._events.close()  # GeneratorExit in _stream.events: it ends "cancelled"
            self._finish(None)
