"""Failures and scaling with real processes: a controller restart with queued and finished
activations (nothing lost, nothing run twice), an invoker lost during a request (a clean
error or a retry, never a hang), keep-alive unloads, prewarm, and scale-out."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from sllm.db import Activation, Database
from sllm.store import open_store, push_model
from sllm.tiny_models import build_tiny_model
from tests.support.controller import (
    ControllerProcess,
    client,
    registered_invoker,
    wait_for_invokers,
)
from tests.support.databases import fresh_postgres_database
from tests.support.invoker import InvokerProcess
from tests.support.process import stop_all
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.invoker, pytest.mark.slow]


def _store(root: Path) -> str:
    """A folder store with "llama" (seed 0) and "llama2" (seed 1), both with a long context."""
    uri = (root / "store").as_uri()
    for name, seed in (("llama", 0), ("llama2", 1)):
        src = build_tiny_model("llama", root / f"hf-{name}", seed=seed)
        # A longer context than the tiny default, so a generation can run for seconds.
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
        push_model(str(src), name, open_store(uri), progress=False)
    return uri


def _invoker(root: Path, name: str, store_uri: str, controller_url: str) -> InvokerProcess:
    return registered_invoker(root / name, store_uri, controller_url, name, heartbeat=0.3)


def _namespace(admin: httpx.Client, ns: str) -> str:
    """Create namespace `ns` and return a new key of it."""
    assert admin.put(f"/api/v1/namespaces/{ns}").status_code == 201
    key: str = admin.post(f"/api/v1/namespaces/{ns}/keys").json()["key"]
    return key


def _statuses(db: Database, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    """(status, claimed_by) of activations, read from the database (no controller needed)."""
    with db.session() as s:
        rows = s.execute(
            select(Activation.id, Activation.status, Activation.claimed_by).where(
                Activation.id.in_(ids)
            )
        ).all()
    return {i: (status, claimed) for i, status, claimed in rows}


INVOKES = "sllm_invoker_requests_total"


def test_controller_restart_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, postgres_admin_url: str
) -> None:
    """A job claimed by a controller that crashed before sending it goes back to the queue;
    every job runs once after the restart; a finished one keeps its result."""
    store_uri = _store(tmp_path)
    # One worker running one queued job at a time: the first job is claimed (and waits for an
    # invoker) at the crash, the rest stay queued.
    env = {"SLLM_QUEUE_WORKERS": "1", "SLLM_LEASE_MARGIN": "1"}
    with fresh_postgres_database(postgres_admin_url) as db_url:
        db = Database(db_url, pool_size=1)
        ctl = ControllerProcess(db_url, tmp_path, env=env, workers=1).start()
        inv = _invoker(tmp_path, "inv-a", store_uri, ctl.url)
        try:
            inv.start()
            admin = ctl.admin()
            wait_for_invokers(admin, 1)
            key = _namespace(admin, "r")
            c = client(ctl.url, key)
            short = {"model": "llama", "limits": {"timeout": 10}}
            assert c.put("/api/v1/namespaces/_/functions/f", json=short).status_code == 201
            done = c.post(
                "/api/v1/namespaces/_/functions/f/invocations?blocking=true",
                json={"prompt": "hi", "max_tokens": 2},
            ).json()
            assert done.get("status") == "success", done
            inv.stop()  # no invoker: the claimed job waits for one (up to its 10 s timeout)
            wait_until(
                lambda: all(i["state"] == "lost" for i in admin.get("/api/v1/invokers").json()),
                10,
                "the invoker to be out of rotation",
            )
            ids = [
                c.post(
                    "/api/v1/namespaces/_/functions/f/invocations",
                    json={"prompt": f"job {i}", "max_tokens": 2},
                ).json()["activationId"]
                for i in range(4)
            ]
            claimed = wait_until(
                lambda: [i for i, (st, _) in _statuses(db, ids).items() if st == "running"],
                10,
                "a queue worker to claim a job",
            )
            ctl.stop(signal.SIGKILL)  # crash: no clean shutdown
            at_crash = _statuses(db, ids)
            assert len(claimed) == 1 and at_crash[claimed[0]][0] == "running", at_crash
            assert at_crash[claimed[0]][1], "a claimed job names its controller"
            queued = [i for i in ids if i not in claimed]
            assert [at_crash[i][0] for i in queued] == ["queued"] * 3, at_crash
            ctl = ControllerProcess(db_url, tmp_path, env=env, workers=1, port=ctl.port).start()
            c = client(ctl.url, key)
            # Room for a cold start again (the claimed job's 10 s timeout stays in its lease).
            long = {"limits": {"timeout": 60}}
            assert c.put("/api/v1/namespaces/_/functions/f?overwrite=true", json=long).is_success
            inv = _invoker(tmp_path, "inv-a", store_uri, ctl.url).start()

            def ended() -> dict[str, dict[str, Any]] | None:
                acts = {i: c.get(f"/api/v1/namespaces/_/activations/{i}").json() for i in ids}
                done_ = all(a["status"] not in ("queued", "running") for a in acts.values())
                return acts if done_ else None

            final = wait_until(ended, 90, "every job to end")
            # The claimed job never reached an invoker (there was none): once its lease ran
            # out it went back to the queue, so every job ran, each exactly once.
            for i in ids:
                assert final[i]["status"] == "success", final[i]
                assert final[i]["result"]["usage"]["completion_tokens"] >= 1
            # Executions counted where they happen: the new invoker ran the four jobs, once each.
            assert inv.metric(INVOKES, endpoint="/v1/invoke") == len(ids)
            again = c.get(f"/api/v1/namespaces/_/activations/{done['activationId']}").json()
            assert again["result"] == done["result"]
            listed = c.get("/api/v1/namespaces/_/activations?limit=50").json()
            assert len({a["activationId"] for a in listed}) == len(listed) == 5
        finally:
            stop_all([inv, ctl])
            db.dispose()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """`sllm controller start` with two gunicorn workers on SQLite, and two invoker processes."""
    store_uri = _store(tmp_path)
    ctl = ControllerProcess(
        f"sqlite:///{tmp_path / 'db.sqlite'}", tmp_path, env={"SLLM_HEARTBEAT_TIMEOUT": "1.5"}
    )
    invs: dict[str, InvokerProcess] = {}
    try:
        ctl.start()
        for name in ("inv-a", "inv-b"):
            invs[name] = _invoker(tmp_path, name, store_uri, ctl.url)
            invs[name].start()
        admin = ctl.admin()
        wait_for_invokers(admin, 2)
        key = _namespace(admin, "p")
        yield {"ctl": ctl, "invs": invs, "admin": admin, "api": client(ctl.url, key, 120)}
    finally:
        stop_all([ctl, *invs.values()])


def _instances(pair: dict[str, Any]) -> dict[str, list[str]]:
    """Functions loaded on each invoker, from the invokers themselves."""
    out = {}
    for name, proc in pair["invs"].items():
        status = proc.client().get("/v1/status").json()
        out[name] = [i["function"] for i in status["instances"] if not i.get("loading")]
    return out


def test_invoker_lost_mid_stream_ends_the_stream_cleanly(pair: dict[str, Any]) -> None:
    """Without resume (the function opts out; test_controller_resume covers resuming)."""
    c = pair["api"]
    c.put(
        "/api/v1/namespaces/_/functions/long",
        json={"model": "llama", "limits": {"max_tokens": 4000}, "on_invoker_loss": "fail"},
    )
    # Greedy decoding of this prompt on the seed-0 tiny model runs past 300 tokens without
    # an end-of-sequence token ("go on" stops after 4, racing the kill below).
    body = {"prompt": "tell me a long story", "max_tokens": 4000, "temperature": 0}
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    url = "/api/v1/namespaces/_/functions/long/invocations?stream=true"
    with c.stream("POST", url, json=body) as r:
        for line in r.iter_lines():
            if not line:
                continue
            events.append(json.loads(line))
            if len(events) == 3:  # start + two tokens: kill the invoker serving it
                assert events[0]["event"] == "start"
                pair["invs"][events[0]["invoker"]].stop(signal.SIGKILL)
    assert time.monotonic() - started < 60
    assert events[-1]["event"] == "error", events[-3:]
    assert events[-1]["error"]["code"] == "invoker_lost", events[-1]
    act = c.get(f"/api/v1/namespaces/_/activations/{events[0]['activationId']}").json()
    assert act["status"] == "platform_error"
    # The next request goes to the surviving invoker (retried there if it tries the dead one).
    again = c.post(
        "/api/v1/namespaces/_/functions/long/invocations?blocking=true",
        json={"prompt": "hi", "max_tokens": 2},
    )
    assert again.status_code == 200, again.text
    survivor = next(n for n, p in pair["invs"].items() if p.running())
    assert again.json()["invoker"] == survivor


def test_keep_alive_unloads_but_keeps_dram_and_prewarm_loads(pair: dict[str, Any]) -> None:
    c = pair["api"]
    c.put(
        "/api/v1/namespaces/_/functions/brief",
        json={"model": "llama", "scaling": {"keep_alive": 0.5}},
    )
    r = c.post(
        "/api/v1/namespaces/_/functions/brief/invocations?blocking=true",
        json={"prompt": "hi", "max_tokens": 1},
    ).json()
    host = r["invoker"]
    wait_until(lambda: "p/brief" not in _instances(pair)[host], 15, "the keep-alive unload")
    dram = pair["invs"][host].client().get("/v1/status").json()["tiers"]["dram"]["models"]
    assert dram, "scale to zero keeps the model in DRAM"
    again = c.post(
        "/api/v1/namespaces/_/functions/brief/invocations?blocking=true",
        json={"prompt": "hi", "max_tokens": 1},
    ).json()
    assert again["cold"] is True and again["tier"] == "dram"
    c.put(
        "/api/v1/namespaces/_/functions/warm",
        json={"model": "llama", "scaling": {"min_instances": 1}},
    )
    wait_until(
        lambda: any("p/warm" in fns for fns in _instances(pair).values()),
        30,
        "the prewarmed instance",
    )
    first = c.post(
        "/api/v1/namespaces/_/functions/warm/invocations?blocking=true",
        json={"prompt": "hi", "max_tokens": 1},
    ).json()
    assert first["cold"] is False


def test_scale_out_to_a_second_invoker(pair: dict[str, Any]) -> None:
    c = pair["api"]
    c.put(
        "/api/v1/namespaces/_/functions/wide",
        json={
            "model": "llama",
            "limits": {"concurrency": 1, "max_tokens": 400},
            "scaling": {"max_instances": 2},
        },
    )
    results: list[httpx.Response] = []

    def call() -> None:
        results.append(
            c.post(
                "/api/v1/namespaces/_/functions/wide/invocations?blocking=true",
                json={"prompt": "go", "max_tokens": 200, "temperature": 0},
            )
        )

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200, 200]
    assert {r.json()["invoker"] for r in results} == {"inv-a", "inv-b"}


def _in_dram_at_controller(admin: httpx.Client, invoker: str, model: str) -> bool:
    """Whether the controller's view of `invoker` (its last heartbeat) has `model` in DRAM."""
    for i in admin.get("/api/v1/invokers").json():
        if i["name"] == invoker:
            entries = i["status"].get("tiers", {}).get("dram", {}).get("models", [])
            return any(str(e.get("key", "")).split("@", 1)[0] == model for e in entries)
    return False


