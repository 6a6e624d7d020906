"""The controller's configuration: defaults, a constructor from the environment, validation."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sllm.core.config import parse_size
from sllm.core.errors import InvalidRequest
from sllm.db import database_url

if TYPE_CHECKING:
    from sllm.store import StoreSettings

MiB = 1024**2
MAX_MIGRATION_THRESHOLD = 4096  # tokens
MAX_MIGRATION_ROUNDS = 64


@dataclass(frozen=True)
class FunctionDefaults:
    """Limits and scaling a function gets when its definition leaves them out."""

    timeout_s: float = 60.0  # as OpenWhisk's default; blocking calls then run inline
    max_tokens: int = 512
    concurrency: int = 4
    max_payload_bytes: int = 1 * MiB
    min_instances: int = 0
    max_instances: int = 1
    keep_alive_s: float = 300.0


@dataclass(frozen=True)
class ControllerConfig:
    """Everything a controller process needs; every field has a sane default."""

    database_url: str = ""
    internal_token: str = ""  # shared with the invokers
    admin_key: str = ""  # bootstrap admin API key (optional; keys also live in the database)
    host: str = "127.0.0.1"
    port: int = 8700  # 0: any free port (see port_file)
    port_file: str = ""  # where the bound port is written once listening (for port 0)
    workers: int = 2
    threads: int = 32
    domain: str = "sllm.local"  # Knative-style routing: Host {fn}.{ns}.{domain}
    blocking_timeout: float = 60.0  # a blocking invocation answers 202 after this long
    heartbeat_timeout: float = 10.0  # an invoker silent this long leaves the rotation
    max_queue: int = 64  # requests waiting per function and controller process
    max_body_bytes: int = 8 * MiB
    # What one client may take of a worker (see _worker): the head must be in within
    # header_timeout, the body within body_timeout after it; connections per worker.
    header_timeout: float = 10.0
    body_timeout: float = 60.0
    max_header_bytes: int = 64 * 1024
    max_connections: int = 1000
    max_tokens_limit: int = 4096  # the largest max_tokens a function may allow
    maintenance_interval: float = 1.0
    queue_workers: int = 8  # non-blocking activations run at once per controller process
    lease_margin: float = 30.0  # a running activation's lease: its timeout plus this
    # A generation whose invoker is lost mid-stream resumes elsewhere (see _resume): at most
    # this many times per choice, within the function's timeout.
    resume_attempts: int = 3
    # An invoker stream silent this long after it started is taken for lost (a dead
    # connection, a reset or a killed process, is seen at once). Twice the heartbeat
    # timeout: a decode step, or the recompute of a preempted generation, takes far less;
    # a host that stopped altogether is out of rotation (heartbeats) before this.
    stall_timeout: float = 20.0
    # A live migration's rounds (see _migration): another round while the last one ended
    # with at least `migration_threshold` new tokens on the source, up to
    # `migration_max_rounds`; 0 rounds is stop-and-recompute (the benchmark's baseline).
    migration_threshold: int = 4
    migration_max_rounds: int = 4
    functions: FunctionDefaults = dataclasses.field(default_factory=FunctionDefaults)
    store_uri: str = ""  # where models are published; empty: models are not checked at create
    store_settings: StoreSettings | None = None  # S3 endpoint and credentials (SLLM_S3_*)

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> ControllerConfig:
        """Read SLLM_* variables; keyword overrides (CLI flags) win."""
        values: dict[str, Any] = {
            "database_url": database_url(env),
            "internal_token": env.get("SLLM_INTERNAL_TOKEN", ""),
            "admin_key": env.get("SLLM_ADMIN_KEY", ""),
            "host": env.get("SLLM_HOST", "127.0.0.1"),
            "domain": env.get("SLLM_DOMAIN", "sllm.local"),
            "store_uri": env.get("SLLM_STORE_URI", ""),
            "port_file": env.get("SLLM_PORT_FILE", ""),
        }
        if values["store_uri"]:
            from sllm.store import StoreSettings  # the object store client only when needed

            try:
                values["store_settings"] = StoreSettings.from_env(env)
            except InvalidRequest as exc:
                raise ValueError(exc.message) from None
        # Knative's runtime contract: listen on $PORT; SLLM_PORT (and --port) still win.
        port_var = "SLLM_PORT" if "SLLM_PORT" in env else "PORT"
        for name, var in {
            "port": port_var,
            "workers": "SLLM_WORKERS",
            "threads": "SLLM_THREADS",
            "max_queue": "SLLM_MAX_QUEUE",
            "max_tokens_limit": "SLLM_MAX_TOKENS_LIMIT",
            "queue_workers": "SLLM_QUEUE_WORKERS",
            "max_connections": "SLLM_MAX_CONNECTIONS",
            "resume_attempts": "SLLM_RESUME_ATTEMPTS",
            "migration_threshold": "SLLM_MIGRATION_THRESHOLD",
            "migration_max_rounds": "SLLM_MIGRATION_MAX_ROUNDS",
        }.items():
            if var in env:
                values[name] = _number(env, var, int)
        for name, var in {
            "blocking_timeout": "SLLM_BLOCKING_TIMEOUT",
            "heartbeat_timeout": "SLLM_HEARTBEAT_TIMEOUT",
            "maintenance_interval": "SLLM_MAINTENANCE_INTERVAL",
            "lease_margin": "SLLM_LEASE_MARGIN",
            "header_timeout": "SLLM_HEADER_TIMEOUT",
            "body_timeout": "SLLM_BODY_TIMEOUT",
            "stall_timeout": "SLLM_STALL_TIMEOUT",
        }.items():
            if var in env:
                values[name] = _number(env, var, float)
        if "SLLM_MAX_BODY" in env:
            values["max_body_bytes"] = parse_size(env["SLLM_MAX_BODY"], name="SLLM_MAX_BODY")
        if "SLLM_MAX_HEADER" in env:
            values["max_header_bytes"] = parse_size(env["SLLM_MAX_HEADER"], name="SLLM_MAX_HEADER")
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        """Raise ValueError naming the first bad setting."""
        if not self.internal_token:
            raise ValueError("SLLM_INTERNAL_TOKEN: the controller needs the invokers' token")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("workers", "threads", "max_queue", "max_tokens_limit", "queue_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.resume_attempts < 0:
            raise ValueError(f"resume_attempts must be at least 0, got {self.resume_attempts}")
        if not 1 <= self.migration_threshold <= MAX_MIGRATION_THRESHOLD:
            raise ValueError(
                f"migration_threshold must be in [1, {MAX_MIGRATION_THRESHOLD}] tokens, "
                f"got {self.migration_threshold}"
            )
        if not 0 <= self.migration_max_rounds <= MAX_MIGRATION_ROUNDS:
            raise ValueError(
                f"migration_max_rounds must be in [0, {MAX_MIGRATION_ROUNDS}] "
                f"(0: stop-and-recompute), got {self.migration_max_rounds}"
            )
        if self.max_connections <= self.threads:
            raise ValueError(
                f"max_connections must exceed threads ({self.threads}), got {self.max_connections}"
            )
        if self.max_header_bytes < 1024:
            raise ValueError(f"max_header_bytes must be at least 1024, got {self.max_header_bytes}")
        for name in (
            "blocking_timeout",
            "heartbeat_timeout",
            "maintenance_interval",
            "lease_margin",
            "header_timeout",
            "body_timeout",
            "stall_timeout",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not self.domain or self.domain.startswith("."):
            raise ValueError(f"domain must be a DNS name, got {self.domain!r}")


def _number(env: Mapping[str, str], var: str, kind: type[int] | type[float]) -> int | float:
    try:
        return kind(env[var])
    except ValueError:
        raise ValueError(f"{var}: expected a number, got {env[var]!r}") from None
