"""Where a cold instance goes: the scheduler interface and a locality-aware policy.

The controller hands the scheduler the model and a view of every candidate
invoker (what it reported in its last heartbeat); the scheduler picks one or
none. The startup-time-optimized scheduler is another implementation of the
same interface.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

TIER_RANK = {"gpu": 0, "dram": 1, "nvme": 2, "remote": 3}


@dataclass(frozen=True)
class Candidate:
    """An invoker that could host a new instance, as its last status describes it."""

    invoker_id: int
    name: str
    status: Mapping[str, Any]  # the invoker's /v1/status document
    instances: int  # instances the controller has placed there

    def tier_of(self, model: str) -> str:
        """The fastest tier holding `model` there: dram, nvme or remote."""
        for tier in ("dram", "nvme"):
            for entry in self.status.get("tiers", {}).get(tier, {}).get("models", []) or []:
                key = entry.get("key", "") if isinstance(entry, Mapping) else ""
                if isinstance(key, str) and key.split("@", 1)[0] == model:
                    return tier
        return "remote"

    @property
    def load_queue(self) -> int:
        """Loads in flight there."""
        value = self.status.get("load_queue", 0)
        return value if isinstance(value, int) else 0

    @property
    def free_device_bytes(self) -> int:
        """Free device memory (0 when unknown, as on the CPU)."""
        value = self.status.get("device", {}).get("free_bytes", 0)
        return value if isinstance(value, int) else 0


class Scheduler(Protocol):
    """Picks the invoker for a cold start of `model`, or None to wait."""

    def place(self, model: str, candidates: Sequence[Candidate]) -> Candidate | None:
        """The chosen candidate (None when no candidate can take it now)."""


class LocalityScheduler:
    """Fastest tier first (DRAM, then NVMe, then remote); then fewer queued loads, fewer
    instances, more free device memory; then the name, so the choice is deterministic."""

    def place(self, model: str, candidates: Sequence[Candidate]) -> Candidate | None:
        """The candidate where `model` starts soonest by locality."""
        if not candidates:
            return None
        return min(
            candidates,
            key=lambda c: (
                TIER_RANK[c.tier_of(model)],
                c.load_queue,
                c.instances,
                -c.free_device_bytes,
                c.name,
            ),
        )
