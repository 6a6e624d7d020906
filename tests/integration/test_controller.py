"""The controller end to end, on SQLite and PostgreSQL: a real invoker process registered by
heartbeat, a local directory store with tiny published models, real HTTP clients."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

import sllm.controller._service as controller_service
from sllm.controller import Controller
from sllm.controller._activations import Run
from sllm.db import Activation, Database, Function, Instance, Namespace
from tests.support.controller import api, client, make_fn
from tests.support.invoker import metric_value
from tests.support.waiting import run_together, wait_until

pytestmark = [pytest.mark.invoker]


def test_function_crud_and_validation(stack: dict[str, Any]) -> None:
    c = api(stack)
    doc = make_fn(c, "crud", limits={"max_tokens": 64}, scaling={"keep_alive": 30})
    assert doc["model"] == "llama" and doc["limits"]["max_tokens"] == 64
    assert doc["version"] == 1 and doc["namespace"] == "alpha"
    again = c.put("/api/v1/namespaces/_/functions/crud", json={"model": "llama"})
    assert again.status_code == 409
    up = c.put(
        "/api/v1/namespaces/alpha/functions/crud?overwrite=true", json={"limits": {"timeout": 30}}
    )
    assert up.status_code == 200 and up.json()["version"] == 2
    assert up.json()["limits"] == {**doc["limits"], "timeout": 30.0}
    assert c.get("/api/v1/namespaces/_/functions/crud").json()["version"] == 2
    names = [f["name"] for f in c.get("/api/v1/namespaces/_/functions").json()]
    assert "crud" in names
    bad = [
        ("Bad_Name", {"model": "llama"}),
        ("ok", {}),
        ("ok", {"model": "../etc"}),
        ("ok", {"model": "llama", "task": "dance"}),
        ("ok", {"model": "llama", "limits": {"max_tokens": 0}}),
        ("ok", {"model": "llama", "limits": {"timeout": -1}}),
        ("ok", {"model": "llama", "scaling": {"min_instances": 3, "max_instances": 2}}),
        ("ok", {"model": "llama", "colour": "red"}),
        ("ok", {"model": "llama", "limits": {"speed": 1}}),
        ("ok", [1, 2]),
    ]
    for name, body in bad:
        r = c.put(f"/api/v1/namespaces/_/functions/{name}", json=body)
        assert r.status_code == 400, (name, body, r.text)
        assert r.json()["error"]["code"] == "invalid_request"
        assert r.json()["error"]["message"]
    assert c.delete("/api/v1/namespaces/_/functions/crud").status_code == 200
    assert c.get("/api/v1/namespaces/_/functions/crud").status_code == 404


def test_blocking_invocation_records_an_activation(stack: dict[str, Any]) -> None:
    c = api(stack)
    make_fn(c, "gen")
    body = {"prompt": "hello there", "max_tokens": 5, "temperature": 0}
    r = c.post("/api/v1/namespaces/_/functions/gen/invocations?blocking=true", json=body)
    assert r.status_code == 200, r.text
    act = r.json()
    assert act["status"] == "success" and act["success"] is True
    assert act["result"]["usage"]["completion_tokens"] == act["tokens_out"] >= 1
    assert act["cold"] is True and act["tier"] in ("remote", "nvme", "dram")
    assert act["invoker"] == "inv-a" and act["ttft_ms"] > 0 and act["load_ms"] > 0
    warm = c.post(
        "/api/v1/namespaces/_/functions/gen/invocations?blocking=true&result=true", json=body
    )
    assert warm.status_code == 200
    assert warm.json()["text"] == act["result"]["text"]  # greedy: the same text
    activation_id = warm.headers["X-Activation-Id"]
    stored = c.get(f"/api/v1/namespaces/_/activations/{activation_id}").json()
    assert stored["cold"] is False and stored["tier"] == "gpu"
    logs = c.get(f"/api/v1/namespaces/_/activations/{activation_id}/logs").json()["logs"]
    assert any("warm" in line for line in logs)
    listed = c.get("/api/v1/namespaces/_/activations?name=gen&limit=5").json()
    assert [a["activationId"] for a in listed[:2]] == [activation_id, act["activationId"]]


def _in_flight(db: Database, function_id: int) -> list[int]:
    with db.session() as s:
        return list(
            s.scalars(select(Instance.in_flight).where(Instance.function_id == function_id))
        )


def test_a_worker_with_a_cached_definition_never_runs_the_old_one(
    stack: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's cache holds version 1 when version 2 lands: dispatch notices."""
    monkeypatch.setattr(controller_service, "FUNCTION_TTL", 600.0)  # no expiry mid-test
    c = api(stack)
    make_fn(c, "cached", limits={"max_tokens": 3})
    other = Controller(stack["ctl"].config, Database(stack["ctl"].config.database_url))
    try:
        body = {"prompt": "tell me a long story", "temperature": 0}
        fn = other.function_for("alpha", "cached")
        run, finished = other.invoke(other.new_run("alpha", fn, body, blocking=True), fn)
        assert finished and run.status == "success" and run.tokens_out == 3
        up = c.put(
            "/api/v1/namespaces/_/functions/cached?overwrite=true",
            json={"limits": {"max_tokens": 1}},
        )
        assert up.json()["version"] == 2
        stale = other.function_for("alpha", "cached")
        assert stale.version == 1, "the other worker's cache should still hold version 1"
        run = other.new_run("alpha", stale, body, blocking=True)
        assert "max_tokens" not in run.request  # the limit applies where it runs
        run, finished = other.invoke(run, stale)
        assert finished and run.status == "success", run.error
        assert run.function_version == 2 and run.tokens_out == 1
        assert any("changed to version 2" in line for line in run.logs)
        stored = c.get(f"/api/v1/namespaces/_/activations/{run.id}").json()
        assert stored["version"] == 2 and stored["tokens_out"] == 1
        assert _in_flight(other.db, stale.id) == [0], "the stale slot was not given back"

        # Version 3 takes smaller requests: one that version 2 took is refused when rebased.
        c.put(
            "/api/v1/namespaces/_/functions/cached?overwrite=true",
            json={"limits": {"max_payload": 100}},
        )
        v2 = other.function_for("alpha", "cached")
        assert v2.version == 2
        run = other.new_run("alpha", v2, body, blocking=True, body_bytes=200)
        run, finished = other.invoke(run, v2)
        assert finished and run.error is not None and run.error["code"] == "payload_too_large"
        assert _in_flight(other.db, stale.id) == [0]

        assert c.delete("/api/v1/namespaces/_/functions/cached").status_code == 200
        gone = other.function_for("alpha", "cached")  # still cached here
        run, finished = other.invoke(other.new_run("alpha", gone, body, blocking=True), gone)
        assert finished and run.status != "success"
        assert run.error is not None and run.error["code"] == "not_found"
    finally:
        other.close()
        other.db.dispose()


