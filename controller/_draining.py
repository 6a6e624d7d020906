"""Draining invokers, through the database: the admin API's drain and undrain, the state a
heartbeat leaves, each maintenance pass's step, and the invokers' documents.

The decisions are pure (`_drain`); this module reads what they take and
carries them out. The drain record lives in `invokers.status["drain"]`, next
to the invoker's own report, and heartbeats keep it (see `status_with`).
Every write to an invoker's state happens under its row lock (FOR UPDATE on
PostgreSQL; SQLite serialises writers), so a heartbeat, an admin's drain and
a maintenance pass of another controller process never undo each other.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from sllm.core.errors import Conflict, InvalidRequest, NotFound
from sllm.core.messages import require_object, show_value
from sllm.db import Database, Function, Instance, Invoker, Namespace

from ._dispatch import rowcount
from ._drain import (
    BY_ADMIN,
    BY_INVOKER,
    DRAIN_KEY,
    LIVE,
    MAX_GRACE_S,
    DrainRecord,
    DrainSnapshot,
    GenerationMover,
    InstanceRow,
    Reported,
    after_heartbeat,
    default_grace,
    finished,
    plan_drain,
    running_count,
    running_generations,
)

log = logging.getLogger("sllm.controller")

STATES = ("active", "draining", "drained", "lost")
# (invoker url, "namespace/function", instance id, force) -> None; errors are logged there
Unload = Callable[[str, str, str, bool], None]


def record_of(row: Invoker) -> DrainRecord | None:
    """The drain record an invoker row carries (None when it is not, or was not, drained)."""
    return DrainRecord.from_json((row.status or {}).get(DRAIN_KEY))


def status_with(report: Mapping[str, Any], record: DrainRecord | None) -> dict[str, Any]:
    """An invoker's status column: its report (less any "drain" of its own) and the record."""
    status = {k: v for k, v in report.items() if k != DRAIN_KEY}
    if record is not None:
        status[DRAIN_KEY] = record.to_json()
    return status


def retire_instances(s: Session, invoker_id: int) -> None:
    """Mark the live instances on an invoker "unloading": they take no new requests, and
    scale-out and prewarm no longer count them (a function drained off its only invoker
    may be placed on another one at once, beyond max_instances while this one drains)."""
    s.execute(
        update(Instance)
        .where(Instance.invoker_id == invoker_id, Instance.state.in_(LIVE))
        .values(state="unloading")
        .execution_options(synchronize_session=False)
    )


def on_heartbeat(
    s: Session, row: Invoker, report: Mapping[str, Any], reported: Reported | None, now: float
) -> str:
    """Set the state (and drain record) a heartbeat leaves `row` in; the new state."""
    before = row.state
    state, record = after_heartbeat(record_of(row), reported, now)
    if state == "draining" and before != "draining":
        retire_instances(s, row.id)
        log.info("invoker %s is draining (%s)", row.name, record.by if record else "?")
    row.state = state
    row.status = status_with(report, record)
    return state


