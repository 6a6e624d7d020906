"""Databases for tests: a fresh SQLite file, or a fresh database on a PostgreSQL server.

The fixtures built on these helpers live in tests/conftest.py: `sqlite_url`,
`pg_url`, and `db_url` (both, parametrized).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy import make_url

from sllm.db import Database, postgres_unreachable, scratch_postgres_database

__all__ = [
    "DEFAULT_POSTGRES_URL",
    "fresh_postgres_database",
    "hide_password",
    "postgres_admin_url",
    "postgres_unreachable_reason",
    "sqlite_database_url",
    "upgrade_database",
]

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_admin_url(env: Mapping[str, str]) -> str:
    """SLLM_TEST_POSTGRES_URL, else DEFAULT_POSTGRES_URL: a server where tests may create databases."""
    return env.get("SLLM_TEST_POSTGRES_URL") or DEFAULT_POSTGRES_URL


def hide_password(url: str) -> str:
    """`url` with its password, if any, replaced by ***."""
    return make_url(url).render_as_string(hide_password=True)


def postgres_unreachable_reason(admin_url: str, *, timeout_s: int = 3) -> str | None:
    """None when `admin_url` accepts a connection, else why not (one line)."""
    return postgres_unreachable(admin_url, timeout_s=timeout_s)


def fresh_postgres_database(admin_url: str) -> AbstractContextManager[str]:
    """Create an empty database sllm_test_<hex> on `admin_url`'s server, yield its URL, drop it."""
    return scratch_postgres_database(admin_url, "sllm_test")


def sqlite_database_url(folder: Path) -> str:
    """The URL of a SQLite file in `folder` (created on first use)."""
    return f"sqlite:///{folder / 'sllm.db'}"


def upgrade_database(url: str) -> str | None:
    """Migrate `url` to head in a new `Database` and return its revision (a process pool target)."""
    db = Database(url, pool_size=1)
    try:
        db.upgrade()
        return db.current_revision()
    finally:
        db.dispose()