def test_a_queued_run_is_validated_against_the_definition_it_runs_under(
    stack: dict[str, Any],
) -> None:
    """A queued activation keeps the caller's parameters; defaults and limits come from the
    version that runs it (here version 2 lowered max_tokens)."""
    c = api(stack)
    make_fn(c, "requeued", limits={"max_tokens": 8}, params={"temperature": 0})
    other = Controller(stack["ctl"].config, Database(stack["ctl"].config.database_url))
    try:
        v1 = other.function_for("alpha", "requeued")
        submitted = other.new_run("alpha", v1, {"prompt": "tell me a long story"}, blocking=False)
        assert "max_tokens" not in submitted.request
        # What the queue loop makes of the stored row it claimed (`submit` stores the body
        # as sent); the run writes its outcome to that row, under that claim.
        cols = {**submitted.columns(), "request": submitted.body, "status": "running"}
        claim = {"claimed_by": "test-claim", "lease_until": time.time() + 60}
        queued = Run.of(Activation(**cols, **claim), "alpha")
        with other.db.session(write=True) as s:
            s.add(Activation(**cols, **claim))
        up = c.put(
            "/api/v1/namespaces/_/functions/requeued?overwrite=true",
            json={"limits": {"max_tokens": 2}},
        )
        assert up.json()["version"] == 2
        other._functions.clear()
        v2 = other.function_for("alpha", "requeued")
        run, finished = other.invoke(queued, v2)
        assert finished and run.status == "success", run.error
        assert run.request == {"prompt": "tell me a long story", "temperature": 0}
        assert run.function_version == 2 and run.tokens_out == 2
    finally:
        other.close()
        other.db.dispose()


def _function_id(db: Database, namespace: str, name: str) -> tuple[int, int]:
    """(function id, namespace id) of a function, from the database."""
    with db.session() as s:
        fn_id, ns_id = s.execute(
            select(Function.id, Namespace.id)
            .join(Namespace, Namespace.id == Function.namespace_id)
            .where(Namespace.name == namespace, Function.name == name)
        ).one()
    return int(fn_id), int(ns_id)


def _status(db: Database, activation_id: str) -> str:
    with db.session() as s:
        return str(s.scalar(select(Activation.status).where(Activation.id == activation_id)))


