"""Integration fixtures: a moto S3 server per session, a fresh bucket or folder per test."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sllm.store import StoreSettings, open_store, push_model
from sllm.tiny_models import build_tiny_embedder, build_tiny_model
from tests.support.controller import ControllerThread, registered_invoker, wait_for_invokers
from tests.support.databases import fresh_postgres_database, sqlite_database_url
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


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """Controller (in-process) + one invoker process + published models + two namespaces.

    Shared by the controller tests of the session, once per database backend;
    tests name their functions uniquely.
    """
    root = tmp_path_factory.mktemp(f"stack-{request.param}")
    store_uri = (root / "store").as_uri()
    store = open_store(store_uri)
    push_model(
        str(build_tiny_model("llama", root / "hf-llama", seed=0)), "llama", store, progress=False
    )
    push_model(str(build_tiny_embedder(root / "hf-emb", seed=1)), "emb", store, progress=False)
    if request.param == "postgres":
        admin_url = request.getfixturevalue("postgres_admin_url")
        db_cm = fresh_postgres_database(admin_url)
        url = db_cm.__enter__()
    else:
        db_cm = None
        url = sqlite_database_url(root / "db")
    ctl = ControllerThread(url).start()
    inv = registered_invoker(root / "inv", store_uri, ctl.url, "inv-a")
    try:
        inv.start()
        admin = ctl.admin()
        wait_for_invokers(admin, 1)
        keys = {}
        for ns in ("alpha", "beta"):
            assert admin.put(f"/api/v1/namespaces/{ns}").status_code == 201
            keys[ns] = admin.post(f"/api/v1/namespaces/{ns}/keys", json={"label": "t"}).json()[
                "key"
            ]
        yield {"ctl": ctl, "inv": inv, "admin": admin, "keys": keys, "root": root}
    finally:
        inv.stop()
        ctl.stop()
        if db_cm is not None:
            db_cm.__exit__(None, None, None)
