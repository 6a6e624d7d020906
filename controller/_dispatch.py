"""Dispatch: a slot on a warm instance, or a cold placement, all through the database.

Every controller process (gunicorn worker, replica) shares one picture of the
cluster: the `instances` table. A request takes a slot with one conditional
UPDATE (`in_flight < cap`), so workers never over-commit an instance; a scale
out inserts an instance under the function's row lock (FOR UPDATE on
PostgreSQL; SQLite serialises writers), so two workers never place the same
function twice beyond `max_instances`. The invoker stays the authority on its
own concurrency (it answers 429 when full); the counters here are how the
controller picks the least-loaded instance.

Requests for which no slot is free wait here (polling the table, bounded by
the function's deadline and by `max_queue` waiters per function and process).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import case, delete, func, select, true, update
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import Session

from sllm.core.errors import Overloaded
from sllm.db import Database, Function, Instance, Invoker

from ._scheduler import Candidate, Scheduler

LIVE_STATES = ("loading", "ready")


@dataclass(frozen=True)
class Slot:
    """One request's place on an instance."""

    instance_id: int
    invoker_id: int
    invoker: str  # name
    url: str
    cold: bool  # this request's dispatch created the instance
    loading: bool = True  # the instance was not ready yet when the slot was taken


class DeadlineExceeded(Exception):
    """No slot came free before the request's deadline."""


