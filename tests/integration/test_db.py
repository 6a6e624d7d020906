"""sllm.db against real databases: migrations, constraints, cascades, JSON, concurrent writers.

Every test that takes `db_url` runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

import sllm.db
import sllm.db._database
from sllm.db import (
    Activation,
    ApiKey,
    Base,
    Database,
    Function,
    Instance,
    Invoker,
    Namespace,
)
from tests.support.databases import upgrade_database


def _head() -> str | None:
    config = Config()
    config.set_main_option("script_location", str(Path(sllm.db.__file__).parent / "migrations"))
    return ScriptDirectory.from_config(config).get_current_head()


def _schema_differences(db: Database) -> list[Any]:
    """What autogenerate would change to make the database match the models (types, defaults too)."""
    with db.engine.connect() as conn:
        context = MigrationContext.configure(
            conn, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


@pytest.fixture
def db(db_url: str) -> Iterator[Database]:
    """A migrated database on each backend, behind a pool that never ran a migration."""
    upgrade_database(db_url)
    database = Database(db_url)
    yield database
    database.dispose()


def _namespace(session: Any, name: str) -> Namespace:
    ns = Namespace(name=name, created_at=time.time())
    session.add(ns)
    session.flush()
    return ns


def _function(namespace_id: int, name: str, **overrides: Any) -> Function:
    now = time.time()
    values: dict[str, Any] = {
        "namespace_id": namespace_id,
        "name": name,
        "model": "tiny-gpt2",
        "task": "generate",
        "timeout_s": 60.0,
        "max_tokens": 128,
        "concurrency": 4,
        "max_payload_bytes": 1 << 20,
        "min_instances": 0,
        "max_instances": 1,
        "target_concurrency": 2,
        "keep_alive_s": 300.0,
        "params": {},
        "created_at": now,
        "updated_at": now,
    }
    values.update(overrides)
    return Function(**values)


def _activation(namespace_id: int, **overrides: Any) -> Activation:
    values: dict[str, Any] = {
        "namespace_id": namespace_id,
        "function_name": "chat",
        "function_version": 1,
        "model": "tiny-gpt2",
        "task": "generate",
        "status": "queued",
        "blocking": True,
        "request": {"prompt": "hi"},
        "logs": [],
        "created_at": time.time(),
    }
    values.update(overrides)
    return Activation(**values)


def _invoker(name: str) -> Invoker:
    now = time.time()
    return Invoker(
        name=name,
        url="http://127.0.0.1:8701",
        device="cpu",
        capacity={"dram": 1 << 30},
        status={},
        state="active",
        registered_at=now,
        last_heartbeat=now,
    )


def test_upgrade_creates_exactly_the_models_schema(db_url: str) -> None:
    db = Database(db_url)
    assert db.current_revision() is None
    db.upgrade()
    assert db.current_revision() == _head()
    assert _schema_differences(db) == []
    db.dispose()


def test_upgrade_again_keeps_schema_and_data(db: Database) -> None:
    with db.session(write=True) as s:
        _namespace(s, "kept")
    db.upgrade()
    assert db.current_revision() == _head()
    with db.session() as s:
        assert s.scalars(select(Namespace.name)).all() == ["kept"]


def test_concurrent_upgrades_from_four_processes(db_url: str) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as workers:
        revisions = workers.map(upgrade_database, [db_url] * 4)
    assert revisions == [_head()] * 4
    db = Database(db_url)
    with db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar_one() == 1
    assert _schema_differences(db) == []
    db.dispose()


def test_function_names_are_unique_within_a_namespace(db: Database) -> None:
    with db.session(write=True) as s:
        a, b = _namespace(s, "a"), _namespace(s, "b")
        s.add_all([_function(a.id, "chat"), _function(b.id, "chat")])
    with pytest.raises(IntegrityError), db.session(write=True) as s:
        s.add(_function(a.id, "chat"))
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Function)) == 2


def test_deleting_a_namespace_deletes_what_belongs_to_it(db: Database) -> None:
    with db.session(write=True) as s:
        gone, kept = _namespace(s, "gone"), _namespace(s, "kept")
        for ns in (gone, kept):
            s.add_all(
                [
                    _function(ns.id, "chat"),
                    _activation(ns.id),
                    ApiKey(
                        key_id=f"key-{ns.name}",
                        secret_hash="0" * 64,
                        namespace_id=ns.id,
                        created_at=time.time(),
                    ),
                ]
            )
    with db.session(write=True) as s:
        s.execute(delete(Namespace).where(Namespace.name == "gone"))
    with db.session() as s:
        for model in (Function, Activation, ApiKey):
            assert s.scalars(select(model.namespace_id)).all() == [kept.id], model.__name__


def test_deleting_an_invoker_deletes_its_instances(db: Database) -> None:
    with db.session(write=True) as s:
        fn = _function(_namespace(s, "ns").id, "chat")
        lost, alive = _invoker("lost"), _invoker("alive")
        s.add_all([fn, lost, alive])
        s.flush()
        now = time.time()
        for inv in (lost, alive):
            s.add(
                Instance(
                    function_id=fn.id,
                    invoker_id=inv.id,
                    state="ready",
                    created_at=now,
                    last_used_at=now,
                )
            )
    with db.session(write=True) as s:
        s.execute(delete(Invoker).where(Invoker.name == "lost"))
    with db.session() as s:
        assert s.scalars(select(Instance.invoker_id)).all() == [alive.id]


def test_json_columns_round_trip_nested_unicode(db: Database) -> None:
    value = {
        "prompt": "Grüße, 世界 🚀",
        "stop": ["\n", "ß"],
        "nested": {"list": [1, 2.5, True, None, {"ключ": "значение"}], "empty": {}},
    }
    with db.session(write=True) as s:
        ns = _namespace(s, "json")
        act = _activation(ns.id, request=value, logs=["ünïcode line", "2"], result=value)
        s.add_all([_function(ns.id, "chat", params=value), act])
    with db.session() as s:
        assert s.scalars(select(Function.params)).one() == value
        stored = s.get(Activation, act.id)
        assert stored is not None
        assert (stored.request, stored.result, stored.logs) == (value, value, ["ünïcode line", "2"])
        assert stored.error is None


def test_stated_defaults_apply_to_raw_inserts(db: Database) -> None:
    with db.session(write=True) as s:
        ns = _namespace(s, "raw")
        s.execute(
            text(
                "INSERT INTO api_keys (key_id, secret_hash, namespace_id, created_at) "
                "VALUES ('raw', :h, :ns, 0)"
            ),
            {"h": "0" * 64, "ns": ns.id},
        )
    with db.session() as s:
        key = s.scalars(select(ApiKey)).one()
        assert (key.admin, key.label, key.revoked_at) == (False, "", None)


def test_session_rolls_back_when_the_block_raises(db: Database) -> None:
    with pytest.raises(RuntimeError), db.session(write=True) as s:
        _namespace(s, "never")
        raise RuntimeError("boom")
    with db.session() as s:
        assert s.scalars(select(Namespace)).all() == []


def test_sqlite_write_sessions_from_two_threads_serialise(sqlite_url: str) -> None:
    db = Database(sqlite_url)
    db.upgrade()
    with db.session(write=True) as s:
        fn = _function(_namespace(s, "ns").id, "chat")
        s.add(fn)

    def bump_version() -> None:
        for _ in range(50):
            # Read, then write: after a deferred BEGIN the write could fail with
            # "database is locked"; without serialisation an update could be lost.
            with db.session(write=True) as s:
                s.get_one(Function, fn.id).version += 1

    assert _in_threads(bump_version, 2) == []
    with db.session() as s:
        assert s.get_one(Function, fn.id).version == 1 + 2 * 50
    db.dispose()


def _in_threads(target: Callable[[], None], count: int) -> list[BaseException]:
    """Run `target` in `count` threads at once; what they raised."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _bump_in_process(url: str, rounds: int, strict_sqlite: bool) -> None:
    """Add 1 to functions.version `rounds` times per thread, from two threads, two ways."""
    db = Database(url)
    if strict_sqlite:
        _no_busy_wait(db)

    def bump() -> None:
        for i in range(rounds):
            if i % 2:  # one statement, committed by itself
                with db.autocommit(write=True) as conn:
                    conn.execute(text("UPDATE functions SET version = version + 1"))
            else:  # read, then write, in one transaction (the row locked on PostgreSQL)
                with db.connect(write=True) as conn:
                    v = conn.execute(select(Function.version).with_for_update()).scalar_one()
                    conn.execute(text("UPDATE functions SET version = :v"), {"v": v + 1})

    errors = _in_threads(bump, 2)
    db.dispose()
    if errors:  # the process's exit code says so
        raise errors[0]


