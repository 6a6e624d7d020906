"""An invoker's own drain on SIGTERM: refuse new work, let what runs finish (bounded), exit.

A rolling restart (`kill -TERM` of one invoker while others serve) then loses
no stream that can finish within the grace: the controller hears of the drain
at once (the next heartbeat is sent right away and says "draining"), stops
sending new work here, and a request that raced it is refused with 503
`draining` + Retry-After, which the controller retries on another instance.
The generation endpoints keep answering meanwhile, so running generations can
be read, paused or moved away.

States / data / events:

    serving   --begin() (SIGTERM)----------------------------->  draining
    draining  --nothing runs, or the grace ran out (wait())-->  (the process exits)

data: `since` (wall clock, reported to the controller), the grace, and the
work requests inside a view right now (admitted before the drain began; a
generation is registered before its view returns, so views in progress plus
running generations cover every piece of work without a gap).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from sllm.core.errors import Draining

POLL_S = 0.1
RETRY_AFTER_S = 1.0


class Drain:
    """Admission of work requests, and the wait for them at shutdown."""

    def __init__(
        self,
        grace_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._views = 0
        self.since: float | None = None  # epoch seconds when the drain began

    @property
    def draining(self) -> bool:
        """Whether the drain began."""
        return self.since is not None

    def begin(self) -> bool:
        """Start draining; False when it had begun already (SIGTERM may come twice)."""
        with self._lock:
            if self.since is not None:
                return False
            self.since = time.time()
            return True

    def admit(self) -> None:
        """Let one work request in (count it until `leave`); Draining once the drain began."""
        with self._lock:
            if self.since is not None:
                raise Draining(
                    "this invoker is draining (shutting down): it takes no new work",
                    retry_after=RETRY_AFTER_S,
                )
            self._views += 1

    def leave(self) -> None:
        """An admitted request's view returned (its generations, if any, are registered)."""
        with self._lock:
            self._views -= 1

    def report(self) -> dict[str, Any] | None:
        """What the heartbeat says of the drain: null, or {since, grace_s}."""
        if self.since is None:
            return None
        return {"since": self.since, "grace_s": self.grace_s}

    def wait(self, running: Callable[[], int]) -> int:
        """Wait until no work is in a view and `running()` (generations) is 0, or the grace ran
        out; what still runs then (0: everything finished)."""
        deadline = self._clock() + self.grace_s
        while True:
            with self._lock:
                busy = self._views
            busy += running()
            if busy == 0 or self._clock() >= deadline:
                return busy
            self._sleep(min(POLL_S, max(0.0, deadline - self._clock())))