def test_a_cold_start_goes_where_the_model_is_cached(pair: dict[str, Any]) -> None:
    """Placement by locality: a new function of a model already in an invoker's DRAM starts
    there, even though that invoker holds more instances than the other."""
    c = pair["api"]
    for name, model in (("first", "llama"), ("second", "llama2"), ("third", "llama")):
        r = c.put(f"/api/v1/namespaces/_/functions/{name}", json={"model": model})
        assert r.status_code == 201, r.text

    def run(name: str) -> dict[str, Any]:
        r = c.post(
            f"/api/v1/namespaces/_/functions/{name}/invocations?blocking=true",
            json={"prompt": "hi", "max_tokens": 1},
        )
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    first = run("first")  # nothing cached anywhere, no instances: the first name wins
    assert (first["invoker"], first["tier"]) == ("inv-a", "remote"), first
    wait_until(
        lambda: _in_dram_at_controller(pair["admin"], "inv-a", "llama"),
        15,
        "inv-a to report llama in DRAM",
    )
    second = run("second")  # llama2 is nowhere: the invoker with fewer instances
    assert (second["invoker"], second["tier"]) == ("inv-b", "remote"), second
    third = run("third")  # llama is in inv-a's DRAM (inv-a: 1 instance, inv-b: 1)
    assert third["cold"] is True, third
    assert (third["invoker"], third["tier"]) == ("inv-a", "dram"), third


