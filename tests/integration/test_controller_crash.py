"""A controller killed with -9 while it holds claimed activations that never reached an
invoker: after a restart each one is queued again and runs; none ends `interrupted`."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from sllm.store import open_store, push_model
from sllm.tiny_models import build_tiny_model
from tests.support.controller import (
    ControllerProcess,
    client,
    registered_invoker,
)
from tests.support.s3 import free_port
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.invoker, pytest.mark.slow]

FN = "/api/v1/namespaces/_/functions/f"


def _until(what: str, predicate: Any, timeout: float) -> Any:
    """Poll `predicate` (bounded) until it returns something truthy."""
    return wait_until(predicate, timeout, what, interval=0.1)


def _statuses(c: httpx.Client, ids: list[str]) -> dict[str, str]:
    return {i: c.get(f"/api/v1/namespaces/_/activations/{i}").json()["status"] for i in ids}


def test_claimed_activations_that_never_reached_an_invoker_run_after_a_crash(
    tmp_path: Path, db_url: str
) -> None:
    store_uri = (tmp_path / "store").as_uri()
    push_model(
        str(build_tiny_model("llama", tmp_path / "hf", seed=0)),
        "llama",
        open_store(store_uri),
        progress=False,
    )
    port = free_port()
    # Two queue workers: two activations claimed at the crash, two still queued.
    env = {"SLLM_QUEUE_WORKERS": "2", "SLLM_LEASE_MARGIN": "1", "SLLM_WORKERS": "1"}
    ctl = ControllerProcess(db_url, tmp_path, env=env, port=port).start()
    inv = None
    try:
        admin = ctl.admin()
        admin.put("/api/v1/namespaces/r")
        key = admin.post("/api/v1/namespaces/r/keys").json()["key"]
        c = client(ctl.url, key)
        # The claimed ones' leases run out this long (plus the margin) after their claim.
        r = c.put(FN, json={"model": "llama", "limits": {"timeout": 15}})
        assert r.status_code == 201, r.text
        ids = []
        for i in range(4):  # no invoker yet: the claimed ones wait for a slot
            r = c.post(f"{FN}/invocations", json={"prompt": f"job {i}", "max_tokens": 2})
            assert r.status_code == 202, r.text
            ids.append(r.json()["activationId"])
        _until(
            "two activations to be claimed",
            lambda: (
                sorted(_statuses(c, ids).values()) == ["queued", "queued", "running", "running"]
            ),
            20,
        )
        ctl.stop(signal.SIGKILL)  # the whole controller (gunicorn master and worker)
        # The invoker starts first (it registers once the controller is back), so the work
        # claimed after the restart finds it well within its timeout.
        inv = registered_invoker(tmp_path / "inv", store_uri, ctl.url, "inv-a").start()
        ctl = ControllerProcess(db_url, tmp_path, env=env, port=port).start()
        c = client(ctl.url, key)

        def ended() -> dict[str, str] | None:
            statuses = _statuses(c, ids)
            return None if {"queued", "running"} & set(statuses.values()) else statuses

        final = _until("every activation to end", ended, 120)
        docs = [c.get(f"/api/v1/namespaces/_/activations/{i}").json() for i in ids]
        assert set(final.values()) == {"success"}, [
            (d["status"], d["error"], d["logs"]) for d in docs
        ]
        assert all(d["result"]["usage"]["completion_tokens"] >= 1 for d in docs)
    finally:
        if inv is not None:
            inv.stop()
        ctl.stop()
