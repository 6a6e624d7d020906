"""The controller under concurrent clients, on every stack (in-process, and two gunicorn
workers sharing the database): `max_instances` holds, the wait queue is bounded (429 with
Retry-After), and a revoked key stops working in every worker."""

from __future__ import annotations

import threading
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update

from sllm.controller._service import AUTH_TTL
from sllm.db import Database, Function, Instance, Namespace
from tests.support.controller import api, client, make_fn
from tests.support.waiting import run_together, wait_until

pytestmark = [pytest.mark.invoker]


def _fn_id(db: Database, name: str) -> int:
    with db.session() as s:
        return int(
            s.scalar(
                select(Function.id)
                .join(Namespace, Namespace.id == Function.namespace_id)
                .where(Namespace.name == "alpha", Function.name == name)
            )
        )


def _instances(db: Database, fn_id: int) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).where(Instance.function_id == fn_id)) or 0)


def _set_in_flight(db: Database, fn_id: int, value: int) -> None:
    with db.session(write=True) as s:
        s.execute(
            update(Instance)
            .where(Instance.function_id == fn_id)
            .values(in_flight=value, last_used_at=time.time())
        )


def _cold_loads(stack: dict[str, Any]) -> float:
    inv = stack["inv"]
    return sum(inv.metric("sllm_invoker_loads_total", tier=t) for t in ("dram", "nvme", "remote"))


def test_max_instances_holds_under_concurrent_requests(stack: dict[str, Any]) -> None:
    """Concurrent cold requests (spread over the workers) start one instance, not one each."""
    c = api(stack)
    make_fn(c, "single", limits={"concurrency": 1, "max_tokens": 8}, scaling={"max_instances": 1})
    loads_before = _cold_loads(stack)
    url = f"{stack['ctl'].url}/api/v1/namespaces/_/functions/single/invocations?blocking=true"
    key = stack["keys"]["alpha"]

    def call(i: int) -> httpx.Response:
        # A connection of its own each, so gunicorn spreads them over its workers.
        return httpx.post(
            url,
            json={"prompt": f"request {i}", "max_tokens": 8},
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )

    results = run_together(4, call)
    assert [getattr(r, "status_code", r) for r in results] == [200] * 4, [
        getattr(r, "text", r) for r in results
    ]
    acts = [r.json() for r in results]
    assert all(a["status"] == "success" for a in acts), acts
    assert sum(bool(a["cold"]) for a in acts) == 1, [(a["cold"], a["tier"]) for a in acts]
    assert _cold_loads(stack) - loads_before == 1, "more than one instance was loaded"
    assert _instances(stack["db"], _fn_id(stack["db"], "single")) == 1
    status = stack["inv"].client().get("/v1/status").json()
    assert [i["function"] for i in status["instances"]].count("alpha/single") == 1


def test_a_full_wait_queue_answers_429_with_retry_after(stack: dict[str, Any]) -> None:
    """Requests beyond `max_queue` waiters (per controller process) are refused at once with
    429 and Retry-After; the ones that waited run when the instance frees."""
    c = api(stack)
    make_fn(c, "bounded", limits={"concurrency": 1}, scaling={"max_instances": 1})
    body = {"prompt": "hi", "max_tokens": 2}
    path = "/api/v1/namespaces/_/functions/bounded/invocations?blocking=true"
    assert c.post(path, json=body).status_code == 200  # the instance exists now
    db: Database = stack["db"]
    fn_id = _fn_id(db, "bounded")
    _set_in_flight(db, fn_id, 1)  # as if a long request held its only slot
    max_queue = stack["ctl"].config.max_queue
    can_wait = max_queue * max(stack["workers"], 1)
    total = can_wait + 3
    key = stack["keys"]["alpha"]
    refused: list[httpx.Response] = []

    def call(i: int) -> httpx.Response:
        r = httpx.post(
            stack["ctl"].url + path,
            json=body,
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        )
        if r.status_code == 429:
            refused.append(r)
        return r

    def release_when_refused() -> None:
        try:
            wait_until(lambda: len(refused) >= total - can_wait, 60, "the queue to overflow")
        finally:
            _set_in_flight(db, fn_id, 0)

    releaser = threading.Thread(target=release_when_refused, daemon=True)
    releaser.start()
    results = run_together(total, call)
    releaser.join(timeout=70)
    statuses = [getattr(r, "status_code", r) for r in results]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(429) >= total - can_wait, statuses
    if not stack["workers"]:  # one process: exactly its bound waited
        assert statuses.count(200) == max_queue, statuses
    for r in results:
        if r.status_code == 429:
            assert r.headers["Retry-After"].isdigit() and int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "overloaded", r.text
            assert "wait" in r.json()["error"]["message"]
        else:
            assert r.json()["status"] == "success", r.text


def test_a_revoked_key_stops_working_in_every_worker(stack: dict[str, Any]) -> None:
    admin = stack["admin"]
    made = admin.post("/api/v1/namespaces/alpha/keys", json={"label": "doomed"})
    assert made.status_code == 201, made.text
    key, key_id = made.json()["key"], made.json()["key_id"]
    url = stack["ctl"].url + "/api/v1/namespaces/_/functions"

    def statuses(n: int) -> list[int]:
        # Fresh connections, so the requests reach every worker (and its key cache).
        return [
            httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=30).status_code
            for _ in range(n)
        ]

    assert statuses(8) == [200] * 8  # every worker has the key cached now
    revoked_at = time.monotonic()
    r = admin.delete(f"/api/v1/namespaces/alpha/keys/{key_id}")
    assert r.status_code == 200 and r.json()["revoked"] is True, r.text
    seen: list[int] = []

    def all_refused() -> bool:
        got = statuses(4)
        seen.extend(got)
        return got == [401] * 4

    wait_until(all_refused, AUTH_TTL + 30, "every worker to refuse the revoked key")
    took = time.monotonic() - revoked_at
    assert set(seen) <= {200, 401}, seen
    assert took < AUTH_TTL + 5, f"the revoked key worked for {took:.1f}s (promised {AUTH_TTL}s)"
    assert statuses(8) == [401] * 8
    refused = httpx.get(url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert refused.json()["error"]["code"] and refused.json()["error"]["message"]
    assert client(stack["ctl"].url, stack["keys"]["alpha"]).get(url).status_code == 200
    assert admin.delete(f"/api/v1/namespaces/alpha/keys/{key_id}x").status_code == 404
