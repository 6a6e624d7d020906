"""Activation records: what one invocation did, built as it runs and stored once it ends.

Statuses follow OpenWhisk's classes of outcome:

    queued -> running -> success | function_error | platform_error | timeout

A blocking invocation is written once, when it ends (nothing was acknowledged
before); a non-blocking one is written `queued` before its 202 and updated in
place under a lease (see _leases), so it survives a controller restart, runs
at most once, and ends in one final state.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from sllm.core.errors import FunctionError, PlatformError, SllmError
from sllm.db import Activation

FINAL = ("success", "function_error", "platform_error", "timeout")
STATUSES = ("queued", "running", *FINAL)


def new_activation_id() -> str:
    """A fresh activation id (32 hex digits, as OpenWhisk's)."""
    return uuid.uuid4().hex


def status_of(exc: SllmError) -> str:
    """The activation status an error ends it with."""
    if isinstance(exc, PlatformError):
        return "platform_error"
    if isinstance(exc, FunctionError) or exc.status < 500:
        return "function_error"
    return "platform_error"


@dataclass
class Run:
    """One invocation in progress: its identity, request, and measurements so far."""

    id: str
    namespace_id: int
    namespace: str
    function: str
    function_version: int
    model: str
    task: str
    request: dict[str, Any]
    blocking: bool
    stream: bool = False
    created_at: float = field(default_factory=time.time)
    received: float = field(default_factory=time.monotonic)
    start_at: float | None = None
    end_at: float | None = None
    status: str = "running"
    result: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    logs: list[str] = field(default_factory=list)
    wait_ms: float | None = None
    load_ms: float | None = None
    tier: str | None = None
    cold: bool | None = None
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    invoker: str | None = None
    attempts: int = 0  # dispatches to an invoker: the first, retries and resumes
    # Moves of the generation to another invoker (see _relay.Relay.move); `migrations`
    # in the row counts them.
    moves: list[dict[str, Any]] = field(default_factory=list)
    persisted: bool = False  # a row exists (queued, or stored as running)
    # Its client went away while the generation runs on for a reconnect (see _attach): a
    # process that attaches stores the rest, so this one's record never overwrites it.
    detached: bool = False
    attached: bool = False  # a reconnect continues it: its stored record is replaced
    claim: str | None = None  # the lease this process holds on the row (see _leases)
    # The caller's parameters as sent; `request` is them validated and merged with the
    # function's defaults. A queued activation stores `body` as its request until it runs.
    body: dict[str, Any] | None = None
    validated: bool = True  # `request` was made from `body` for `function_version`
    body_bytes: int = 0  # the size of the request as received (0: not known)
    # When a failed run may be retried (an overload's Retry-After); for the answer, not stored.
    retry_after: float | None = None

    def log(self, message: str) -> None:
        """Append a timestamped line to the activation's log."""
        stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        self.logs.append(f"{stamp} {message}")

    def dispatched(self, invoker: str) -> bool:
        """The request leaves for `invoker`: the wait is over. True the first time."""
        self.invoker = invoker
        self.attempts += 1
        if self.wait_ms is not None:
            return False
        self.wait_ms = (time.monotonic() - self.received) * 1000
        self.start_at = time.time()
        return True

    def started(self, event: dict[str, Any]) -> None:
        """The invoker's start event: how the model got ready."""
        load = event.get("load") or {}
        self.cold = bool(load.get("cold"))
        self.tier = load.get("tier") if self.cold else "gpu"
        self.load_ms = float(load.get("load_seconds", 0.0)) * 1000 if self.cold else 0.0
        self.tokens_in = event.get("prompt_tokens")
        how = f"cold from {self.tier}, load {self.load_ms / 1000:.3f} s" if self.cold else "warm"
        self.log(f"running on {self.invoker} ({how})")

    def first_token(self) -> None:
        """Record the time to first token (from the request's arrival)."""
        if self.ttft_ms is None:
            self.ttft_ms = (time.monotonic() - self.received) * 1000

    def finish(self, status: str, *, result: Any = None, error: SllmError | None = None) -> None:
        """End the run."""
        self.status = status
        self.end_at = time.time()
        if self.start_at is None:
            self.start_at = self.end_at
        if result is not None:
            self.result = result
        if error is not None:
            self.error = error.to_json()["error"]
            self.retry_after = error.retry_after
            self.log(f"{status}: {error.message}")
        else:
            self.log(status)

    def columns(self) -> dict[str, Any]:
        """Every column of the activation row."""
        return {
            "id": self.id,
            "namespace_id": self.namespace_id,
            "function_name": self.function,
            "function_version": self.function_version,
            "model": self.model,
            "task": self.task,
            "status": self.status,
            "blocking": self.blocking,
            "stream": self.stream,
            "request": self.request,
            "result": self.result,
            "error": self.error,
            "logs": self.logs,
            "created_at": self.created_at,
            "start_at": self.start_at,
            "end_at": self.end_at,
            "wait_ms": self.wait_ms,
            "load_ms": self.load_ms,
            "tier": self.tier,
            "cold": self.cold,
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "invoker": self.invoker,
            "attempts": self.attempts,
            # Moves that happened (a migration aborted or refused stays in `moves` only).
            "migrations": sum(1 for m in self.moves if m.get("outcome", "moved") == "moved"),
            "moves": [dict(m) for m in self.moves] or None,
        }

    @classmethod
    def of(cls, row: Activation, namespace: str) -> Run:
        """A queued activation, to run it."""
        return cls(
            id=row.id,
            namespace_id=row.namespace_id,
            namespace=namespace,
            function=row.function_name,
            function_version=row.function_version,
            model=row.model,
            task=row.task,
            request=dict(row.request),
            blocking=row.blocking,
            created_at=row.created_at,
            logs=list(row.logs or []),
            attempts=row.attempts,
            persisted=True,
            claim=row.claimed_by,
            body=dict(row.request),  # as sent: validated again when it runs
            validated=False,
        )


def activation_json(row: Activation, namespace: str, *, full: bool = True) -> dict[str, Any]:
    """An activation as the API shows it (`full` adds request, result, error and logs)."""
    duration = (
        (row.end_at - row.start_at) * 1000
        if row.end_at is not None and row.start_at is not None
        else None
    )
    doc: dict[str, Any] = {
        "activationId": row.id,
        "namespace": namespace,
        "name": row.function_name,
        "version": row.function_version,
        "model": row.model,
        "task": row.task,
        "status": row.status,
        "success": row.status == "success",
        "blocking": row.blocking,
        "created": row.created_at,
        "start": row.start_at,
        "end": row.end_at,
        "duration_ms": duration,
        "wait_ms": row.wait_ms,
        "load_ms": row.load_ms,
        "tier": row.tier,
        "cold": row.cold,
        "ttft_ms": row.ttft_ms,
        "tpot_ms": row.tpot_ms,
        "tokens_in": row.tokens_in,
        "tokens_out": row.tokens_out,
        "invoker": row.invoker,
        "migrations": row.migrations,
        "attempts": row.attempts,
        "moves": row.moves or [],
    }
    if full:
        doc.update(request=row.request, result=row.result, error=row.error, logs=row.logs)
    return doc
