"""The embedded server's restart policy for a dead invoker: bounded, with backoff."""

from __future__ import annotations

import pytest

from sllm.server_restart import RestartPolicy

POLICY = RestartPolicy(max_restarts=5, first_delay_s=1.0, max_delay_s=30.0, stable_s=60.0)


@pytest.mark.parametrize(
    ("restarts", "uptime", "expected"),
    [
        (0, 0.5, (1.0, 1)),
        (1, 0.5, (2.0, 2)),
        (4, 0.5, (16.0, 5)),
        (5, 0.5, None),  # the sixth crash in a row: give up
        (5, 60.0, (1.0, 1)),  # it had been up long enough: a new series
        (3, 59.9, (8.0, 4)),
    ],
    ids=["first", "second", "fifth", "give-up", "stable-resets", "not-yet-stable"],
)
def test_next_restart(restarts: int, uptime: float, expected: tuple[float, int] | None) -> None:
    assert POLICY.next_restart(restarts, uptime) == expected


def test_the_delay_is_capped() -> None:
    policy = RestartPolicy(max_restarts=20, first_delay_s=1.0, max_delay_s=30.0)
    assert policy.next_restart(10, 0.0) == (30.0, 11)


def test_a_crash_loop_ends_after_max_restarts_with_doubling_delays() -> None:
    delays = []
    restarts = 0
    for _ in range(10):  # more crashes than the policy allows
        plan = POLICY.next_restart(restarts, 0.1)
        if plan is None:
            break
        delay, restarts = plan
        delays.append(delay)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0]
