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

from sllm.store import open_store, push_model
from sllm.tiny_models import build_tiny_model
from tests.support.controller import (
    ControllerProcess,
    ControllerThread,
    client,
    registered_invoker,
    wait_for_invokers,
)
from tests.support.databases import fresh_postgres_database
from tests.support.invoker import InvokerProcess
from tests.support.s3 import free_port

pytestmark = [pytest.mark.invoker, pytest.mark.slow]


def _store(root: Path) -> str:
    uri = (root / "store").as_uri()
    src = build_tiny_model("llama", root / "hf", seed=0)
    # A longer context than the tiny default, so a generation can run for seconds.
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    push_model(str(src), "llama", open_store(uri), progress=False)
    return uri


def _invoker(root: Path, name: str, store_uri: str, controller_url: str) -> InvokerProcess:
    return registered_invoker(root / name, store_uri, controller_url, name, heartbeat=0.3)


def _wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_controller_restart_loses_nothing_and_runs_nothing_twice(
    tmp_path: Path, postgres_admin_url: str
) -> None:
    store_uri = _store(tmp_path)
    port = free_port()
    # One worker claiming one job at a time: one job is running at the crash, the rest queued.
    env = {"SLLM_QUEUE_WORKERS": "1", "SLLM_LEASE_MARGIN": "1", "SLLM_WORKERS": "1"}
    with fresh_postgres_database(postgres_admin_url) as db_url:
        ctl = ControllerProcess(db_url, tmp_path, env=env, port=port).start()
        inv = _invoker(tmp_path, "inv-a", store_uri, ctl.url)
        try:
            inv.start()
            admin = ctl.admin()
            wait_for_invokers(admin, 1)
            admin.put("/api/v1/namespaces/r")
            key = admin.post("/api/v1/namespaces/r/keys").json()["key"]
            c = client(ctl.url, key)
            assert (
                c.put("/api/v1/namespaces/_/functions/f", json={"model": "llama"}).status_code
                == 201
            )
            done = c.post(
                "/api/v1/namespaces/_/functions/f/invocations?blocking=true",
                json={"prompt": "hi", "max_tokens": 2},
            ).json()
            assert done.get("status") == "success", done
            # Work that cannot be placed gives up soon after the invoker is gone.
            short = {"limits": {"timeout": 4}}
            assert c.put("/api/v1/namespaces/_/functions/f?overwrite=true", json=short).is_success
            inv.stop()  # no invoker: new work waits (one runs and waits, the rest queue)
            admin.get("/api/v1/invokers")
            _wait(
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
            time.sleep(0.5)
            ctl.stop(signal.SIGKILL)  # crash: no clean shutdown
            ctl = ControllerProcess(db_url, tmp_path, env=env, port=port).start()
            c = client(ctl.url, key)
            # Room for a cold start again (a job claimed before this may still time out).
            long = {"limits": {"timeout": 60}}
            assert c.put("/api/v1/namespaces/_/functions/f?overwrite=true", json=long).is_success
            inv = _invoker(tmp_path, "inv-a", store_uri, ctl.url).start()

            def outcomes() -> dict[str, str] | None:
                got = {
                    i: c.get(f"/api/v1/namespaces/_/activations/{i}").json()["status"] for i in ids
                }
                return got if all(s not in ("queued", "running") for s in got.values()) else None

            final = _wait(outcomes, 60, "every queued activation to end")
            # Each ran at most once: those the dead controller had claimed (they never reached
            # an invoker) went back to the queue; all ran once, after the restart, or timed out.
            assert set(final.values()) <= {"success", "platform_error", "timeout"}
            assert list(final.values()).count("success") >= 2, [
                (lambda a: (a["status"], a["error"], a["logs"]))(
                    c.get(f"/api/v1/namespaces/_/activations/{i}").json()
                )
                for i in ids
            ]
            for i in ids:
                act = c.get(f"/api/v1/namespaces/_/activations/{i}").json()
                if act["status"] == "platform_error":
                    assert act["error"]["code"] in ("interrupted", "timeout"), act
            assert (
                c.get(f"/api/v1/namespaces/_/activations/{done['activationId']}").json()["result"]
                == done["result"]
            )
            listed = c.get("/api/v1/namespaces/_/activations?limit=50").json()
            assert len({a["activationId"] for a in listed}) == len(listed) == 5
        finally:
            inv.stop()
            ctl.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """An in-process controller on SQLite with two invoker processes."""
    store_uri = _store(tmp_path)
    ctl = ControllerThread(
        f"sqlite:///{tmp_path / 'db.sqlite'}", heartbeat_timeout=1.5, maintenance_interval=0.2
    ).start()
    invs = {n: _invoker(tmp_path, n, store_uri, ctl.url) for n in ("inv-a", "inv-b")}
    try:
        for p in invs.values():
            p.start()
        admin = ctl.admin()
        wait_for_invokers(admin, 2)
        admin.put("/api/v1/namespaces/p")
        key = admin.post("/api/v1/namespaces/p/keys").json()["key"]
        yield {"ctl": ctl, "invs": invs, "admin": admin, "api": client(ctl.url, key, 120)}
    finally:
        for p in invs.values():
            p.stop()
        ctl.stop()


def _instances(pair: dict[str, Any]) -> dict[str, list[str]]:
    """Functions loaded on each invoker, from the invokers themselves."""
    out = {}
    for name, proc in pair["invs"].items():
        status = proc.client().get("/v1/status").json()
        out[name] = [i["function"] for i in status["instances"] if not i.get("loading")]
    return out


def test_invoker_lost_mid_stream_ends_the_stream_cleanly(pair: dict[str, Any]) -> None:
    c = pair["api"]
    c.put(
        "/api/v1/namespaces/_/functions/long",
        json={"model": "llama", "limits": {"max_tokens": 4000}},
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
    survivor = next(n for n, p in pair["invs"].items() if p.proc and p.proc.poll() is None)
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
    _wait(lambda: "p/brief" not in _instances(pair)[host], 15, "the keep-alive unload")
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
    _wait(
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
