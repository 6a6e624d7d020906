"""Draining an invoker: the pure decisions (no database, no HTTP).

An invoker is drained before maintenance or a restart: it gets no new
instances and no new requests, its running generations move away, then its
instances are unloaded. Two ways start one: an admin (`POST
/api/v1/invokers/{name}/drain`, `sllm invoker drain`), and the invoker itself
on SIGTERM (its heartbeat says "draining").

States / data / events of an invoker (`invokers.state`):

    active    --admin drain, or a heartbeat saying "draining"------->  draining
    draining  --no instance and no running generation left---------->  drained
    draining  --the grace ran out (what still runs is cut)---------->  drained
    draining, drained  --undrain (admin)---------------------------->  active
    drained   --a heartbeat without "draining", drained by itself--->  active (a new process)
    any       --no heartbeat for heartbeat_timeout------------------>  lost
    lost      --a heartbeat------------------------------------------>  as its drain record says

data: the drain record (`DrainRecord`, kept under "drain" in `invokers.status`,
which heartbeats do not overwrite): who drained it, when, the grace, when it
ended. An admin's drain outlives the invoker's restarts (an operator drained
the host; a restart must not put it back to work); an invoker's own drain ends
with the process that began it.

Each controller maintenance pass takes a `DrainSnapshot` of a draining
invoker and applies the `DrainDecision` of `plan_drain`.

Example: grace 60 s, started at t=0, instances {1: ready, 2 requests running;
2: ready, idle}, generations ["a", "b"] running. At t=1: retire (no new
requests) 1 and 2, unload 2 now, move "a" and "b" away, not done. At t=30 the
two generations ended (1 is idle now): unload 1. At t=31 nothing is left:
done, the invoker is "drained". Had "b" still run at t=60: instance 1 is
unloaded anyway ("force"), which ends "b" with an error; done.

Moving running generations away is live migration's job: the drain hands the
running generations to a `GenerationMover` on every pass. The controller's
(`_moving.MigrateAway`) asks for a live migration of each; one that cannot move
(no other invoker, or its migration aborted) finishes where it runs, and the
drain waits for it, as with `WaitForGenerations`, which moves nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

DRAIN_KEY = "drain"  # where invokers.status keeps the drain record
BY_ADMIN, BY_INVOKER = "admin", "invoker"
MAX_GRACE_S = 86_400.0  # a day: a longer grace is a mistake, not a plan
LIVE = ("loading", "ready")


@dataclass(frozen=True)
class DrainRecord:
    """One drain of one invoker (see the module docstring)."""

    by: str  # BY_ADMIN or BY_INVOKER
    started_at: float  # epoch seconds
    grace_s: float  # running generations get this long before they are cut
    finished_at: float | None = None  # when it became "drained"
    forced: bool = False  # the grace ran out with work left, which was cut
    since: float | None = None  # BY_INVOKER: when that invoker process began draining

    @property
    def deadline(self) -> float:
        """When what still runs is cut."""
        return self.started_at + self.grace_s

    @property
    def state(self) -> str:
        """The invoker state this record stands for: draining, or drained once finished."""
        return "draining" if self.finished_at is None else "drained"

    def to_json(self) -> dict[str, Any]:
        """As stored under invokers.status["drain"]."""
        return {
            "by": self.by,
            "started_at": self.started_at,
            "grace_s": self.grace_s,
            "finished_at": self.finished_at,
            "forced": self.forced,
            "since": self.since,
        }

    @classmethod
    def from_json(cls, doc: Any) -> DrainRecord | None:
        """The record stored in `doc` (None when absent or malformed)."""
        if not isinstance(doc, Mapping) or doc.get("by") not in (BY_ADMIN, BY_INVOKER):
            return None
        started, grace = _finite(doc.get("started_at")), _finite(doc.get("grace_s"))
        if started is None or grace is None:
            return None
        return cls(
            by=doc["by"],
            started_at=started,
            grace_s=grace,
            finished_at=_finite(doc.get("finished_at")),
            forced=doc.get("forced") is True,
            since=_finite(doc.get("since")),
        )


@dataclass(frozen=True)
class Reported:
    """What an invoker's heartbeat says of its own drain: it began at `since` (SIGTERM)."""

    since: float
    grace_s: float


