"""Prewarm failures: backoff between loads of a function that fails to load, and its error.

A function below its min_instances is loaded by maintenance. When the load
fails (a model that is missing, corrupt, or too big), the function records the
error and the time of the next try, which doubles with each failure up to a
cap, as Kubernetes' CrashLoopBackOff does:

    failures 1, 2, 3, ... -> wait 1, 2, 4, ... s, at most BACKOFF_CAP_S

A load that succeeds (prewarm or an invocation's cold start) or a new
definition of the function clears the error, and the next pass loads at once.
The error is shown on the function (`sllm fn get`) while it stands.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection, select, update

from sllm.core.errors import SllmError
from sllm.db import Function, Instance, table

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 300.0

_F, _I = table(Function), table(Instance)

CLEARED = {"load_error": None, "load_failures": 0, "load_retry_at": None}


def backoff(failures: int) -> float:
    """Seconds to wait after the `failures`-th failed load in a row (1 -> BACKOFF_BASE_S)."""
    return float(min(BACKOFF_BASE_S * 2.0 ** min(max(failures - 1, 0), 30), BACKOFF_CAP_S))


def record_failure(
    conn: Connection, function_id: int, version: int, exc: SllmError, now: float
) -> float:
    """Store a failed load of `function_id` (still at `version`); the seconds until the next."""
    failures = (
        conn.execute(
            select(_F.c.load_failures).where(_F.c.id == function_id, _F.c.version == version)
        ).scalar()
        or 0
    ) + 1
    wait = backoff(failures)
    conn.execute(
        update(_F)
        .where(_F.c.id == function_id, _F.c.version == version)  # a new definition starts afresh
        .values(
            load_error={"code": exc.code, "message": exc.message, "at": now},
            load_failures=_F.c.load_failures + 1,
            load_retry_at=now + wait,
        )
    )
    return wait


def clear_for_instance(conn: Connection, instance_id: int) -> None:
    """An instance of the function loaded: forget its failed loads (no write when none)."""
    function_id = select(_I.c.function_id).where(_I.c.id == instance_id).scalar_subquery()
    conn.execute(update(_F).where(_F.c.id == function_id, _F.c.load_failures > 0).values(CLEARED))


def load_error_json(row: Function) -> dict[str, Any] | None:
    """Why the function is not warm, as the API shows it (None when nothing failed)."""
    if not row.load_error:
        return None
    return {**row.load_error, "failures": row.load_failures, "retry_at": row.load_retry_at}
