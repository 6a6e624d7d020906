"""The database URL from the environment, and `Database`: engine, sessions and migrations.

SQLite concurrency model: every connection runs in WAL mode, so readers never
block the writer. pysqlite's own transaction handling is switched off and
SQLAlchemy's `begin` event emits the BEGIN: a plain (deferred) BEGIN for read
sessions, BEGIN IMMEDIATE for write sessions. A write session therefore takes
SQLite's write lock up front and waits for it (busy timeout) instead of failing
with "database is locked" when it upgrades from reading to writing while
another process writes.
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from sllm.core.config import sllm_home

_SCHEMES = {
    "sqlite": "sqlite",
    "postgres": "postgresql+psycopg",
    "postgresql": "postgresql+psycopg",
    "postgresql+psycopg": "postgresql+psycopg",
}
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# Key of the PostgreSQL advisory lock that serialises `upgrade()` across processes.
_MIGRATION_LOCK_KEY = 0x5E11_DB_0001
# Execution option that marks the engine behind write sessions (SQLite: BEGIN IMMEDIATE).
_WRITE = "sllm_write"
_SQLITE_PRAGMAS = (
    "PRAGMA busy_timeout=30000",  # first: the journal-mode switch below may wait for a lock
    "PRAGMA journal_mode=WAL",
    "PRAGMA synchronous=NORMAL",
    "PRAGMA foreign_keys=ON",
)


def database_url(env: Mapping[str, str]) -> str:
    """SLLM_DATABASE_URL (postgres:// becomes postgresql+psycopg://), else SQLite under SLLM_HOME."""
    if env.get("SLLM_DATABASE_URL"):
        return normalise_url(env["SLLM_DATABASE_URL"], name="SLLM_DATABASE_URL")
    return f"sqlite:///{sllm_home(env)}/sllm.db"


def normalise_url(url: str, *, name: str = "database URL") -> str:
    """`url` with the driver sllm uses; ValueError naming `name` unless SQLite or PostgreSQL."""
    example = "sqlite:///path/to/file.db or postgresql://user:password@host:port/dbname"
    scheme, sep, rest = url.strip().partition("://")
    if not sep:  # not echoed: it may hold a password
        raise ValueError(f"{name}: expected a URL such as {example}")
    driver = _SCHEMES.get(scheme.lower())
    if driver is None:
        raise ValueError(f"{name}: unsupported database scheme {scheme!r}; use {example}")
    return f"{driver}://{rest}"


class Database:
    """An engine plus session and migration helpers for SQLite or PostgreSQL.

    `pool_size` is how many PostgreSQL connections stay open. Call `dispose()`
    in a process that forked after this object used its pool.
    """

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        url = normalise_url(url)
        self._engine: Engine
        if url.startswith("sqlite"):
            self._engine = _sqlite_engine(url, echo=echo)
        else:
            self._engine = create_engine(url, pool_size=pool_size, pool_pre_ping=True, echo=echo)
        # Shares the pool and event listeners; only its execution options differ.
        self._write_engine = self._engine.execution_options(**{_WRITE: True})
        self._sessions = sessionmaker(self._engine, expire_on_commit=False)
        self._write_sessions = sessionmaker(self._write_engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        """The URL with any password hidden."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def dialect(self) -> str:
        """The backend: "sqlite" or "postgresql"."""
        return self._engine.dialect.name

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine."""
        return self._engine

    @contextmanager
    def session(self, write: bool = False) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on an exception.

        Pass write=True when the transaction will write: on SQLite it then
        starts with BEGIN IMMEDIATE (see the module docstring).
        """
        factory = self._write_sessions if write else self._sessions
        with factory.begin() as session:
            yield session

    def upgrade(self) -> None:
        """Migrate the schema to the newest revision; safe when several processes call it at once."""
        config = Config()
        config.set_main_option("script_location", str(_MIGRATIONS).replace("%", "%%"))
        if self.dialect == "sqlite":
            # Lock before connecting: a new connection may switch the file to WAL.
            with self._sqlite_migration_lock(), self._write_engine.connect() as conn:
                config.attributes["connection"] = conn
                _sqlite_upgrade(conn, config)
        else:
            with self._engine.connect() as conn, _postgres_migration_lock(conn), conn.begin():
                config.attributes["connection"] = conn
                command.upgrade(config, "head")

    def current_revision(self) -> str | None:
        """The schema's Alembic revision, or None before the first `upgrade()`."""
        with self._engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()

    @contextmanager
    def _sqlite_migration_lock(self) -> Iterator[None]:
        """An exclusive lock on <dbfile>.migrate.lock (none for an in-memory database)."""
        path = self._engine.url.database
        if not path or path == ":memory:":
            yield
            return
        with open(f"{path}.migrate.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _postgres_migration_lock(conn: Connection) -> Iterator[None]:
    """Hold the session-level advisory lock for migrations, outside any transaction.

    Not a transaction-level lock: the migration's transaction must start after
    the lock is granted, so that it sees what a previous holder committed.
    """
    conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
    conn.commit()
    try:
        yield
    finally:
        conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
        conn.commit()


def _sqlite_engine(url: str, *, echo: bool) -> Engine:
    """A SQLite engine: folder created, WAL, foreign keys on, BEGIN emitted by us."""
    engine = create_engine(url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30})
    path = engine.url.database
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite would otherwise issue BEGIN itself, always deferred, and only before DML.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            for pragma in _SQLITE_PRAGMAS:
                cursor.execute(pragma)
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(
            "BEGIN IMMEDIATE" if conn.get_execution_options().get(_WRITE) else "BEGIN"
        )

    return engine


def _sqlite_upgrade(conn: Connection, config: Config) -> None:
    """Run the migrations in one transaction with foreign keys off, as SQLite's ALTER recipe asks.

    Batch migrations drop and recreate tables; with foreign keys on, dropping a
    referenced table would cascade-delete the rows that refer to it.
    """
    driver = conn.connection.driver_connection
    assert driver is not None
    # Outside a transaction: SQLite ignores this pragma inside one.
    driver.execute("PRAGMA foreign_keys=OFF")
    try:
        with conn.begin():
            command.upgrade(config, "head")
            problems = conn.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
            if problems:
                raise RuntimeError(f"migration left rows with broken foreign keys: {problems[:5]}")
    finally:
        driver.execute("PRAGMA foreign_keys=ON")