class Drains:
    """The drain operations of one controller process."""

    def __init__(
        self, db: Database, mover: GenerationMover, unload: Unload, *, floor_grace_s: float
    ) -> None:
        self._db = db
        self.mover = mover
        self._unload = unload
        self._floor = floor_grace_s  # the default function timeout (see default_grace)

    # ------------------------------------------------------------ admin API
    def drain(self, name: str, body: Any) -> dict[str, Any]:
        """Start draining invoker `name` (an admin's drain); its document.

        Draining it again changes only the grace, when one is given (a grace of
        0 cuts what still runs at the next pass). An invoker draining itself
        (SIGTERM) becomes an admin's drain, so it stays drained when it restarts.
        """
        grace = _grace(body)
        now = time.time()
        with self._db.session(write=True) as s:
            row = _locked(s, name)
            if row.state == "lost":
                raise Conflict(
                    f"invoker {name!r} is lost (no heartbeat for {now - row.last_heartbeat:.0f} s):"
                    " nothing there to drain; it is drained when it comes back only if drained "
                    "before it was lost"
                )
            record = record_of(row)
            if record is None:
                if grace is None:
                    grace = default_grace(_timeouts(s, row.id), self._floor)
                record = DrainRecord(BY_ADMIN, now, grace)
                log.info("invoker %s: drain started by an admin (grace %.0f s)", name, grace)
            else:
                record = replace(
                    record, by=BY_ADMIN, grace_s=record.grace_s if grace is None else grace
                )
            row.state = record.state
            row.status = status_with(row.status or {}, record)
            if row.state == "draining":
                retire_instances(s, row.id)
            s.flush()
            return self._document(s, row, now)

    def undrain(self, name: str) -> dict[str, Any]:
        """Put a drained (or draining) invoker back to work; its document."""
        now = time.time()
        with self._db.session(write=True) as s:
            row = _locked(s, name)
            record = record_of(row)
            if record is not None and record.by == BY_INVOKER and row.state != "lost":
                raise Conflict(
                    f"invoker {name!r} drains itself: it is shutting down (SIGTERM); it is "
                    "active again once it has restarted"
                )
            if record is not None:
                log.info("invoker %s: undrained by an admin", name)
                row.status = status_with(row.status or {}, None)
                if row.state in ("draining", "drained"):
                    row.state = "active"
            s.flush()
            return self._document(s, row, now)

    def get(self, name: str) -> dict[str, Any]:
        """Invoker `name`'s document."""
        with self._db.session() as s:
            row = s.execute(select(Invoker).where(Invoker.name == name)).scalar_one_or_none()
            if row is None:
                raise NotFound(f"no invoker named {name!r}")
            return self._document(s, row, time.time())

    def list(self) -> list[dict[str, Any]]:
        """Every invoker's document, by name."""
        now = time.time()
        with self._db.session() as s:
            rows = s.execute(select(Invoker).order_by(Invoker.name)).scalars().all()
            counts = dict(
                s.execute(
                    select(Instance.invoker_id, func.count()).group_by(Instance.invoker_id)
                ).all()
            )
            return [document(v, counts.get(v.id, 0), now) for v in rows]

    def counts(self) -> dict[str, int]:
        """Invokers by state (every state, 0 when none)."""
        with self._db.session() as s:
            rows = s.execute(select(Invoker.state, func.count()).group_by(Invoker.state)).all()
        found = {state: n for state, n in rows}
        return {state: int(found.get(state, 0)) for state in STATES}

    def _document(self, s: Session, row: Invoker, now: float) -> dict[str, Any]:
        n = s.execute(
            select(func.count()).select_from(Instance).where(Instance.invoker_id == row.id)
        ).scalar_one()
        return document(row, n, now)

    # ------------------------------------------------------------ maintenance
    def step_all(self) -> None:
        """One pass over every draining invoker (see plan_drain)."""
        with self._db.session() as s:
            ids = list(s.execute(select(Invoker.id).where(Invoker.state == "draining")).scalars())
        for invoker_id in ids:
            self.step(invoker_id)

    def step(self, invoker_id: int) -> None:
        """One pass of one drain: retire, unload, move away, and maybe finish."""
        now = time.time()
        unloads: list[tuple[str, str, bool]] = []
        with self._db.session(write=True) as s:
            row = s.execute(
                select(Invoker).where(Invoker.id == invoker_id).with_for_update()
            ).scalar_one_or_none()
            if row is None or row.state != "draining":
                return  # undrained, lost or drained meanwhile
            record = record_of(row)
            if record is None:  # draining without a record (written by an older controller)
                record = DrainRecord(BY_ADMIN, now, self._floor)
                row.status = status_with(row.status or {}, record)
            rows = _instances(s, invoker_id)
            snap = DrainSnapshot(
                record,
                [InstanceRow(i, state, n) for i, state, n, _ in rows],
                running_generations(row.status or {}),
                now,
            )
            decision = plan_drain(snap)
            if decision.retire:
                retire_instances(s, invoker_id)
            functions = {i: fn for i, _, _, fn in rows}
            for instance_id in decision.unload:
                gone = s.execute(
                    delete(Instance)
                    .where(Instance.id == instance_id, Instance.in_flight <= 0)
                    .execution_options(synchronize_session=False)
                )
                if rowcount(gone):  # else a request took it meanwhile, or another pass did
                    unloads.append((functions[instance_id], str(instance_id), False))
            for instance_id in decision.force:
                s.execute(delete(Instance).where(Instance.id == instance_id))
                unloads.append((functions[instance_id], str(instance_id), True))
            if decision.done:
                record = finished(record, decision, snap)
                row.state = "drained"
                row.status = status_with(row.status or {}, record)
                log.info(
                    "invoker %s drained%s",
                    row.name,
                    " (the grace ran out)" if record.forced else "",
                )
            name, url = row.name, row.url
        for function, instance, force in unloads:
            self._unload(url, function, instance, force)
        if decision.move and not decision.done:
            self.mover.move_away(name, decision.move, record.deadline)


