"""The invoker's own drain: admission of work requests, and the bounded wait at SIGTERM."""

from __future__ import annotations

import pytest

from sllm.core.errors import Draining, Overloaded, error_class
from sllm.invoker._drain import Drain


class FakeClock:
    """A clock that moves only when the drain sleeps."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def _drain(grace: float = 10.0) -> tuple[Drain, FakeClock]:
    clock = FakeClock()
    return Drain(grace, clock=clock, sleep=clock.sleep), clock


def test_after_the_drain_begins_work_is_refused_with_a_retryable_503() -> None:
    drain, _ = _drain()
    drain.admit()  # before: let in
    assert drain.report() is None and drain.begin() and not drain.begin()  # SIGTERM twice
    with pytest.raises(Draining) as refused:
        drain.admit()
    exc = refused.value
    assert (exc.status, exc.code, exc.retry_after) == (503, "draining", 1.0)
    # The controller retries it elsewhere as it does an overloaded invoker's refusal.
    assert isinstance(exc, Overloaded) and error_class("draining") is Draining
    report = drain.report()
    assert report is not None and report["grace_s"] == 10.0 and report["since"] > 0


def test_the_wait_ends_when_the_last_view_and_generation_are_done() -> None:
    drain, clock = _drain()
    drain.admit()
    drain.begin()
    running = [2]

    def generations() -> int:
        # The view returns at t=0.3 (its generations registered); they end at t=1 and t=2.
        if clock.now >= 0.3 and drain._views:
            drain.leave()
        running[0] = 2 if clock.now < 1 else 1 if clock.now < 2 else 0
        return running[0]

    assert drain.wait(generations) == 0
    assert 2.0 <= clock.now < 2.2  # polled every POLL_S, no longer


def test_the_wait_gives_up_after_the_grace_with_what_still_runs() -> None:
    drain, clock = _drain(grace=3.0)
    drain.begin()
    assert drain.wait(lambda: 4) == 4
    assert clock.now == pytest.approx(3.0)


def test_nothing_running_ends_the_wait_at_once() -> None:
    drain, clock = _drain()
    drain.begin()
    assert drain.wait(lambda: 0) == 0 and clock.slept == []
