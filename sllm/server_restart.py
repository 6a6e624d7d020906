"""When the embedded server restarts a child that died: bounded retries, exponential backoff.

A child that had run for `stable_s` or longer when it died starts a new series of
restarts; within a series the k-th restart waits min(first_delay_s * 2**(k-1),
max_delay_s), and after `max_restarts` restarts in one series the supervisor gives
up (as Kubernetes' CrashLoopBackOff would, but bounded, so a broken install ends
with an exit status instead of looping forever).

Example, with the defaults (5 restarts, 1 s doubling up to 30 s, stable after 60 s):
an invoker that dies at once every time is restarted after 1, 2, 4, 8 and 16 s, then
the server stops with status 1; one that dies once a day is restarted after 1 s each
time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RestartPolicy:
    """How often, and how soon, a dead child is started again."""

    max_restarts: int = 5
    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_s: float = 60.0

    def next_restart(self, restarts: int, uptime_s: float) -> tuple[float, int] | None:
        """(seconds to wait, restarts in the series with this one), or None to give up.

        `restarts` counts the series so far; `uptime_s` is how long the child ran.
        """
        if uptime_s >= self.stable_s:
            restarts = 0
        if restarts >= self.max_restarts:
            return None
        return min(self.first_delay_s * 2**restarts, self.max_delay_s), restarts + 1
