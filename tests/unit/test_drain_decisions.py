"""The drain's pure decisions: one pass over a draining invoker, the state a heartbeat leaves,
the default grace, and reading what invokers report."""

from __future__ import annotations

from typing import Any

import pytest

from sllm.controller._drain import (
    BY_ADMIN,
    BY_INVOKER,
    MAX_GRACE_S,
    DrainRecord,
    DrainSnapshot,
    InstanceRow,
    Reported,
    after_heartbeat,
    default_grace,
    finished,
    plan_drain,
    reported_drain,
    running_count,
    running_generations,
)

T0 = 1000.0
RECORD = DrainRecord(BY_ADMIN, T0, 60.0)


def _snap(instances: list[InstanceRow], generations: list[str], at: float) -> DrainSnapshot:
    return DrainSnapshot(RECORD, instances, generations, T0 + at)


READY_BUSY = InstanceRow(1, "ready", 2)
READY_IDLE = InstanceRow(2, "ready", 0)
LOADING = InstanceRow(3, "loading", 1)
UNLOADING_BUSY = InstanceRow(4, "unloading", 1)
UNLOADING_IDLE = InstanceRow(5, "unloading", 0)

# snapshot -> (retire, unload, force, move, done)
PLANS: dict[str, tuple[DrainSnapshot, tuple[Any, ...]]] = {
    "first pass: retire the live ones, unload the idle, move the running": (
        _snap([READY_BUSY, READY_IDLE, LOADING], ["a", "b"], 1),
        ((1, 2, 3), (2,), (), ("a", "b"), False),
    ),
    "retired already: busy ones wait": (
        _snap([UNLOADING_BUSY], ["a"], 10),
        ((), (), (), ("a",), False),
    ),
    "the last one turned idle: unloaded, done at the next pass": (
        _snap([UNLOADING_IDLE], [], 30),
        ((), (5,), (), (), False),
    ),
    "nothing left: done": (_snap([], [], 31), ((), (), (), (), True)),
    "a generation the invoker still runs, no instance row: not done": (
        _snap([], ["c"], 31),
        ((), (), (), ("c",), False),
    ),
    "the grace ran out: the busy ones go too, done": (
        _snap([UNLOADING_BUSY, UNLOADING_IDLE], ["a"], 60),
        ((), (5,), (4,), (), True),
    ),
    "the grace ran out with nothing left: done": (_snap([], [], 90), ((), (), (), (), True)),
}


@pytest.mark.parametrize(("snap", "expected"), PLANS.values(), ids=PLANS.keys())
def test_plan_drain(snap: DrainSnapshot, expected: tuple[Any, ...]) -> None:
    d = plan_drain(snap)
    assert (d.retire, d.unload, d.force, d.move, d.done) == expected


def test_a_drain_ended_by_its_grace_is_recorded_as_forced() -> None:
    cut = _snap([UNLOADING_BUSY], ["a"], 60)
    clean = _snap([], [], 20)
    assert finished(RECORD, plan_drain(cut), cut) == DrainRecord(
        BY_ADMIN, T0, 60.0, finished_at=T0 + 60, forced=True
    )
    assert finished(RECORD, plan_drain(clean), clean).forced is False


MINE = DrainRecord(BY_INVOKER, T0, 30.0, since=T0 - 0.5)
ADMINS = DrainRecord(BY_ADMIN, T0, 60.0)
ADMINS_DONE = DrainRecord(BY_ADMIN, T0, 60.0, finished_at=T0 + 5)
SAYS = Reported(since=T0 - 0.5, grace_s=30.0)
NOW = T0 + 10

# (record, reported) -> (state, record)
HEARTBEATS: dict[str, tuple[Any, Any, tuple[str, Any]]] = {
    "serving": (None, None, ("active", None)),
    "begins to drain itself": (
        None,
        SAYS,
        ("draining", DrainRecord(BY_INVOKER, NOW, 30.0, since=SAYS.since)),
    ),
    "still draining itself": (MINE, SAYS, ("draining", MINE)),
    "a new process (says nothing): its own drain is over": (MINE, None, ("active", None)),
    "a new process draining again: a new drain": (
        MINE,
        Reported(since=NOW, grace_s=5.0),
        ("draining", DrainRecord(BY_INVOKER, NOW, 5.0, since=NOW)),
    ),
    "an admin's drain stands": (ADMINS, None, ("draining", ADMINS)),
    "an admin's drain stands while it also drains itself": (ADMINS, SAYS, ("draining", ADMINS)),
    "drained by an admin, restarted: still drained": (
        ADMINS_DONE,
        None,
        ("drained", ADMINS_DONE),
    ),
}


@pytest.mark.parametrize(
    ("record", "reported", "expected"), HEARTBEATS.values(), ids=HEARTBEATS.keys()
)
def test_after_heartbeat(record: Any, reported: Any, expected: tuple[str, Any]) -> None:
    assert after_heartbeat(record, reported, NOW) == expected


@pytest.mark.parametrize(
    ("timeouts", "grace"),
    [([], 60.0), ([30.0], 60.0), ([30.0, 300.0], 300.0), ([1e9], MAX_GRACE_S)],
    ids=["no function", "shorter than the floor", "the longest", "capped"],
)
def test_default_grace_covers_every_function_timeout(timeouts: list[float], grace: float) -> None:
    assert default_grace(timeouts, 60.0) == grace


def test_a_record_survives_the_database_and_a_malformed_one_is_none() -> None:
    done = DrainRecord(BY_INVOKER, T0, 30.0, finished_at=T0 + 3, forced=True, since=T0)
    assert DrainRecord.from_json(done.to_json()) == done
    for bad in (None, 3, {}, {"by": "someone", "started_at": 1, "grace_s": 1},
                {"by": "admin", "started_at": "x", "grace_s": 1},
                {"by": "admin", "started_at": 1, "grace_s": float("nan")}):  # fmt: skip
        assert DrainRecord.from_json(bad) is None


@pytest.mark.parametrize(
    "value",
    [3, "yes", {}, {"since": 1.0}, {"since": 1.0, "grace_s": -1}, {"since": True, "grace_s": 1}],
    ids=["number", "string", "empty", "no grace", "negative grace", "boolean since"],
)
def test_a_malformed_draining_report_is_refused(value: Any) -> None:
    with pytest.raises(ValueError, match="'draining'"):
        reported_drain(value)


def test_draining_reports() -> None:
    assert reported_drain(None) is None
    assert reported_drain({"since": 5, "grace_s": 2}) == Reported(5.0, 2.0)


def test_running_generations_from_a_status_report() -> None:
    status = {"generations": [{"id": "a"}, {"id": 3}, "b", {"id": "c"}]}
    assert running_generations(status) == ("a", "c")
    assert running_count(status) == 2
    # An invoker that does not list them: its requests running on its instances.
    older = {"instances": [{"active": 2}, {"active": True}, {"active": "x"}, None, {}]}
    assert running_generations(older) == () and running_count(older) == 2
