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

from sqlalchemy import Connection, bindparam, case, delete, func, or_, select, true, update
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.orm import Session

from sllm.core.errors import Overloaded
from sllm.db import Database, Function, Instance, Invoker, table

from ._prewarm import clear_for_instance
from ._scheduler import Candidate, Scheduler

LIVE_STATES = ("loading", "ready")

# The warm path's statements, built once (Core, on the tables): building and
# caching a statement per request cost more CPU than running it.
_I, _V, _F = table(Instance), table(Invoker), table(Function)


def _live(state: Any) -> Any:
    # Spelled out, not IN (...): an IN list is an expanding parameter, which a statement
    # prepared for the driver (Database.prepare) cannot take.
    return or_(*(state == s for s in LIVE_STATES))


def _candidates(i: Any, columns: Sequence[Any], avoiding: bool, limit: int) -> Any:
    """Instances (table or alias `i`) of one function with a free slot below `cap`, least
    loaded first (ready before loading), on active invokers (not `avoid`)."""
    return (
        select(*columns)
        .select_from(i)
        .join(_V, _V.c.id == i.c.invoker_id)
        .where(
            i.c.function_id == bindparam("fn"),
            _live(i.c.state),
            i.c.in_flight < bindparam("cap"),
            _V.c.state == "active",
            _V.c.id.not_in(bindparam("avoid", expanding=True)) if avoiding else true(),
        )
        .order_by(case((i.c.state == "ready", 0), else_=1), i.c.in_flight)
        .limit(limit)
    )


_VERSION = select(_F.c.version).where(_F.c.id == _I.c.function_id).scalar_subquery()


def _warm_candidates(avoiding: bool) -> Any:
    columns = (_I.c.id, _I.c.invoker_id, _V.c.name, _V.c.url, _I.c.state, _VERSION)
    return _candidates(_I, columns, avoiding, 4)


def _take_least_loaded(avoiding: bool) -> Any:
    # One statement, committed by itself: pick the least-loaded candidate and take a
    # slot in it. PostgreSQL re-checks `in_flight < cap` after waiting on a concurrent
    # holder of the row; no row back means it filled meanwhile (or there was none).
    c = _I.alias("candidate")
    pick = _candidates(c, (c.c.id,), avoiding, 1).scalar_subquery()
    # SQLite's RETURNING names the updated table's columns bare; inside these subqueries
    # a bare `invoker_id` / `function_id` still means the updated row's (the subqueried
    # tables have no such column), so the correlation holds on both databases.
    invoker = select(_V.c.name, _V.c.url).where(_V.c.id == _I.c.invoker_id)
    return (
        update(_I)
        .where(_I.c.id == pick, _live(_I.c.state), _I.c.in_flight < bindparam("cap"))
        .values(in_flight=_I.c.in_flight + 1, last_used_at=bindparam("now"))
        .returning(
            _I.c.id,
            _I.c.invoker_id,
            invoker.with_only_columns(_V.c.name).scalar_subquery(),
            invoker.with_only_columns(_V.c.url).scalar_subquery(),
            _I.c.state,
            _VERSION,
        )
    )


_WARM = {False: _warm_candidates(False), True: _warm_candidates(True)}
_TAKE_LEAST_LOADED = {False: _take_least_loaded(False), True: _take_least_loaded(True)}
_TAKE = (
    update(_I)
    .where(
        _I.c.id == bindparam("instance"),
        _I.c.state.in_(LIVE_STATES),
        _I.c.in_flight < bindparam("cap"),
    )
    .values(in_flight=_I.c.in_flight + 1, last_used_at=bindparam("now"))
)
RELEASE = (  # a slot back: params instance, now
    update(_I)
    .where(_I.c.id == bindparam("instance"))
    .values(
        in_flight=case((_I.c.in_flight > 0, _I.c.in_flight - 1), else_=0),
        last_used_at=bindparam("now"),
    )
)


@dataclass(frozen=True)
class Slot:
    """One request's place on an instance."""

    instance_id: int
    invoker_id: int
    invoker: str  # name
    url: str
    cold: bool  # this request's dispatch created the instance
    loading: bool = True  # the instance was not ready yet when the slot was taken