def test_leaked_slots_come_back_after_the_function_timeout(stack: dict[str, Any]) -> None:
    """Counts a dead controller left on an instance are reset; counts of live requests are not."""
    c = api(stack)
    make_fn(c, "leaky", limits={"timeout": 5})
    body = {"prompt": "hi", "max_tokens": 1}
    url = "/api/v1/namespaces/_/functions/leaky/invocations?blocking=true"
    assert c.post(url, json=body).status_code == 200
    db: Database = stack["db"]
    fn_id, ns_id = _function_id(db, "alpha", "leaky")
    lease_margin = stack["ctl"].config.lease_margin

    def set_slots(in_flight: int, last_used_at: float) -> None:
        with db.session(write=True) as s:
            s.execute(
                update(Instance)
                .where(Instance.function_id == fn_id)
                .values(in_flight=in_flight, last_used_at=last_used_at)
            )

    def expired_activation() -> str:
        """A running activation, sent to an invoker, whose lease ran out: the next maintenance
        pass ends it, in the same transaction that resets leaked slots, which tells the test a
        pass happened."""
        row = Activation(
            namespace_id=ns_id,
            function_name="leaky",
            function_version=1,
            model="llama",
            task="generate",
            status="running",
            blocking=False,
            request={},
            logs=[],
            created_at=time.time(),
            start_at=time.time() - 2,  # sent: it ends interrupted (unsent ones are queued again)
            lease_until=time.time() - 1,
        )
        with db.session(write=True) as s:
            s.add(row)
            s.flush()
            return str(row.id)

    set_slots(2, time.time())  # as if two requests were running now
    marker = expired_activation()
    wait_until(lambda: _status(db, marker) == "platform_error", 30, "a maintenance pass")
    assert _in_flight(db, fn_id) == [2], "the slots of live requests were taken back"
    set_slots(2, time.time() - 5 - lease_margin - 1)  # nobody touched it for longer than allowed
    wait_until(lambda: _in_flight(db, fn_id) == [0], 30, "the leaked slots to come back")
    assert c.post(url, json=body).status_code == 200


def test_non_blocking_invocations_each_run_once(stack: dict[str, Any]) -> None:
    """Queued jobs are claimed by the queue workers (of every controller worker) and each
    reaches the invoker exactly once."""
    c = api(stack)
    make_fn(c, "async")
    inv = stack["inv"]
    ran_before = inv.metric("sllm_invoker_requests_total", endpoint="/v1/invoke")
    key = stack["keys"]["alpha"]

    def submit(i: int) -> str:
        # All at once, on connections of their own: the queue loops of every worker see a
        # backlog and race to claim it.
        r = httpx.post(
            stack["ctl"].url + "/api/v1/namespaces/_/functions/async/invocations",
            json={"prompt": f"job {i}", "max_tokens": 3},
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        )
        assert r.status_code == 202, r.text
        activation_id: str = r.json()["activationId"]
        return activation_id

    ids = run_together(16, submit)
    assert all(isinstance(i, str) for i in ids), ids

    def ended() -> list[dict[str, Any]] | None:
        docs = [c.get(f"/api/v1/namespaces/_/activations/{i}").json() for i in ids]
        return docs if all(d["status"] not in ("queued", "running") for d in docs) else None

    docs = wait_until(ended, 120, "every activation to end")
    assert [d["status"] for d in docs] == ["success"] * len(ids), [
        (d["status"], d["error"]) for d in docs if d["status"] != "success"
    ]
    assert all(d["result"]["usage"]["completion_tokens"] >= 1 for d in docs)
    ran = inv.metric("sllm_invoker_requests_total", endpoint="/v1/invoke") - ran_before
    assert ran == len(ids), f"{len(ids)} jobs made {ran} invocations at the invoker"


