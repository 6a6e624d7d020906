"""Which cached models to evict to make room: a pure decision over a snapshot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sllm.core.errors import InsufficientCapacity


@dataclass(frozen=True)
class CachedModel:
    """One tier entry as eviction sees it."""

    key: str
    nbytes: int
    last_used: float
    in_use: bool


def plan_eviction(
    entries: Sequence[CachedModel], *, capacity: int, need: int, tier: str = "cache"
) -> list[str]:
    """Keys to evict, least recently used first, so that `need` more bytes fit.

    Entries in use are never chosen. Raises InsufficientCapacity when `need`
    exceeds the capacity outright or cannot be freed from idle entries.

    Example: capacity 10, entries a(4, used at t=1), b(3, t=2, in use),
    c(2, t=0); need 5 -> used 9, free 1, must free 4: c (2) then a (4) go,
    giving ["c", "a"]; b stays because it is in use.
    """
    if need > capacity:
        raise InsufficientCapacity(
            f"{need} bytes do not fit the {tier} tier at all (capacity {capacity} bytes)"
        )
    used = sum(e.nbytes for e in entries)
    shortfall = used + need - capacity
    if shortfall <= 0:
        return []
    victims: list[str] = []
    for e in sorted((e for e in entries if not e.in_use), key=lambda e: e.last_used):
        victims.append(e.key)
        shortfall -= e.nbytes
        if shortfall <= 0:
            return victims
    busy = sum(e.nbytes for e in entries if e.in_use)
    raise InsufficientCapacity(
        f"{tier} tier full: {need} bytes needed, {capacity - used} free of {capacity}, "
        f"and {busy} bytes are held by models in use"
    )
