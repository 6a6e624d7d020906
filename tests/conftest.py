"""Shared test set-up: `gpu` tests skip without CUDA; transformers stays quiet."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Silence transformers' progress bars in test output."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when this machine has no usable CUDA device."""
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip)


# Databases. A test that needs one asks for `db_url` (runs twice: SQLite and
# PostgreSQL), or `sqlite_url` / `pg_url` for one backend; each gets an empty
# database of its own (no schema: call `Database(url).upgrade()`). PostgreSQL is
# the server at SLLM_TEST_POSTGRES_URL (default postgresql+psycopg://postgres@
# 127.0.0.1:5432/test); when it is unreachable, its tests skip, or fail when
# SLLM_REQUIRE_POSTGRES=1 (as in CI).


@pytest.fixture(scope="session")
def postgres_admin_url() -> str:
    """The PostgreSQL server's admin URL; skips (or fails) the test when it is unreachable."""
    import os

    from tests.support import databases

    url = databases.postgres_admin_url(os.environ)
    reason = databases.postgres_unreachable_reason(url)
    if reason is not None:
        message = (
            f"PostgreSQL is not reachable at {databases.hide_password(url)}; "
            "set SLLM_TEST_POSTGRES_URL"
        )
        if os.environ.get("SLLM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{message} ({reason})")
        pytest.skip(message)
    return url


@pytest.fixture
def pg_url(postgres_admin_url: str) -> Iterator[str]:
    """The URL of a new, empty PostgreSQL database, dropped after the test."""
    from tests.support.databases import fresh_postgres_database

    with fresh_postgres_database(postgres_admin_url) as url:
        yield url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """The URL of a new, empty SQLite file under the test's tmp_path."""
    from tests.support.databases import sqlite_database_url

    return sqlite_database_url(tmp_path / "db")


@pytest.fixture(params=["sqlite", "postgres"], ids=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest) -> str:
    """A new, empty database on each backend in turn: the `sqlite_url` or the `pg_url`."""
    url: str = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    return url