def test_streaming_native(stack: dict[str, Any]) -> None:
    c = api(stack)
    make_fn(c, "streamy")
    body = {"prompt": "tell me", "max_tokens": 6, "temperature": 0}
    with c.stream(
        "POST", "/api/v1/namespaces/_/functions/streamy/invocations?stream=true", json=body
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    text = "".join(e["text"] for e in events if e["event"] == "token")
    blocking = c.post(
        "/api/v1/namespaces/_/functions/streamy/invocations?blocking=true&result=true", json=body
    ).json()
    assert text == blocking["text"]


def test_embeddings_function(stack: dict[str, Any]) -> None:
    c = api(stack)
    make_fn(c, "embedder", task="embed")
    c.put("/api/v1/namespaces/_/functions/embedder?overwrite=true", json={"model": "emb"})
    r = c.post(
        "/api/v1/namespaces/_/functions/embedder/invocations?blocking=true&result=true",
        json={"input": ["a cat", "a dog"]},
    )
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 2


def test_namespaces_are_isolated(stack: dict[str, Any]) -> None:
    a, b = api(stack, "alpha"), api(stack, "beta")
    make_fn(a, "private")
    assert b.get("/api/v1/namespaces/alpha/functions/private").status_code == 403
    assert b.get("/api/v1/namespaces/_/functions/private").status_code == 404
    assert (
        b.post("/api/v1/namespaces/alpha/functions/private/invocations", json={}).status_code == 403
    )
    assert b.get("/api/v1/namespaces/alpha/activations").status_code == 403
    assert b.put("/api/v1/namespaces/gamma").status_code == 403  # not an admin
    assert b.get("/api/v1/invokers").status_code == 403
    bad = client(stack["ctl"].url, "nobody:nothing")
    assert bad.get("/api/v1/namespaces/_/functions").status_code == 401
    assert httpx.get(stack["ctl"].url + "/api/v1/namespaces/_/functions").status_code == 401


def test_bad_invocations_are_4xx(stack: dict[str, Any]) -> None:
    c = api(stack)
    make_fn(c, "strict", limits={"max_tokens": 8, "max_payload": 2048})
    base = "/api/v1/namespaces/_/functions/strict/invocations?blocking=true"
    cases: list[tuple[Any, int]] = [
        ({}, 400),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, 400),
        ({"prompt": "x", "max_tokens": 9}, 400),
        ({"prompt": "x", "temperature": 5}, 400),
        ({"prompt": "x", "top_p": 0}, 400),
        ({"prompt": "x", "colour": "red"}, 400),
        ({"prompt": "x" * 4000}, 413),
    ]
    for body, status in cases:
        r = c.post(base, json=body)
        assert r.status_code == status, (body, r.text)
        assert r.json()["error"]["message"]
    maybe = "/api/v1/namespaces/_/functions/strict/invocations?blocking=maybe"
    assert c.post(maybe, json={"prompt": "x"}).status_code == 400
    assert c.post("/api/v1/namespaces/_/functions/none/invocations", json={}).status_code == 404
    raw = c.post(base, content=b"{not json", headers={"Content-Type": "application/json"})
    assert raw.status_code == 400


def test_openapi_and_health(stack: dict[str, Any]) -> None:
    url = stack["ctl"].url
    assert httpx.get(url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(url + "/readyz").status_code == 200
    doc = httpx.get(url + "/api/v1/openapi.json").json()
    assert doc["openapi"].startswith("3.") and "/v1/chat/completions" in doc["paths"]


def test_metrics_count_requests_activations_and_starts(stack: dict[str, Any]) -> None:
    """What a Prometheus scrape shows moves by exactly what the client did (all workers)."""
    c = api(stack)
    make_fn(c, "counted")
    before = httpx.get(stack["ctl"].url + "/metrics").text
    for _ in range(3):
        r = c.post(
            "/api/v1/namespaces/_/functions/counted/invocations?blocking=true",
            json={"prompt": "hi", "max_tokens": 2},
        )
        assert r.status_code == 200, r.text
    assert c.post("/api/v1/namespaces/_/functions/counted/invocations", json=[]).status_code == 400
    after = httpx.get(stack["ctl"].url + "/metrics").text

    def delta(name: str, **labels: str) -> float:
        return metric_value(after, name, **labels) - metric_value(before, name, **labels)

    endpoint = "/api/v1/namespaces/<ns>/functions/<name>/invocations"
    assert delta("sllm_controller_requests_total", endpoint=endpoint, status="200") == 3
    assert delta("sllm_controller_requests_total", endpoint=endpoint, status="400") == 1
    assert delta("sllm_controller_request_seconds_count", endpoint=endpoint) == 4
    assert delta("sllm_activations_total", task="generate", status="success") == 3
    assert delta("sllm_starts_total", kind="cold") == 1
    assert delta("sllm_starts_total", kind="warm") == 2
    assert delta("sllm_ttft_seconds_count", cold="true") == 1
    assert delta("sllm_ttft_seconds_count", cold="false") == 2


def test_invokers_list(stack: dict[str, Any]) -> None:
    invokers = stack["admin"].get("/api/v1/invokers").json()
    assert [i["name"] for i in invokers] == ["inv-a"]
    assert invokers[0]["state"] == "active" and "tiers" in invokers[0]["status"]
