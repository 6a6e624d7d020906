"""The controller's tables as typed SQLAlchemy models.

Times are float seconds since the epoch (UTC). Models are plain rows without
relationships: the controller writes explicit queries. Every stated default
exists twice, in Python and as a server default, so raw INSERTs get it too.
"""

from __future__ import annotations

import uuid
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Double,
    ForeignKey,
    Index,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    false,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint and index names, identical on PostgreSQL and SQLite, so that
# migrations can refer to them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base: float columns are double precision, dicts and lists are JSON."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 (SQLAlchemy reads this class attribute)
        float: Double(),
        dict[str, Any]: JSON(),
        list[str]: JSON(),
    }


def _new_activation_id() -> str:
    return uuid.uuid4().hex


class Namespace(Base):
    """A tenant: functions, keys and activations belong to one."""

    __tablename__ = "namespaces"
    # Ids are identities (a cached API key names its namespace by id): SQLite must not
    # give a deleted namespace's id to a new one, as it does without AUTOINCREMENT.
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(63), unique=True)
    created_at: Mapped[float]


class ApiKey(Base):
    """An API key: the public key_id and the sha256 hex of its secret; admin keys have no namespace."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    key_id: Mapped[str] = mapped_column(String(32), unique=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    namespace_id: Mapped[int | None] = mapped_column(
        ForeignKey("namespaces.id", ondelete="CASCADE")
    )
    admin: Mapped[bool] = mapped_column(default=False, server_default=false())
    label: Mapped[str] = mapped_column(String(255), default="", server_default=text("''"))
    created_at: Mapped[float]
    revoked_at: Mapped[float | None]


class Function(Base):
    """A function: a named model deployment with its limits, scaling policy and default parameters."""

    __tablename__ = "functions"
    # Never a deleted function's id again (SQLite): a cached definition is checked by id.
    __table_args__ = (UniqueConstraint("namespace_id", "name"), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(63))
    model: Mapped[str] = mapped_column(String(128))
    task: Mapped[str] = mapped_column(String(16))  # "generate" | "embed"
    timeout_s: Mapped[float]
    max_tokens: Mapped[int]
    concurrency: Mapped[int]
    max_payload_bytes: Mapped[int]
    min_instances: Mapped[int]
    max_instances: Mapped[int]
    target_concurrency: Mapped[int]
    keep_alive_s: Mapped[float]
    params: Mapped[dict[str, Any]]  # default invocation parameters
    version: Mapped[int] = mapped_column(default=1, server_default=text("1"))
    created_at: Mapped[float]
    updated_at: Mapped[float]
    # The last failed prewarm load ({code, message, at}) until one succeeds: shown on the
    # function; the next prewarm waits until load_retry_at (backoff over load_failures).
    load_error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    load_failures: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    load_retry_at: Mapped[float | None]
    # What a stream does when its invoker is lost mid-generation: "resume" it on another
    # invoker from the tokens relayed, or "fail" with invoker_lost.
    on_invoker_loss: Mapped[str] = mapped_column(
        String(8), default="resume", server_default=text("'resume'")
    )


class Activation(Base):
    """The record of one invocation; it outlives its function, so the function is named, not keyed."""

    __tablename__ = "activations"
    __table_args__ = (
        Index("ix_activations_namespace_id_created_at", "namespace_id", "created_at"),
        Index(
            "ix_activations_namespace_id_function_name_created_at",
            "namespace_id",
            "function_name",
            "created_at",
        ),
        Index("ix_activations_status_created_at", "status", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=_new_activation_id)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"))
    function_name: Mapped[str] = mapped_column(String(63))
    function_version: Mapped[int]
    model: Mapped[str] = mapped_column(String(128))
    task: Mapped[str] = mapped_column(String(16))
    # "queued" | "running" | "success" | "function_error" | "platform_error" | "timeout"
    status: Mapped[str] = mapped_column(String(24))
    blocking: Mapped[bool]
    stream: Mapped[bool] = mapped_column(default=False, server_default=false())
    request: Mapped[dict[str, Any]]  # the invocation parameters
    # none_as_null: Python None is SQL NULL, never the JSON value null.
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    error: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))  # code, message
    logs: Mapped[list[str]]
    created_at: Mapped[float]
    start_at: Mapped[float | None]
    end_at: Mapped[float | None]
    wait_ms: Mapped[float | None]
    load_ms: Mapped[float | None]
    tier: Mapped[str | None] = mapped_column(String(8))  # gpu | dram | nvme | remote
    cold: Mapped[bool | None]
    ttft_ms: Mapped[float | None]
    tpot_ms: Mapped[float | None]
    tokens_in: Mapped[int | None]
    tokens_out: Mapped[int | None]
    invoker: Mapped[str | None] = mapped_column(String(128))  # the invoker's name
    migrations: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    attempts: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    claimed_by: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[float | None]
    # Each move of the generation to another invoker: {"kind": "resume" | "migrate", "from",
    # "to", "at", "choice", "tokens", "pause_ms", "reason"}; NULL: it never moved.
    moves: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON(none_as_null=True))


class MigrationRequest(Base):
    """A live migration asked for (admin API or a drain), until the controller process that
    relays the activation takes it: a running stream's activation has no row of its own."""

    __tablename__ = "migration_requests"

    activation_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    namespace_id: Mapped[int] = mapped_column(ForeignKey("namespaces.id", ondelete="CASCADE"))
    to_invoker: Mapped[str | None] = mapped_column(String(128))  # NULL: any other invoker
    reason: Mapped[str] = mapped_column(String(16))  # "api" | "drain"
    requested_at: Mapped[float]


class Invoker(Base):
    """A registered invoker host and its last status report."""

    __tablename__ = "invokers"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    url: Mapped[str] = mapped_column(String(512))
    device: Mapped[str] = mapped_column(String(64))
    capacity: Mapped[dict[str, Any]]  # tier -> bytes
    # The last status report; its "drain" key is the controller's drain record (see
    # sllm.controller._drain), kept across heartbeats.
    status: Mapped[dict[str, Any]]
    state: Mapped[str] = mapped_column(String(16))  # "active" | "draining" | "drained" | "lost"
    registered_at: Mapped[float]
    last_heartbeat: Mapped[float]


class Instance(Base):
    """A function's model loaded (or loading) on one invoker."""

    __tablename__ = "instances"
    __table_args__ = (
        UniqueConstraint("function_id", "invoker_id"),
        Index("ix_instances_function_id_state", "function_id", "state"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    function_id: Mapped[int] = mapped_column(ForeignKey("functions.id", ondelete="CASCADE"))
    invoker_id: Mapped[int] = mapped_column(ForeignKey("invokers.id", ondelete="CASCADE"))
    state: Mapped[str] = mapped_column(String(16))  # "loading" | "ready" | "unloading"
    in_flight: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    tier: Mapped[str | None] = mapped_column(String(8))
    load_ms: Mapped[float | None]
    created_at: Mapped[float]
    ready_at: Mapped[float | None]
    last_used_at: Mapped[float]


def table(model: type[Base]) -> Table:
    """The Core table of a model, for prepared statements (typed: `__table__` is a FromClause)."""
    return cast(Table, model.__table__)