def document(row: Invoker, instances: int, now: float) -> dict[str, Any]:
    """An invoker as the API shows it: state, heartbeat age, load, and drain progress."""
    status = dict(row.status or {})
    record = DrainRecord.from_json(status.pop(DRAIN_KEY, None))
    running = running_count(status)
    drain = None
    if record is not None:
        drain = {
            **{k: v for k, v in record.to_json().items() if k != "since"},
            "deadline": record.deadline,
            "generations_left": running if record.finished_at is None else 0,
            "instances_left": instances,
        }
    return {
        "name": row.name,
        "url": row.url,
        "device": row.device,
        "state": row.state,
        "last_heartbeat": row.last_heartbeat,
        "heartbeat_age_s": max(0.0, now - row.last_heartbeat),
        "registered": row.registered_at,
        "capacity": row.capacity,
        "instances": instances,
        "running_generations": running,
        "drain": drain,
        "status": status,
    }


def _grace(body: Any) -> float | None:
    """The drain request's grace_s (None: the default); 400 naming the field otherwise."""
    doc = require_object({} if body is None else body, "the drain request")
    unknown = sorted(set(doc) - {"grace_s"})
    if unknown:
        raise InvalidRequest(
            f"unknown field {unknown[0]!r} in the drain request; it takes 'grace_s'",
            param=unknown[0],
        )
    grace = doc.get("grace_s")
    if grace is None:
        return None
    if (
        isinstance(grace, bool)
        or not isinstance(grace, (int, float))
        or not 0 <= grace <= MAX_GRACE_S
    ):
        raise InvalidRequest(
            f"'grace_s' must be seconds in [0, {MAX_GRACE_S:g}], got {show_value(grace)}",
            param="grace_s",
        )
    return float(grace)


def _locked(s: Session, name: str) -> Invoker:
    row = s.execute(
        select(Invoker).where(Invoker.name == name).with_for_update()
    ).scalar_one_or_none()
    if row is None:
        raise NotFound(f"no invoker named {name!r}")
    return row


def _timeouts(s: Session, invoker_id: int) -> Sequence[float]:
    """The timeouts of the functions placed on an invoker."""
    return list(
        s.execute(
            select(Function.timeout_s)
            .join(Instance, Instance.function_id == Function.id)
            .where(Instance.invoker_id == invoker_id)
        ).scalars()
    )


def _instances(s: Session, invoker_id: int) -> list[tuple[int, str, int, str]]:
    """(id, state, in_flight, "namespace/function") of the instance rows on an invoker."""
    return [
        (i, state, n, f"{ns}/{fn}")
        for i, state, n, fn, ns in s.execute(
            select(Instance.id, Instance.state, Instance.in_flight, Function.name, Namespace.name)
            .join(Function, Function.id == Instance.function_id)
            .join(Namespace, Namespace.id == Function.namespace_id)
            .where(Instance.invoker_id == invoker_id)
        ).all()
    ]