class Dispatcher:
    """Slots on instances: warm first, then a scale-out, else wait."""

    def __init__(self, db: Database, scheduler: Scheduler, *, max_queue: int) -> None:
        self.db = db
        self.scheduler = scheduler
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._waiting: dict[int, int] = defaultdict(int)
        self.gauge: Any = None  # a Prometheus gauge of the waiting requests, when set

    def waiting(self) -> dict[int, int]:
        """Requests waiting for a slot in this process, by function id."""
        with self._lock:
            return {k: v for k, v in self._waiting.items() if v}

    def acquire(self, fn: Function, deadline: float, avoid: Sequence[int] = ()) -> Slot:
        """A slot for one request of `fn`; DeadlineExceeded when none came free in time."""
        slot = self._try(fn, avoid)
        if slot is not None:
            return slot
        with self._queued(fn.id):
            delay = 0.005
            while True:
                slot = self._try(fn, avoid)
                if slot is not None:
                    return slot
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceeded(f"no instance of {fn.name!r} came free in time")
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.1)

    def _try(self, fn: Function, avoid: Sequence[int]) -> Slot | None:
        # Under the target concurrency first; then a new instance; then up to the hard limit.
        return (
            self._warm(fn, fn.target_concurrency, avoid)
            or self.scale_out(fn, avoid, reserve=True)
            or (
                self._warm(fn, fn.concurrency, avoid)
                if fn.concurrency > fn.target_concurrency
                else None
            )
        )

    def _warm(self, fn: Function, cap: int, avoid: Sequence[int]) -> Slot | None:
        # One write transaction: pick the least-loaded candidates (rows other workers
        # hold are skipped on PostgreSQL) and take a slot with a conditional UPDATE.
        with self.db.session(write=True) as s:
            rows = s.execute(
                select(Instance.id, Instance.invoker_id, Invoker.name, Invoker.url, Instance.state)
                .join(Invoker, Invoker.id == Instance.invoker_id)
                .where(
                    Instance.function_id == fn.id,
                    Instance.state.in_(LIVE_STATES),
                    Instance.in_flight < cap,
                    Invoker.state == "active",
                    Invoker.id.not_in(avoid) if avoid else true(),
                )
                .order_by(case((Instance.state == "ready", 0), else_=1), Instance.in_flight)
                .limit(4)
                .with_for_update(of=Instance, skip_locked=True)
            ).all()
            for instance_id, invoker_id, name, url, state in rows:
                taken = rowcount(
                    s.execute(
                        update(Instance)
                        .where(
                            Instance.id == instance_id,
                            Instance.state.in_(LIVE_STATES),
                            Instance.in_flight < cap,
                        )
                        .values(in_flight=Instance.in_flight + 1, last_used_at=time.time())
                        .execution_options(synchronize_session=False)
                    )
                )
                if taken:
                    return Slot(
                        instance_id, invoker_id, name, url, cold=False, loading=state == "loading"
                    )
        return None

    def scale_out(self, fn: Function, avoid: Sequence[int] = (), *, reserve: bool) -> Slot | None:
        """Place a new instance of `fn` when below max_instances (a slot in it if `reserve`)."""
        now = time.time()
        with self.db.session(write=True) as s:
            locked = s.execute(
                select(Function.max_instances).where(Function.id == fn.id).with_for_update()
            ).scalar_one_or_none()
            if locked is None:  # deleted meanwhile
                return None
            count = s.execute(
                select(func.count())
                .select_from(Instance)
                .where(Instance.function_id == fn.id, Instance.state.in_(LIVE_STATES))
            ).scalar_one()
            if count >= locked:
                return None
            candidates = self.candidates(s, fn, avoid)
            choice = self.scheduler.place(fn.model, candidates)
            if choice is None:
                return None
            row = Instance(
                function_id=fn.id,
                invoker_id=choice.invoker_id,
                state="loading",
                in_flight=1 if reserve else 0,
                created_at=now,
                last_used_at=now,
            )
            s.add(row)
            s.flush()
            url = s.execute(select(Invoker.url).where(Invoker.id == choice.invoker_id)).scalar_one()
            return Slot(row.id, choice.invoker_id, choice.name, url, cold=True)

    def candidates(self, s: Session, fn: Function, avoid: Sequence[int] = ()) -> list[Candidate]:
        """Active invokers without an instance of `fn`, as the scheduler sees them."""
        placed = select(Instance.invoker_id).where(Instance.function_id == fn.id)
        counts = (
            select(Instance.invoker_id, func.count().label("n"))
            .group_by(Instance.invoker_id)
            .subquery()
        )
        rows = s.execute(
            select(Invoker.id, Invoker.name, Invoker.status, func.coalesce(counts.c.n, 0))
            .outerjoin(counts, counts.c.invoker_id == Invoker.id)
            .where(
                Invoker.state == "active",
                Invoker.id.not_in(placed),
                Invoker.id.not_in(avoid) if avoid else true(),
            )
        ).all()
        return [Candidate(i, name, status or {}, n) for i, name, status, n in rows]

    def loaded(self, slot: Slot, tier: str | None, load_ms: float | None) -> None:
        """The instance answered: it is ready (recording how it loaded, if it just did)."""
        with self.db.session(write=True) as s:
            s.execute(
                update(Instance)
                .where(Instance.id == slot.instance_id, Instance.state == "loading")
                .values(state="ready", ready_at=time.time(), tier=tier, load_ms=load_ms)
                .execution_options(synchronize_session=False)
            )

    def release(self, s: Session, slot: Slot) -> None:
        """Give the slot back (inside the caller's write transaction)."""
        s.execute(
            update(Instance)
            .where(Instance.id == slot.instance_id)
            .values(
                in_flight=case((Instance.in_flight > 0, Instance.in_flight - 1), else_=0),
                last_used_at=time.time(),
            )
            .execution_options(synchronize_session=False)
        )

    def drop(self, slot: Slot) -> None:
        """Forget the slot's instance (it failed to load, or its invoker is gone)."""
        with self.db.session(write=True) as s:
            s.execute(
                delete(Instance)
                .where(Instance.id == slot.instance_id)
                .execution_options(synchronize_session=False)
            )

    @contextmanager
    def _queued(self, function_id: int) -> Iterator[None]:
        with self._lock:
            if self._waiting[function_id] >= self.max_queue:
                raise Overloaded(
                    f"{self.max_queue} requests already wait for this function; retry later",
                    retry_after=1.0,
                )
            self._waiting[function_id] += 1
        if self.gauge is not None:
            self.gauge.inc()
        try:
            yield
        finally:
            with self._lock:
                self._waiting[function_id] -= 1
            if self.gauge is not None:
                self.gauge.dec()


def rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE matched."""
    return cast(CursorResult[Any], result).rowcount
