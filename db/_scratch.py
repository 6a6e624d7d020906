"""Throw-away PostgreSQL databases for tests and benchmarks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import create_engine, make_url, pool, text
from sqlalchemy.exc import OperationalError


def postgres_unreachable(admin_url: str, *, timeout_s: int = 3) -> str | None:
    """None when `admin_url` accepts a connection, else why not (one line)."""
    engine = create_engine(
        admin_url, poolclass=pool.NullPool, connect_args={"connect_timeout": timeout_s}
    )
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as exc:
        return str(exc.orig or exc).strip().splitlines()[0]
    finally:
        engine.dispose()
    return None


@contextmanager
def scratch_postgres_database(admin_url: str, prefix: str) -> Iterator[str]:
    """Create an empty database `{prefix}_<hex>` on `admin_url`'s server, yield its URL, drop it."""
    name = f"{prefix}_{uuid.uuid4().hex[:16]}"
    admin = create_engine(admin_url, poolclass=pool.NullPool, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                # FORCE: a user that leaked a connection must not leak the database too.
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()