def reported_drain(value: Any) -> Reported | None:
    """The heartbeat's "draining" field: null, or {"since": epoch s, "grace_s": s}.

    ValueError naming what is wrong otherwise (the caller answers 400).
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ValueError("'draining' must be null or an object {since, grace_s}")
    since, grace = _finite(value.get("since")), _finite(value.get("grace_s"))
    if since is None or grace is None or not 0 <= grace <= MAX_GRACE_S:
        raise ValueError(
            f"'draining' needs 'since' (epoch seconds) and 'grace_s' in [0, {MAX_GRACE_S:g}]"
        )
    return Reported(since, grace)


def after_heartbeat(
    record: DrainRecord | None, reported: Reported | None, now: float
) -> tuple[str, DrainRecord | None]:
    """The invoker's state and drain record after a heartbeat (any previous state).

    An admin's drain stands whatever the invoker says. An invoker that says it
    drains starts (or continues) a drain of its own; one that does not say so
    any more is a new process: its old drain of its own is over.
    """
    if record is not None and record.by == BY_ADMIN:
        return record.state, record
    if reported is None:
        return "active", None
    if record is None or record.since != reported.since:  # a new drain (maybe a new process)
        record = DrainRecord(BY_INVOKER, now, reported.grace_s, since=reported.since)
    return record.state, record


@dataclass(frozen=True)
class InstanceRow:
    """An instance row on the draining invoker."""

    instance_id: int
    state: str  # loading | ready | unloading
    in_flight: int  # requests the controller has running on it


@dataclass(frozen=True)
class DrainSnapshot:
    """A draining invoker as the controller sees it at `now`."""

    record: DrainRecord
    instances: Sequence[InstanceRow]
    generations: Sequence[str]  # running there, by id, as its last heartbeat reported
    now: float


@dataclass(frozen=True)
class DrainDecision:
    """What one pass does to a draining invoker."""

    retire: tuple[int, ...]  # live instances to mark "unloading": no new requests, not counted
    unload: tuple[int, ...]  # idle instances to unload now
    force: tuple[int, ...]  # busy instances unloaded anyway: the grace ran out
    move: tuple[str, ...]  # generations to move away (GenerationMover)
    done: bool  # the invoker is drained after this pass


def plan_drain(snap: DrainSnapshot) -> DrainDecision:
    """One pass of a drain (see the module docstring's example).

    Idle means no request of the controller's in flight; the instance row of a
    busy instance is kept (its requests still release their slots into it)
    until it is idle or the grace runs out. The drain is done once nothing is
    left, or when the grace ran out: then every instance left goes now.
    """
    retire = tuple(i.instance_id for i in snap.instances if i.state in LIVE)
    expired = snap.now >= snap.record.deadline
    idle = tuple(i.instance_id for i in snap.instances if i.in_flight <= 0)
    busy = tuple(i.instance_id for i in snap.instances if i.in_flight > 0)
    nothing_left = not snap.instances and not snap.generations
    return DrainDecision(
        retire=retire,
        unload=idle,
        force=busy if expired else (),
        move=() if expired else tuple(snap.generations),
        done=nothing_left or expired,
    )


def finished(record: DrainRecord, decision: DrainDecision, snap: DrainSnapshot) -> DrainRecord:
    """The record once `decision` made the invoker drained."""
    forced = bool(decision.force) or (snap.now >= record.deadline and bool(snap.generations))
    return replace(record, finished_at=snap.now, forced=forced)


def default_grace(function_timeouts: Sequence[float], floor: float) -> float:
    """The grace of an admin's drain that names none: the longest timeout of the functions
    placed on the invoker, and at least `floor` (the default function timeout).

    Every generation running when the drain starts began before it and ends
    within its function's timeout, so this grace cuts none that would finish.
    Example: functions with timeouts 30 s and 300 s, floor 60 s -> 300 s.
    """
    return min(max([floor, *function_timeouts]), MAX_GRACE_S)


def running_generations(status: Mapping[str, Any]) -> tuple[str, ...]:
    """The ids of the generations an invoker's status report lists as running."""
    found = status.get("generations")
    if not isinstance(found, list):
        return ()
    return tuple(g["id"] for g in found if isinstance(g, Mapping) and isinstance(g.get("id"), str))


def running_count(status: Mapping[str, Any]) -> int:
    """How many generations (or, from an invoker that does not list them, requests) run."""
    if isinstance(status.get("generations"), list):
        return len(running_generations(status))
    total = 0
    for inst in status.get("instances") or []:
        active = inst.get("active") if isinstance(inst, Mapping) else None
        if isinstance(active, int) and not isinstance(active, bool) and active > 0:
            total += active
    return total


class GenerationMover(Protocol):
    """Moves running generations off an invoker (`_moving.MigrateAway`: live migration)."""

    def move_away(self, invoker: str, generations: Sequence[str], deadline: float) -> None:
        """Start moving `generations` (ids on `invoker`) elsewhere, finishing by `deadline`
        (epoch seconds). Called on every drain pass with what still runs there: a
        generation already being moved must not be moved twice. Must not block long."""


class WaitForGenerations:
    """A mover that moves nothing, so the drain waits for the generations to finish (up to
    its grace)."""

    def move_away(self, invoker: str, generations: Sequence[str], deadline: float) -> None:
        """Nothing to do: the generations finish where they run."""


def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite number (never a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None
