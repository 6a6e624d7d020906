"""sllm.db against real databases: migrations, constraints, cascades, JSON, concurrent writers.

Every test that takes `db_url` runs on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import delete, func, select, text
from sqlalchemy.exc import IntegrityError

import sllm.db
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
    errors: list[BaseException] = []

    def bump_version() -> None:
        try:
            for _ in range(50):
                # Read, then write: after a deferred BEGIN the write could fail with
                # "database is locked"; without serialisation an update could be lost.
                with db.session(write=True) as s:
                    s.get_one(Function, fn.id).version += 1
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=bump_version) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with db.session() as s:
        assert s.get_one(Function, fn.id).version == 1 + 2 * 50
    db.dispose()
