"""The database URL from the environment, and `Database`: engine, sessions and migrations.

SQLite concurrency model: every connection runs in WAL mode, so readers never
block the writer. pysqlite's own transaction handling is switched off and
SQLAlchemy's `begin` event emits the BEGIN: a plain (deferred) BEGIN for read
sessions, BEGIN IMMEDIATE for write sessions. A write session therefore takes
SQLite's write lock up front and waits for it (busy timeout) instead of failing
with "database is locked" when it upgrades from reading to writing while
another process writes.

SQLite's busy handler waits for the write lock by sleeping and polling (1 ms,
then 2, 5, 10 ... up to 100 ms), so under load writers spend most of their
time asleep while the lock is free. Write transactions therefore queue first
on a lock of our own: a thread lock within the process, then `flock` on
<dbfile>.write.lock across processes. Both wake the next writer the moment
the holder lets go; the busy handler stays as the fallback for writers that
are not ours.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, cast

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import ClauseElement, Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.compiler import SQLCompiler

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
# Execution option of the engine behind `autocommit()` on SQLite: no BEGIN at all.
_AUTOCOMMIT = "sllm_autocommit"
# A pooled PostgreSQL connection idle this long is pinged before use.
IDLE_PING_S = 10.0
# The longest a SQLite writer waits for the other writers of its process.
WRITE_LOCK_WAIT_S = 30.0
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

    `pool_size` sizes the PostgreSQL pools: up to 1.5 × `pool_size` stay open,
    2.5 × `pool_size` at the most. Call `dispose()`
    in a process that forked after this object used its pool.
    """

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        url = normalise_url(url)
        self._engine: Engine
        self._writers: _WriterLock | None = None
        # Behind autocommit(): each statement commits by itself.
        self._autocommit_engine: Engine
        self._relaxed_engine: Engine  # the same, with commits that do not wait for the disk
        if url.startswith("sqlite"):
            self._engine = _sqlite_engine(url, echo=echo)
            self._writers = _WriterLock(self._engine.url.database)
            # SQLite connections already run in driver autocommit (see _sqlite_engine):
            # the option only tells the begin listener not to open a transaction. In WAL
            # mode with synchronous=NORMAL no commit waits for the disk anyway.
            self._autocommit_engine = self._engine.execution_options(**{_AUTOCOMMIT: True})
            self._relaxed_engine = self._autocommit_engine
        else:
            # Two pools: the hot path's (relaxed: synchronous_commit is a setting of the
            # connection) gets most of `pool_size`; at most 2.5 × pool_size connections open.
            half = max(pool_size // 2, 1)
            self._engine = create_engine(url, pool_size=half, max_overflow=half, echo=echo)
            _ping_idle_connections(self._engine)
            self._autocommit_engine = self._engine.execution_options(isolation_level="AUTOCOMMIT")
            self._relaxed_engine = create_engine(
                url,
                pool_size=pool_size,
                max_overflow=half,
                echo=echo,
                isolation_level="AUTOCOMMIT",
            )
            _ping_idle_connections(self._relaxed_engine)
            event.listen(self._relaxed_engine, "connect", _no_commit_wait)
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
        with self._writer(write), factory.begin() as session:
            yield session

    @contextmanager
    def connect(self, write: bool = False) -> Iterator[Connection]:
        """A Core connection in one transaction (committed on success, else rolled back).

        The lighter sibling of `session()` for hot paths that run prepared Core
        statements; `write` means the same.
        """
        engine = self._write_engine if write else self._engine
        with self._writer(write), engine.begin() as conn:
            yield conn

    @contextmanager
    def autocommit(self, write: bool = False, *, durable: bool = True) -> Iterator[Connection]:
        """A Core connection on which each statement commits by itself.

        For single statements on the hot path: on PostgreSQL a statement is
        then one round trip, where a transaction adds its COMMIT. `write`
        means the same as for `session()`.

        durable=False: on PostgreSQL the commit does not wait for the WAL to
        reach the disk (synchronous_commit off), which the hot path's many
        small commits would otherwise queue on. A crash of the database server
        can lose the last fraction of a second of such writes (never half of
        one, never corrupt); for writes that are cheap to lose only: slot
        counters, the records of finished blocking calls. SQLite commits are
        like this already (WAL, synchronous=NORMAL).
        """
        engine = self._autocommit_engine if durable else self._relaxed_engine
        with self._writer(write), engine.connect() as conn:
            yield conn

    def prepare(self, statement: ClauseElement, *, write: bool, durable: bool = True) -> Prepared:
        """`statement` compiled once for this database, to run straight on the driver."""
        engine = self._autocommit_engine if durable else self._relaxed_engine
        return Prepared(statement, engine, self._writer(write))

    def _writer(self, write: bool) -> _WriterLock | nullcontext[None]:
        return self._writers if write and self._writers is not None else nullcontext()

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
        self._relaxed_engine.dispose()

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


class Prepared:
    """A Core statement compiled once and run on the driver connection, committed by itself.

    For the few statements of the hot path: SQLAlchemy's per-execution work
    (execution context, parameter and result processing) costs about as much
    CPU as the driver's. So parameters go to the driver as given: the caller
    serialises JSON (`json.dumps`) and passes plain values; rows come back as
    tuples. No expanding (IN) parameters. The pool, its checkout checks and
    SQLite's writer lock apply as for `autocommit()`; driver errors come out
    as SQLAlchemy's (IntegrityError, ...; a dead connection is dropped from
    the pool and its DBAPIError says connection_invalidated).
    """

    def __init__(
        self, statement: ClauseElement, engine: Engine, writer: _WriterLock | nullcontext[None]
    ) -> None:
        compiled = cast(SQLCompiler, statement.compile(dialect=engine.dialect))
        if compiled.post_compile_params:
            raise ValueError("a prepared statement cannot take expanding (IN) parameters")
        self.sql = str(compiled)
        self._defaults = dict(compiled.construct_params(_check=False))
        self._order = compiled.positiontup  # qmark drivers (SQLite); None for named ones
        self._engine = engine
        self._writer = writer

    def run(self, params: Mapping[str, Any]) -> list[tuple[Any, ...]]:
        """Execute with `params` (over the statement's own literals); the rows it returns."""
        values = {**self._defaults, **params}
        bound: Any = [values[k] for k in self._order] if self._order is not None else values
        dialect = self._engine.dialect
        with self._writer:
            fairy = self._engine.raw_connection()
            cursor = None
            try:
                cursor = fairy.cursor()
                cursor.execute(self.sql, bound)
                rows = list(cursor.fetchall()) if cursor.description else []
                # A no-op on a connection in autocommit (the relaxed pool, SQLite's driver
                # mode); the durable PostgreSQL pool's connections start transactions.
                fairy.commit()
                return rows
            except dialect.loaded_dbapi.Error as exc:
                dead = dialect.is_disconnect(exc, fairy.dbapi_connection, cursor)
                if dead:
                    fairy.invalidate(exc)
                raise DBAPIError.instance(
                    self.sql,
                    bound,
                    exc,
                    dialect.loaded_dbapi.Error,
                    connection_invalidated=dead,
                    dialect=dialect,
                ) from exc
            finally:
                if cursor is not None:
                    with contextlib.suppress(Exception):
                        cursor.close()
                fairy.close()


def _no_commit_wait(dbapi_connection: Any, _record: Any) -> None:
    """A new PostgreSQL connection whose commits return before the WAL is flushed."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("SET synchronous_commit = off")
    finally:
        cursor.close()
    dbapi_connection.commit()  # a SET rolled back would be undone


def _ping_idle_connections(engine: Engine) -> None:
    """Check a pooled PostgreSQL connection on checkout without a round trip when it can.

    SQLAlchemy's pool_pre_ping costs a round trip on every checkout, that is
    on every transaction of the hot path. Here a connection is pinged (and
    replaced if dead) only when its socket has something to read while idle
    (a server that shut down or restarted says so, or the connection closed)
    or when it sat idle for IDLE_PING_S (a silent network drop). A connection
    that dies while in use still fails its statement, and the pool then
    discards every connection older than the failure.
    """

    @event.listens_for(engine, "checkin")
    def _on_checkin(_dbapi_connection: Any, record: Any) -> None:
        record.info["sllm_idle_since"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        since = record.info.get("sllm_idle_since")
        idle = since is not None and time.monotonic() - since >= IDLE_PING_S
        if not idle and not _readable(dbapi_connection.fileno()):
            return
        try:
            cursor = dbapi_connection.cursor()
            try:
                cursor.execute("SELECT 1")
            finally:
                cursor.close()
            dbapi_connection.rollback()
        except Exception as exc:
            raise DisconnectionError(f"pooled connection is dead: {exc}") from exc


def _readable(fd: int) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


class _WriterLock:
    """SQLite writers take turns: a thread lock, then flock on <dbfile>.write.lock.

    Re-entrant within a thread. The lock file is opened once per process; a
    forked child starts with a fresh lock and opens its own file (a shared
    open file would share the flock). A thread waits at most WRITE_LOCK_WAIT_S
    for the others in its process (SQLite's busy timeout, which it replaces);
    across processes it waits for as long as the holder runs, and a holder
    that dies lets go. An in-memory database has only the thread lock.
    """

    def __init__(self, database: str | None) -> None:
        self._path = f"{database}.write.lock" if database and database != ":memory:" else None
        self._reset()
        _WRITER_LOCKS.add(self)

    def _reset(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0
        self._fd = -1
        self._pid = 0

    def __enter__(self) -> None:
        if not self._lock.acquire(timeout=WRITE_LOCK_WAIT_S):
            raise OperationalError(
                "BEGIN", None, TimeoutError(f"no write turn in {WRITE_LOCK_WAIT_S:g} s")
            )
        try:
            if self._depth == 0 and self._path is not None:
                fcntl.flock(self._file(), fcntl.LOCK_EX)
        except BaseException:
            self._lock.release()
            raise
        self._depth += 1

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        try:
            if self._depth == 0 and self._path is not None:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def _file(self) -> int:
        if self._pid != os.getpid():
            assert self._path is not None
            self._fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            self._pid = os.getpid()
        return self._fd

    def after_fork(self) -> None:
        """In a forked child: the parent's lock state and open file are not this process's."""
        if self._fd >= 0:
            os.close(self._fd)
        self._reset()


_WRITER_LOCKS: weakref.WeakSet[_WriterLock] = weakref.WeakSet()


def _writer_locks_after_fork() -> None:
    for lock in list(_WRITER_LOCKS):
        lock.after_fork()


os.register_at_fork(after_in_child=_writer_locks_after_fork)


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
        options = conn.get_execution_options()
        if options.get(_AUTOCOMMIT):
            return  # each statement is its own transaction (pysqlite's isolation_level None)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE) else "BEGIN")

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