def _no_busy_wait(db: Database) -> None:
    """SQLite fails at once on a locked database: only sllm's writer lock may make writers wait."""

    @sqlalchemy.event.listens_for(db.engine, "connect")
    def _strict(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.execute("PRAGMA busy_timeout=0")


def test_writers_from_processes_and_threads_queue_and_lose_nothing(db_url: str) -> None:
    upgrade_database(db_url)
    db = Database(db_url)
    with db.session(write=True) as s:
        s.add(_function(_namespace(s, "ns").id, "chat"))
    # On SQLite with no busy timeout, any writer that found the lock taken would fail
    # with "database is locked": they must queue on the writer lock (threads, then flock).
    strict = db.dialect == "sqlite"
    rounds, procs = 40, 3
    ctx = multiprocessing.get_context("spawn")
    workers = [
        ctx.Process(target=_bump_in_process, args=(db_url, rounds, strict)) for _ in range(procs)
    ]
    for p in workers:
        p.start()
    for p in workers:
        p.join(120)
    assert [p.exitcode for p in workers] == [0] * procs
    with db.session() as s:
        assert s.scalars(select(Function.version)).one() == 1 + procs * 2 * rounds
    db.dispose()


def test_autocommit_statements_commit_by_themselves(db: Database) -> None:
    with db.autocommit(write=True) as conn:
        conn.execute(text("INSERT INTO namespaces (name, created_at) VALUES ('now', 1)"))
        with db.connect() as other:  # another connection sees it before this block ends
            assert other.execute(select(func.count()).select_from(Namespace)).scalar_one() == 1
    if db.dialect == "postgresql":
        with db.autocommit(durable=False) as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "off"
        with db.autocommit() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "on"
        with db.connect() as conn:
            assert conn.execute(text("SHOW synchronous_commit")).scalar_one() == "on"


def test_a_pooled_connection_the_server_closed_is_replaced_without_an_error(
    pg_url: str, postgres_admin_url: str
) -> None:
    db = Database(pg_url, pool_size=2)
    for durable in (True, False):  # both pools
        with db.autocommit(durable=durable) as conn:
            pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
        admin = Database(postgres_admin_url)
        with admin.autocommit() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid}).scalar_one()
        admin.dispose()
        time.sleep(0.2)  # the server's goodbye reaches the idle socket
        # Not idle for IDLE_PING_S: the readable socket alone tells the pool to replace it.
        with db.autocommit(durable=durable) as conn:
            assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != pid
    db.dispose()


