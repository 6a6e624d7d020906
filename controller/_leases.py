"""Leases on stored activations: who runs one, and the single write that ends it.

A stored activation (non-blocking, or blocking past its wait) runs under a
lease: a claim token in `claimed_by` (one per claim, so a second claim by the
same process is a different owner) and an expiry in `lease_until`.

States and events:

    queued --claim (token, lease)--> running, start_at unset
    running, start_at unset --dispatch (start_at written first)--> running, start_at set
    running --outcome (same token)--> success | function_error | platform_error | timeout
    running, lease expired, start_at unset --maintenance--> queued (it never reached
                                                            an invoker: run it again)
    running, lease expired, start_at set --maintenance--> platform_error "interrupted"
                                                          (it may have run: never twice)

Every transition out of `running` is a conditional UPDATE (still running,
still this claim), so a final state is written once: whichever of the run's
outcome and maintenance comes first stands, the other changes nothing.
`start_at` is written before the request leaves for an invoker, so a crash
in between ends the activation as interrupted, never as run twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, update

from sllm.core.errors import PlatformError
from sllm.db import Activation, table

from ._dispatch import rowcount

_A = table(Activation)

INTERRUPTED = {
    "code": "interrupted",
    "message": "the controller running this activation stopped after sending it to an "
    "invoker; it is not run twice",
}


class LeaseLost(PlatformError):
    """The activation's lease passed to someone else (it expired): this run stops."""

    code = "lease_lost"


def new_claim(owner: str) -> str:
    """A claim token unique to one claim, naming its owner (a controller process)."""
    return f"{uuid.uuid4().hex[:16]}@{owner}"[:64]


def _held(activation_id: str, claim: str) -> Any:
    return (_A.c.id == activation_id) & (_A.c.status == "running") & (_A.c.claimed_by == claim)


def mark_dispatched(
    conn: Connection,
    activation_id: str,
    claim: str,
    start_at: float,
    invoker: str,
    lease_until: float | None = None,
) -> bool:
    """Record that the activation is about to reach `invoker` (its lease now ending at
    `lease_until`, when given); False if the lease is lost."""
    values: dict[str, Any] = {"start_at": start_at, "invoker": invoker[:128]}
    if lease_until is not None:
        values["lease_until"] = lease_until
    done = conn.execute(update(_A).where(_held(activation_id, claim)).values(values))
    return rowcount(done) == 1


def finish(conn: Connection, cols: Mapping[str, Any], claim: str | None) -> bool:
    """Write the outcome `cols` of a running activation held by `claim`; False if not held."""
    done = conn.execute(
        update(_A)
        .where(_held(cols["id"], claim or ""))
        .values(**{k: v for k, v in cols.items() if k != "id"}, lease_until=None)
    )
    return rowcount(done) == 1


def expire(conn: Connection, now: float) -> tuple[int, int]:
    """End the leases that expired before `now`: (queued again, interrupted)."""
    expired = (_A.c.status == "running") & (_A.c.lease_until < now)
    requeued = conn.execute(
        update(_A)
        .where(expired, _A.c.start_at.is_(None))
        .values(status="queued", claimed_by=None, lease_until=None)
    )
    interrupted = conn.execute(
        update(_A)
        .where(expired, _A.c.start_at.is_not(None))
        .values(status="platform_error", end_at=now, error=INTERRUPTED, lease_until=None)
    )
    return rowcount(requeued), rowcount(interrupted)
