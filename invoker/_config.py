"""The invoker's configuration: defaults, a constructor from the environment, validation."""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllm.core.config import parse_bool, parse_size, sllm_home
from sllm.store import StoreSettings

GiB = 1024**3
MiB = 1024**2


@dataclass(frozen=True)
class InvokerConfig:
    """Everything an invoker process needs; every field has a sane default."""

    token: str = ""
    host: str = "127.0.0.1"
    port: int = 8701  # 0: any free port (see port_file)
    port_file: str = ""  # where the bound port is written once listening (for port 0)
    cache_dir: Path = field(default_factory=lambda: Path.home() / ".sllm" / "invoker")
    store_uri: str = ""
    store_settings: StoreSettings = field(default_factory=StoreSettings)
    nvme_capacity: int = 64 * GiB
    dram_capacity: int = 16 * GiB
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    download_concurrency: int = 8
    part_size: int = 16 * MiB
    threads: int = 16  # request threads of the HTTP server
    default_concurrency: int = 4  # generations at once per function unless the load says otherwise
    queue_timeout: float = 30.0
    max_tokens_limit: int = 4096
    max_body_bytes: int = 4 * MiB
    measure_bandwidth: bool = True
    controller_url: str = ""  # where to register and heartbeat (none: standalone)
    name: str = ""  # this invoker's name at the controller (default host:port)
    advertise_url: str = ""  # how the controller reaches this invoker (default http://host:port)
    heartbeat_interval: float = 2.0
    batching: bool = True  # one batched forward pass for an instance's streams (off: one at a time)
    kv_cache_bytes: int = (
        0  # KV cache budget per instance; 0: a quarter of DRAM, or half the free GPU
    )
    prefill_chunk: int = 256  # prompt tokens per step, so a long prompt never stalls other streams
    # A held generation (migration target) with no prefill or continue for this long is
    # cancelled and its KV memory freed: a migration's rounds come seconds apart, and a
    # controller that restarts mid-migration is back well within it (see invoker/_holds.py).
    hold_timeout: float = 120.0
    # SIGTERM drains first: running generations get this long to finish (see _drain). The
    # default function timeout (60 s): a generation of a function with default limits that
    # runs at the SIGTERM finishes within it.
    drain_grace: float = 60.0
    # A resumable generation (the controller's relay asks for every one) whose reader went
    # away runs on this long for a reader to attach (its controller's client reconnecting,
    # or another controller replica taking over; see _feed); 0: cancelled at once.
    detach_grace: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> InvokerConfig:
        """Read SLLM_INVOKER_* / SLLM_* variables; keyword overrides (CLI flags) win."""
        home = sllm_home(env)
        values: dict[str, Any] = {
            "token": env.get("SLLM_INTERNAL_TOKEN", ""),
            "host": env.get("SLLM_INVOKER_HOST", "127.0.0.1"),
            "cache_dir": Path(env.get("SLLM_INVOKER_CACHE_DIR") or home / "invoker"),
            "store_uri": env.get("SLLM_STORE_URI") or f"file://{home / 'store'}",
            "device": env.get("SLLM_INVOKER_DEVICE", "auto"),
            "store_settings": StoreSettings.from_env(env),
            "controller_url": env.get("SLLM_CONTROLLER_URL", ""),
            "name": env.get("SLLM_INVOKER_NAME", ""),
            "advertise_url": env.get("SLLM_INVOKER_URL", ""),
            "port_file": env.get("SLLM_INVOKER_PORT_FILE", ""),
        }
        ints = {
            "port": "SLLM_INVOKER_PORT",
            "download_concurrency": "SLLM_DOWNLOAD_CONCURRENCY",
            "threads": "SLLM_INVOKER_THREADS",
            "default_concurrency": "SLLM_INVOKER_CONCURRENCY",
            "max_tokens_limit": "SLLM_MAX_TOKENS_LIMIT",
            "prefill_chunk": "SLLM_PREFILL_CHUNK",
        }
        for name, var in ints.items():
            if var in env:
                try:
                    values[name] = int(env[var])
                except ValueError:
                    raise ValueError(f"{var}: expected an integer, got {env[var]!r}") from None
        sizes = {
            "nvme_capacity": "SLLM_NVME_CAPACITY",
            "dram_capacity": "SLLM_DRAM_CAPACITY",
            "part_size": "SLLM_DOWNLOAD_PART_SIZE",
            "max_body_bytes": "SLLM_INVOKER_MAX_BODY",
            "kv_cache_bytes": "SLLM_KV_CACHE_BYTES",
        }
        for name, var in sizes.items():
            if var in env:
                values[name] = parse_size(env[var], name=var)
        for name, var in (
            ("queue_timeout", "SLLM_QUEUE_TIMEOUT"),
            ("hold_timeout", "SLLM_HOLD_TIMEOUT"),
            ("drain_grace", "SLLM_DRAIN_GRACE"),
            ("detach_grace", "SLLM_DETACH_GRACE"),
        ):
            if var in env:
                try:
                    values[name] = float(env[var])
                except ValueError:
                    raise ValueError(f"{var}: expected seconds, got {env[var]!r}") from None
        for name, var in (
            ("measure_bandwidth", "SLLM_MEASURE_BANDWIDTH"),
            ("batching", "SLLM_BATCHING"),
        ):
            if var in env:
                values[name] = parse_bool(env[var], name=var)
        values.update({k: v for k, v in overrides.items() if v is not None})
        if isinstance(values["cache_dir"], str):
            values["cache_dir"] = Path(os.path.expanduser(values["cache_dir"]))
        return cls(**values)

    @property
    def public_name(self) -> str:
        """The name this invoker registers under."""
        return self.name or f"{socket.gethostname()}:{self.port}"

    @property
    def public_url(self) -> str:
        """The URL the controller calls this invoker at."""
        return (self.advertise_url or f"http://{self.host}:{self.port}").rstrip("/")

    def replace(self, **changes: Any) -> InvokerConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def validate(self) -> None:
        """Raise ValueError naming the first bad value and its allowed range."""
        if not self.token:
            raise ValueError(
                "the internal token is empty: set SLLM_INTERNAL_TOKEN or --token "
                "(the controller and invokers share it)"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"port must be 0..65535 (0: any free port), got {self.port}")
        checks: list[tuple[str, float, float, float]] = [
            ("nvme_capacity", self.nvme_capacity, 1, float("inf")),
            ("dram_capacity", self.dram_capacity, 1, float("inf")),
            ("download_concurrency", self.download_concurrency, 1, 256),
            ("part_size", self.part_size, MiB, 1024 * MiB),
            ("threads", self.threads, 1, 1024),
            ("default_concurrency", self.default_concurrency, 1, 1024),
            ("queue_timeout", self.queue_timeout, 0, 3600),
            ("max_tokens_limit", self.max_tokens_limit, 1, 1 << 20),
            ("max_body_bytes", self.max_body_bytes, 1024, 1 << 30),
            ("heartbeat_interval", self.heartbeat_interval, 0.05, 3600),
            ("kv_cache_bytes", self.kv_cache_bytes, 0, float("inf")),
            ("prefill_chunk", self.prefill_chunk, 1, 1 << 16),
            ("hold_timeout", self.hold_timeout, 0.1, 86400),
            ("drain_grace", self.drain_grace, 0, 3600),
            ("detach_grace", self.detach_grace, 0, 3600),
        ]
        for name, value, lo, hi in checks:
            if not lo <= value <= hi:
                raise ValueError(f"{name} must be in [{lo}, {hi}], got {value}")
        if self.device not in ("auto", "cpu", "cuda") and not (
            self.device.startswith("cuda:") and self.device[5:].isdigit()
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.controller_url and not self.controller_url.startswith(("http://", "https://")):
            raise ValueError(f"controller_url must be an http(s) URL, got {self.controller_url!r}")
        if not self.store_uri:
            raise ValueError("store_uri is empty: set SLLM_STORE_URI or --store")
        if self.store_uri.startswith("s3://"):
            if not self.store_settings.endpoint:
                raise ValueError(
                    f"store {self.store_uri} needs an S3 endpoint: set SLLM_S3_ENDPOINT "
                    "and the SLLM_S3_ACCESS_KEY / SLLM_S3_SECRET_KEY credentials"
                )
            self.store_settings.validate()
