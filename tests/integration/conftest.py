"""Integration fixtures: a moto S3 server per session, a fresh bucket or folder per test."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sllm.store import StoreSettings
from tests.support.s3 import S3Server

_buckets = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One S3-compatible server (moto) on loopback for the whole session."""
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_store_uri(s3_server: S3Server) -> tuple[str, StoreSettings]:
    """A fresh, unique bucket on the session's server: (uri, settings)."""
    bucket = f"test-{next(_buckets)}-{uuid.uuid4().hex[:8]}"
    return f"s3://{bucket}", s3_server.settings()


@pytest.fixture
def file_store_uri(tmp_path: Path) -> str:
    """A fresh folder store under the test's tmp_path."""
    return (tmp_path / "store").as_uri()
