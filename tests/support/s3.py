"""A real S3-compatible server on loopback for tests: moto's standalone server as a process."""

from __future__ import annotations

import dataclasses
from typing import Any

from sllm.bench._coldstart_s3 import S3Server as _MotoServer
from sllm.bench._coldstart_s3 import free_port
from sllm.store import StoreSettings

__all__ = ["ACCESS_KEY", "REGION", "SECRET_KEY", "S3Server", "free_port", "s3_settings"]

ACCESS_KEY = "test"  # moto accepts any credentials
SECRET_KEY = "testtest"
REGION = "us-east-1"


class S3Server(_MotoServer):
    """`python -m moto.server` (stock, unpatched) on 127.0.0.1 and a free port."""

    def __init__(self, port: int | None = None) -> None:
        super().__init__(
            port,
            module="moto.server",
            access_key=ACCESS_KEY,
            secret_key=SECRET_KEY,
            start_timeout=20.0,
            stop_timeout=5.0,
        )

    def settings(self, **overrides: Any) -> StoreSettings:
        """StoreSettings that reach this server."""
        return s3_settings(self, **overrides)


def s3_settings(server: S3Server, **overrides: Any) -> StoreSettings:
    """StoreSettings for `server` (plain HTTP, test credentials); `overrides` replace fields."""
    base = StoreSettings(
        endpoint=server.endpoint,
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        secure=False,
        region=REGION,
    )
    return dataclasses.replace(base, **overrides)
