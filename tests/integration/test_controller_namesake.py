"""A run accepted in a namespace that is deleted meanwhile never runs in a namesake made since."""

from __future__ import annotations

from typing import Any

import pytest

import sllm.controller._service as controller_service
from sllm.controller import Controller
from sllm.db import Database
from tests.support.controller import client, make_fn


def test_a_stale_worker_never_moves_a_run_into_a_recreated_namespace(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's caches still name the deleted namespace's function: dispatch finds the
    function gone, reads the name again, finds the namesake's, and must refuse it."""
    monkeypatch.setattr(controller_service, "FUNCTION_TTL", 600.0)  # no expiry mid-test
    admin, url = stack["admin"], stack["ctl"].url
    assert admin.put("/api/v1/namespaces/phoenix").status_code == 201
    old = client(url, admin.post("/api/v1/namespaces/phoenix/keys", json={}).json()["key"])
    make_fn(old, "f")
    other = Controller(stack["ctl"].config, Database(stack["ctl"].config.database_url))
    try:
        cached = other.function_for("phoenix", "f")  # the other worker's cache
        assert admin.delete("/api/v1/namespaces/phoenix").status_code == 200
        assert admin.put("/api/v1/namespaces/phoenix").status_code == 201
        new = client(url, admin.post("/api/v1/namespaces/phoenix/keys", json={}).json()["key"])
        make_fn(new, "f")
        stale = other.function_for("phoenix", "f")
        assert stale.id == cached.id, "the other worker's cache should still hold the old one"

        body = {"prompt": "hi", "max_tokens": 1}
        run, finished = other.invoke(other.new_run("phoenix", stale, body, blocking=True), stale)
        assert finished and run.status != "success", run.status
        assert run.error is not None and run.error["code"] == "not_found", run.error
        # Nothing of it shows in the new namespace.
        assert new.get(f"/api/v1/namespaces/_/activations/{run.id}").status_code == 404
        assert new.get("/api/v1/namespaces/_/activations").json() == []
    finally:
        other.close()
        other.db.dispose()