def test_sqlite_writer_lock_is_fresh_in_a_forked_child(
    sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fork while a thread holds the write turn must not leave the child locked out.

    The holder takes only sllm's turn (no SQLite transaction: SQLite's own
    state does not survive a fork with a lock held, which no server does).
    """
    monkeypatch.setattr(sllm.db._database, "WRITE_LOCK_WAIT_S", 5.0)
    db = Database(sqlite_url)
    db.upgrade()
    turn = db._writer(True)
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with turn:
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    assert held.wait(10)
    try:
        pid = os.fork()
        if pid == 0:  # the child: its own turn, after the parent's holder lets go (flock)
            code = 1
            try:
                db.engine.dispose(close=False)  # the parent's connections are not the child's
                with db.connect(write=True) as conn:
                    conn.execute(text("UPDATE namespaces SET name = name"))
                code = 0
            except BaseException as exc:
                os.write(2, f"child: {exc!r}\n".encode())
            finally:
                os._exit(code)
        time.sleep(0.5)
        release.set()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        release.set()
        t.join()
        db.dispose()


def test_prepared_statements_run_on_the_driver(db: Database) -> None:
    add = db.prepare(
        sqlalchemy.insert(Namespace)
        .values(name=sqlalchemy.bindparam("n"), created_at=sqlalchemy.bindparam("t"))
        .returning(Namespace.name),
        write=True,
    )
    assert add.run({"n": "first", "t": 1.0}) == [("first",)]
    with pytest.raises(IntegrityError):  # the driver's error, as SQLAlchemy's
        add.run({"n": "first", "t": 2.0})
    rename = db.prepare(
        sqlalchemy.update(Namespace)
        .where(Namespace.name == sqlalchemy.bindparam("old"))
        .values(name=sqlalchemy.bindparam("new"))
        .returning(Namespace.name, Namespace.created_at),
        write=True,
        durable=False,
    )
    assert rename.run({"old": "first", "new": "second"}) == [("second", 1.0)]
    assert rename.run({"old": "first", "new": "third"}) == []
    with db.session() as s:  # committed by itself: another connection sees it
        assert s.scalars(select(Namespace.name)).all() == ["second"]
    with pytest.raises(ValueError, match="expanding"):
        db.prepare(select(Namespace.id).where(Namespace.name.in_(["a", "b"])), write=False)


def test_0004_adds_the_resume_columns_keeping_rows_and_goes_back(db_url: str) -> None:
    """From 0003 with a function and an activation: 0004 gives the function the default
    on_invoker_loss and the activation no moves; its downgrade drops exactly those columns."""
    from alembic import command

    config = Config()
    config.set_main_option("script_location", str(Path(sllm.db.__file__).parent / "migrations"))
    engine = sqlalchemy.create_engine(db_url)  # SQLite: foreign keys off, as migrations run
    if engine.dialect.name == "sqlite":
        Path(str(engine.url.database)).parent.mkdir(parents=True, exist_ok=True)
    new = {
        "functions": {"on_invoker_loss"},
        "activations": {"moves"},
    }

    def columns(conn: Any, table: str) -> set[str]:
        return {c["name"] for c in sqlalchemy.inspect(conn).get_columns(table)}

    try:
        with engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, "0003")
            conn.execute(text("INSERT INTO namespaces (name, created_at) VALUES ('ns', 1)"))
            ns = conn.execute(text("SELECT id FROM namespaces")).scalar_one()
            conn.execute(
                text(
                    "INSERT INTO functions (namespace_id, name, model, task, timeout_s, "
                    "max_tokens, concurrency, max_payload_bytes, min_instances, max_instances, "
                    "target_concurrency, keep_alive_s, params, created_at, updated_at) VALUES "
                    "(:ns, 'f', 'm', 'generate', 60, 16, 4, 1024, 0, 1, 4, 300, '{}', 1, 1)"
                ),
                {"ns": ns},
            )
            conn.execute(
                text(
                    "INSERT INTO activations (id, namespace_id, function_name, function_version, "
                    "model, task, status, blocking, request, logs, created_at) VALUES "
                    "('a1', :ns, 'f', 1, 'm', 'generate', 'success', true, '{}', '[]', 1)"
                ),
                {"ns": ns},
            )
            command.upgrade(config, "0004")
            assert conn.execute(text("SELECT on_invoker_loss FROM functions")).all() == [
                ("resume",)
            ]
            assert conn.execute(text("SELECT moves FROM activations")).all() == [(None,)]
            assert conn.execute(text("SELECT count(*) FROM migration_requests")).scalar() == 0
            command.downgrade(config, "0003")
            assert "migration_requests" not in sqlalchemy.inspect(conn).get_table_names()
            for table, added in new.items():
                assert not columns(conn, table) & added, table
            assert conn.execute(text("SELECT name FROM functions")).all() == [("f",)]
            assert conn.execute(text("SELECT id FROM activations")).all() == [("a1",)]
    finally:
        engine.dispose()