def test_sigterm_lets_the_requests_in_flight_finish(tmp_path: Path) -> None:
    """SIGTERM to the controller (gunicorn master, two workers): a stream in flight ends with
    all its tokens and is recorded, then the process exits cleanly."""
    store_uri = _store(tmp_path)
    db_url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    ctl = ControllerProcess(db_url, tmp_path)
    inv: InvokerProcess | None = None
    try:
        ctl.start()
        inv = _invoker(tmp_path, "inv-a", store_uri, ctl.url)
        inv.start()
        admin = ctl.admin()
        wait_for_invokers(admin, 1)
        c = client(ctl.url, _namespace(admin, "t"))
        fn = {"model": "llama", "limits": {"max_tokens": 1000}}
        assert c.put("/api/v1/namespaces/_/functions/long", json=fn).status_code == 201
        path = "/api/v1/namespaces/_/functions/long/invocations"
        body = {"prompt": "tell me a long story", "max_tokens": 400, "temperature": 0}
        reference = c.post(f"{path}?blocking=true&result=true", json=body)
        assert reference.status_code == 200, reference.text  # and the instance is warm now
        events: list[dict[str, Any]] = []
        with c.stream("POST", f"{path}?stream=true", json=body) as r:
            assert r.status_code == 200
            lines = (json.loads(line) for line in r.iter_lines() if line)
            for event in lines:
                events.append(event)
                if len(events) == 3:  # start and two tokens: in flight
                    break
            terminated_at = time.time()
            assert ctl.proc is not None
            ctl.proc.send_signal(signal.SIGTERM)  # to the master only, as Kubernetes does
            events.extend(lines)
        assert events[0]["event"] == "start" and events[-1]["event"] == "done", events[-3:]
        text = "".join(e["text"] for e in events if e["event"] == "token")
        assert text == reference.json()["text"], "the stream lost or changed tokens"
        assert ctl.proc.wait(30) == 0, ctl.log()
        with pytest.raises(httpx.TransportError):
            httpx.get(ctl.url + "/healthz", timeout=5)
        db = Database(db_url, pool_size=1)
        try:
            with db.session() as s:
                row = s.execute(
                    select(Activation.status, Activation.end_at).where(
                        Activation.id == events[0]["activationId"]
                    )
                ).one()
        finally:
            db.dispose()
        assert row.status == "success", row
        assert row.end_at is not None and row.end_at > terminated_at, "not in flight at SIGTERM"
    finally:
        stop_all([ctl] if inv is None else [ctl, inv])