def instance_body(namespace: str, fn: Function, slot: Slot) -> dict[str, Any]:
    """What names `fn`'s instance to an invoker (the start of every invoke and load body):
    the function, and the instance by its row id and the function's version."""
    return {
        "function": f"{namespace}/{fn.name}",
        "model": fn.model,
        "task": fn.task,
        "concurrency": fn.concurrency,
        "instance": str(slot.instance_id),
        "version": fn.version,
    }


class DeadlineExceeded(Exception):
    """No slot came free before the request's deadline."""


class StaleFunction(Exception):
    """The function changed (or went) since the definition a request was validated against."""


class Dispatcher:
    """Slots on instances: warm first, then a scale-out, else wait."""

    def __init__(self, db: Database, scheduler: Scheduler, *, max_queue: int) -> None:
        self.db = db
        self.scheduler = scheduler
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._waiting: dict[int, int] = defaultdict(int)
        self.gauge: Any = None  # a Prometheus gauge of the waiting requests, when set
        self._returning = bool(db.engine.dialect.update_returning)
        self._take = (  # the warm path's statement, prepared for the driver (no `avoid`)
            db.prepare(_TAKE_LEAST_LOADED[False], write=True, durable=False)
            if self._returning
            else None
        )

    def waiting(self) -> dict[int, int]:
        """Requests waiting for a slot in this process, by function id."""
        with self._lock:
            return {k: v for k, v in self._waiting.items() if v}

    def acquire(
        self, fn: Function, deadline: float, avoid: Sequence[int] = (), *, bounded: bool = True
    ) -> Slot:
        """A slot for one request of `fn`; DeadlineExceeded when none came free in time.

        The slot is for `fn` as given: StaleFunction when the function has
        changed or gone since (its definition came from a cache). `bounded`:
        Overloaded when `max_queue` requests already wait (a client holding a
        connection); an accepted queued activation waits regardless, as its
        queue workers already bound how many do.
        """
        slot = self._try(fn, avoid)
        if slot is not None:
            return slot
        with self._queued(fn.id, bounded):
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
        # The one-statement take first (UPDATE ... RETURNING, where the database has it).
        # If it got nothing (no candidate, or its pick filled meanwhile), one write
        # transaction: read the least-loaded candidates (a plain read, no row locks) and
        # take a slot in the first that still has one with a conditional UPDATE. On
        # PostgreSQL that UPDATE waits for another request's hold on the row, then
        # re-checks `in_flight < cap` on the row as that request left it. (Not FOR UPDATE
        # SKIP LOCKED: with one hot instance, concurrent requests would find no row and
        # fall back to polling.)
        params: dict[str, Any] = {"fn": fn.id, "cap": cap}
        if avoid:
            params["avoid"] = list(avoid)
        if self._returning:
            row: Any = None
            if not avoid and self._take is not None:
                found = self._take.run({**params, "now": time.time()})
                row = found[0] if found else None
            else:
                with self.db.autocommit(write=True, durable=False) as conn:
                    row = conn.execute(
                        _TAKE_LEAST_LOADED[True], {**params, "now": time.time()}
                    ).first()
            if row is not None:
                instance_id, invoker_id, name, url, state, version = row
                slot = Slot(
                    instance_id, invoker_id, name, url, cold=False, loading=state == "loading"
                )
                return self._current(fn, slot, version)
        with self.db.connect(write=True) as conn:
            rows = conn.execute(_WARM[bool(avoid)], params).all()
            for instance_id, invoker_id, name, url, state, version in rows:
                if version != fn.version:
                    raise StaleFunction(fn.name)
                taken = rowcount(
                    conn.execute(_TAKE, {"instance": instance_id, "cap": cap, "now": time.time()})
                )
                if taken:
                    return Slot(
                        instance_id, invoker_id, name, url, cold=False, loading=state == "loading"
                    )
        return None

    def _current(self, fn: Function, slot: Slot, version: int | None) -> Slot:
        # A slot taken for a definition that is no longer the function's goes back.
        if version == fn.version:
            return slot
        with self.db.autocommit(write=True, durable=False) as conn:
            self.release(conn, slot)
        raise StaleFunction(fn.name)

    def migration_slot(self, fn: Function, source: int, to: int | None) -> Slot | None:
        """A slot for a live migration's destination, on invoker `to` (else on any active
        invoker but `source`): a warm instance with room first, else a new instance placed
        there even when `fn` is at max_instances (one over: the source's instance frees
        its slot once the generation has moved). None when no invoker can take it.
        """
        if to == source:
            return None
        with self.db.session(write=False) as s:
            ids = s.execute(select(Invoker.id).where(Invoker.state == "active")).scalars().all()
        avoid = [i for i in ids if i == source or (to is not None and i != to)]
        if to is not None and to not in ids:
            return None
        return (
            self._warm(fn, fn.concurrency, avoid)
            or self.scale_out(fn, avoid, reserve=True, extra=1)
            # Another migration placed one there since the first look (a drain moves the
            # generations of an instance at once): join it, as the first look would have.
            or self._warm(fn, fn.concurrency, avoid)
        )

    def scale_out(
        self, fn: Function, avoid: Sequence[int] = (), *, reserve: bool, extra: int = 0
    ) -> Slot | None:
        """Place a new instance of `fn` when below max_instances + `extra` (a slot in it if
        `reserve`).

        StaleFunction when `fn` is not the function's current definition.
        """
        now = time.time()
        with self.db.session(write=True) as s:
            locked = s.execute(
                select(Function.max_instances, Function.version)
                .where(Function.id == fn.id)
                .with_for_update()
            ).first()
            if locked is None or locked.version != fn.version:  # deleted or changed meanwhile
                raise StaleFunction(fn.name)
            count = s.execute(
                select(func.count())
                .select_from(Instance)
                .where(Instance.function_id == fn.id, Instance.state.in_(LIVE_STATES))
            ).scalar_one()
            if count >= locked.max_instances + extra:
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
        with self.db.connect(write=True) as conn:
            became = conn.execute(
                update(_I)
                .where(_I.c.id == slot.instance_id, _I.c.state == "loading")
                .values(state="ready", ready_at=time.time(), tier=tier, load_ms=load_ms)
            )
            if rowcount(became):
                clear_for_instance(conn, slot.instance_id)  # it loads now: no backoff, no error

    @staticmethod
    def release(conn: Connection | Session, slot: Slot) -> None:
        """Give the slot back (inside the caller's write transaction)."""
        conn.execute(RELEASE, {"instance": slot.instance_id, "now": time.time()})

    def free(self, slot: Slot) -> None:
        """Give the slot back, in a transaction of its own."""
        with self.db.connect(write=True) as conn:
            self.release(conn, slot)

    def adopt(self, instance_id: int, invoker_id: int, invoker: str, url: str) -> Slot:
        """A slot for a generation already running on instance `instance_id` (a reconnect
        attaching to it, see _attach): counted in flight there, whatever its limit."""
        with self.db.connect(write=True) as conn:
            conn.execute(
                update(_I)
                .where(_I.c.id == instance_id)
                .values(in_flight=_I.c.in_flight + 1, last_used_at=time.time())
            )
        return Slot(instance_id, invoker_id, invoker, url, cold=False, loading=False)

    def heard_from(self, invoker_id: int, since: float) -> bool:
        """Whether invoker `invoker_id` is active with a heartbeat after `since` (epoch s)."""
        with self.db.autocommit(durable=False) as conn:
            row = conn.execute(
                select(_V.c.state, _V.c.last_heartbeat).where(_V.c.id == invoker_id)
            ).first()
        return row is not None and row.state == "active" and row.last_heartbeat > since

    def drop(self, slot: Slot) -> None:
        """Forget the slot's instance (it failed to load, or its invoker is gone)."""
        with self.db.connect(write=True) as conn:
            conn.execute(delete(_I).where(_I.c.id == slot.instance_id))

    @contextmanager
    def _queued(self, function_id: int, bounded: bool) -> Iterator[None]:
        with self._lock:
            if bounded and self._waiting[function_id] >= self.max_queue:
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
