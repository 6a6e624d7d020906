"""Reconciling the controller's instance rows with what an invoker reports it holds.

Instances are matched by instance id: an invoker reports each instance with
the id the controller gave it ("instance", the row id as a string). An entry
without an id (an invoker from before ids) is matched by its function name.

Both ways, from one heartbeat:

- a row the invoker does not report is forgotten when that is safe: a ready
  instance with no request in flight was unloaded there (device pressure); a
  load older than the grace that the invoker never heard of failed on the way;
- an instance the invoker holds with no row (its row was dropped after an
  error on a cold slot or a lost connection, deleted by a reconcile that read
  a stale report, or deleted while the unload got 409 because it was busy)
  would never be unloaded: keep-alive only sees rows. It is unloaded once it
  is idle there; a busy one is left for a later heartbeat.

Example: rows {1 a/f: ready, idle}, report {2 a/g: ready, idle; 3 a/h: ready,
1 active} -> forget row 1, unload instance 2; 3 waits until it is idle.
Caveat: the report is a moment old; an unload that races a new placement of
the same function costs that placement a reload, never a failed request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Held:
    """An instance as the invoker reports it."""

    loading: bool
    active: int  # requests running on it
    function: str = ""
    instance: str | None = None  # its id; None from an invoker that does not name instances


@dataclass(frozen=True)
class Row:
    """An instance row of the controller, for one invoker."""

    instance_id: int
    function: str  # "namespace/name", as the invoker names it
    state: str
    in_flight: int
    created_at: float


@dataclass(frozen=True)
class Reconciliation:
    """What to change: rows to forget, instances to unload on the invoker."""

    forget: tuple[int, ...]
    unload: tuple[str, ...]  # keys of `held_instances`


def held_instances(status: Mapping[str, Any]) -> dict[str, Held]:
    """The instances in an invoker's status report, by instance id, else by function name
    (malformed entries skipped)."""
    held: dict[str, Held] = {}
    for inst in status.get("instances") or []:
        if isinstance(inst, Mapping) and isinstance(inst.get("function"), str):
            active = inst.get("active")
            instance = inst.get("instance")
            instance = instance if isinstance(instance, str) and instance else None
            held[instance or inst["function"]] = Held(
                loading=bool(inst.get("loading")),
                active=active if isinstance(active, int) and not isinstance(active, bool) else 0,
                function=inst["function"],
                instance=instance,
            )
    return held


def reconcile(
    rows: Iterable[Row], held: Mapping[str, Held], *, stale_before: float
) -> Reconciliation:
    """Match `rows` with `held`; a load created before `stale_before` that is not held failed."""
    by_id = {k for k, h in held.items() if h.instance is not None}
    by_function = {k for k, h in held.items() if h.instance is None}
    forget: list[int] = []
    ids: set[str] = set()
    functions: set[str] = set()
    for row in rows:
        key = str(row.instance_id)
        ids.add(key)
        functions.add(row.function)
        if key in by_id or row.function in by_function:
            continue
        idle = row.state == "ready" and row.in_flight == 0
        if idle or (row.state == "loading" and row.created_at < stale_before):
            forget.append(row.instance_id)
    unload = sorted(
        key
        for key, h in held.items()
        if (key not in ids if h.instance is not None else key not in functions)
        and not h.loading
        and h.active == 0
    )
    return Reconciliation(tuple(forget), tuple(unload))
