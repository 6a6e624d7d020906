"""Integration fixtures: a moto S3 server per session, a fresh bucket or folder per test, and
the main controller + invoker stack."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from sllm.db import Database
from sllm.store import StoreSettings, open_store, push_model
from sllm.tiny_models import build_tiny_embedder, build_tiny_model
from tests.support.controller import (
    ControllerProcess,
    ControllerThread,
    registered_invoker,
    wait_for_invokers,
)
from tests.support.databases import fresh_postgres_database, sqlite_database_url
from tests.support.invoker import InvokerProcess
from tests.support.migration import start_migration_invokers
from tests.support.process import ServiceProcess, stop_all
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


# The main stack runs each controller test on both databases, with the controller in this
# process (one werkzeug process: its internals reachable) and as a real `sllm controller start`
# with two gunicorn workers (what crosses workers: row locks, SKIP LOCKED claims, per-worker
# caches, /metrics aggregation).
STACK_MAX_QUEUE = 4  # small, so a test can fill a function's wait queue
STACKS = [
    pytest.param(("sqlite", 0), id="sqlite"),
    pytest.param(("postgres", 0), id="postgres"),
    pytest.param(("sqlite", 2), id="sqlite-2workers"),
    pytest.param(("postgres", 2), id="postgres-2workers"),
]


@pytest.fixture(scope="session", params=STACKS)
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Controller + one invoker process + published models + two namespaces.

    The controller is in-process (workers 0) or a process with gunicorn workers. Shared by the
    controller tests of the session, once per parameter; tests name their functions uniquely.
    Keys: ctl (url, config, admin()), inv, admin, keys (namespace -> API key), root, workers,
    db (a Database on the controller's database, for tests that look at its rows).
    """
    backend, workers = request.param
    root = tmp_path_factory.mktemp(f"stack-{backend}-{workers}")
    store_uri = (root / "store").as_uri()
    store = open_store(store_uri)
    push_model(
        str(build_tiny_model("llama", root / "hf-llama", seed=0)), "llama", store, progress=False
    )
    push_model(str(build_tiny_embedder(root / "hf-emb", seed=1)), "emb", store, progress=False)
    with ExitStack() as cleanup:
        if backend == "postgres":
            admin_url = request.getfixturevalue("postgres_admin_url")
            url = cleanup.enter_context(fresh_postgres_database(admin_url))
        else:
            url = sqlite_database_url(root / "db")
        processes: list[ServiceProcess] = []
        cleanup.callback(stop_all, processes)
        ctl: ControllerThread | ControllerProcess
        if workers:
            env = {"SLLM_MAX_QUEUE": str(STACK_MAX_QUEUE)}
            ctl = ControllerProcess(url, root, workers=workers, env=env)
            processes.append(ctl)
            ctl.start()
        else:
            ctl = ControllerThread(url, max_queue=STACK_MAX_QUEUE).start()
            cleanup.callback(ctl.stop)
        inv = registered_invoker(root / "inv", store_uri, ctl.url, "inv-a")
        processes.append(inv)
        inv.start()
        db = Database(url, pool_size=2)
        cleanup.callback(db.dispose)
        admin = ctl.admin()
        wait_for_invokers(admin, 1)
        keys = {}
        for ns in ("alpha", "beta"):
            assert admin.put(f"/api/v1/namespaces/{ns}").status_code == 201
            keys[ns] = admin.post(f"/api/v1/namespaces/{ns}/keys", json={"label": "t"}).json()[
                "key"
            ]
        yield {
            "ctl": ctl,
            "inv": inv,
            "admin": admin,
            "keys": keys,
            "root": root,
            "workers": workers,
            "db": db,
        }


@pytest.fixture(scope="module")
def migration_invokers(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, InvokerProcess]]:
    """For the migration-target tests (test_invoker_hold, test_invoker_migration_target),
    one set per module: slow and fast batching invokers, a serial one, and one with a
    short hold timeout."""
    with start_migration_invokers(tmp_path_factory.mktemp("migration")) as invokers:
        yield invokers
