"""Draining real invokers: an admin's drain under load, and an invoker's SIGTERM mid-stream.

A controller (in this process, SQLite, fast maintenance) and invoker processes
on loopback; a tiny Llama with a long context, so a stream with `ignore_eos`
runs for a few seconds.
"""

from __future__ import annotations

import json
import os
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
    ControllerThread,
    client,
    registered_invoker,
    wait_for_invokers,
)
from tests.support.invoker import InvokerProcess
from tests.support.process import stop_all
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.invoker, pytest.mark.slow]

# Per stream: a few seconds through the controller (the tiny model decodes a token in under
# a millisecond; relaying it costs more), so a stream spans the drain or SIGTERM.
TOKENS = 3000
BODY = {"prompt": "tell me a long story", "max_tokens": TOKENS, "ignore_eos": True}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A controller, invokers inv-a and inv-b, and a namespace key; module-wide."""
    root = tmp_path_factory.mktemp("drain")
    store_uri = (root / "store").as_uri()
    src = build_tiny_model("llama", root / "hf", seed=0)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    push_model(str(src), "llama", open_store(store_uri), progress=False)
    ctl = ControllerThread(f"sqlite:///{root / 'db.sqlite'}").start()
    invs: dict[str, InvokerProcess] = {}
    try:
        for name in ("inv-a", "inv-b"):
            invs[name] = registered_invoker(root / name, store_uri, ctl.url, name, heartbeat=0.3)
            invs[name].start()
        admin = ctl.admin()
        wait_for_invokers(admin, 2)
        assert admin.put("/api/v1/namespaces/d").status_code == 201
        key = admin.post("/api/v1/namespaces/d/keys").json()["key"]
        yield {
            "ctl": ctl,
            "invs": invs,
            "admin": admin,
            "api": client(ctl.url, key, 120),
            "root": root,
            "store": store_uri,
        }
    finally:
        stop_all(invs.values())
        ctl.stop()


class Stream:
    """A streaming invocation read on a thread: its events, and when its first token came."""

    def __init__(self, api: httpx.Client, fn: str) -> None:
        self.events: list[dict[str, Any]] = []
        self.first_token = threading.Event()
        self.error: Exception | None = None
        self._thread = threading.Thread(target=self._read, args=(api, fn), daemon=True)
        self._thread.start()

    def _read(self, api: httpx.Client, fn: str) -> None:
        url = f"/api/v1/namespaces/_/functions/{fn}/invocations?stream=true"
        try:
            with api.stream("POST", url, json=BODY) as r:
                for line in r.iter_lines():
                    if line:
                        self.events.append(json.loads(line))
                        if self.events[-1].get("event") == "token":
                            self.first_token.set()
        except Exception as exc:  # reported by the test
            self.error = exc
        self.first_token.set()

    def join(self, timeout: float) -> list[dict[str, Any]]:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the stream did not end"
        assert self.error is None, self.error
        return self.events

    @property
    def invoker(self) -> str:
        return str(self.events[0]["invoker"])


def _complete(events: list[dict[str, Any]]) -> bool:
    """A stream that ran to its end: TOKENS tokens, then done, no error."""
    kinds = [e.get("event") for e in events]
    return (
        kinds[-1] == "done"
        and "error" not in kinds
        and kinds.count("token") == TOKENS
        and events[-1]["usage"]["completion_tokens"] == TOKENS
    )


def _state(admin: httpx.Client, name: str) -> str:
    return str(admin.get(f"/api/v1/invokers/{name}").json()["state"])


def _held(inv: InvokerProcess) -> list[str]:
    """The instances an invoker process holds, as it says itself."""
    return [i["function"] for i in inv.client().get("/v1/status").json()["instances"]]


def _invoke(api: httpx.Client, fn: str) -> dict[str, Any]:
    r = api.post(
        f"/api/v1/namespaces/_/functions/{fn}/invocations?blocking=true",
        json={"prompt": "hi", "max_tokens": 2},
    )
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_a_drain_under_load_loses_no_stream_and_undrain_brings_it_back(
    cluster: dict[str, Any],
) -> None:
    api, admin, invs = cluster["api"], cluster["admin"], cluster["invs"]
    fn = {"model": "llama", "limits": {"max_tokens": TOKENS, "concurrency": 4}}
    assert api.put("/api/v1/namespaces/_/functions/load", json=fn).status_code == 201
    streams = [Stream(api, "load") for _ in range(3)]
    for s in streams:
        assert s.first_token.wait(120) and s.events, s.error
    (busy,) = {s.invoker for s in streams}  # one instance (max_instances 1) runs them all
    other = next(n for n in invs if n != busy)
    assert all(s.events[-1]["event"] == "token" for s in streams)  # all running

    drained = admin.post(f"/api/v1/invokers/{busy}/drain", json={})
    assert drained.status_code == 202, drained.text
    doc = drained.json()
    assert doc["state"] == "draining" and doc["drain"]["instances_left"] == 1
    # New requests go to the other invoker while the streams run on.
    for _ in range(2):
        assert _invoke(api, "load")["invoker"] == other
    assert any(s.events[-1]["event"] == "token" for s in streams), "the load ended too soon"
    for s in streams:
        assert _complete(s.join(120)), s.events[-2:]
    wait_until(lambda: _state(admin, busy) == "drained", 30, f"{busy} to be drained")
    assert "d/load" not in _held(invs[busy]), "the drained invoker still holds the instance"
    listed = {v["name"]: v for v in admin.get("/api/v1/invokers").json()}
    assert listed[busy]["drain"]["forced"] is False and listed[busy]["instances"] == 0

    # Undrain: back into placement. With the other one drained, work goes there again.
    assert admin.post(f"/api/v1/invokers/{busy}/undrain").json()["state"] == "active"
    assert admin.post(f"/api/v1/invokers/{other}/drain", json={"grace_s": 0}).status_code == 202
    try:
        assert _invoke(api, "load")["invoker"] == busy
    finally:
        assert admin.post(f"/api/v1/invokers/{other}/undrain").status_code == 200


def test_sigterm_mid_stream_drains_the_invoker_then_it_exits(cluster: dict[str, Any]) -> None:
    api, admin, invs = cluster["api"], cluster["admin"], cluster["invs"]
    ctl: ControllerThread = cluster["ctl"]
    root: Path = cluster["root"]
    leaving = registered_invoker(root / "inv-c", cluster["store"], ctl.url, "inv-c", heartbeat=0.3)
    leaving.args += ["--drain-grace", "60"]
    try:
        leaving.start()
        wait_for_invokers(admin, 3)
        # Only inv-c takes new instances while the stream starts.
        for name in invs:
            assert admin.post(f"/api/v1/invokers/{name}/drain", json={"grace_s": 0}).is_success
        fn = {"model": "llama", "limits": {"max_tokens": TOKENS}}
        assert api.put("/api/v1/namespaces/_/functions/term", json=fn).status_code == 201
        stream = Stream(api, "term")
        assert stream.first_token.wait(120) and stream.invoker == "inv-c", stream.events[:1]
        for name in invs:
            assert admin.post(f"/api/v1/invokers/{name}/undrain").is_success

        assert leaving.proc is not None
        os.kill(leaving.proc.pid, signal.SIGTERM)  # the gunicorn master, as Kubernetes does
        wait_until(lambda: _state(admin, "inv-c") == "draining", 10, "the controller to hear")
        assert stream.events[-1]["event"] == "token", "the stream ended before the SIGTERM"
        # It refuses new work (the controller has moved on; a straggler is told to retry) ...
        refused = leaving.post("/v1/invoke", {"function": "d/term", "model": "llama", **BODY})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
        assert refused.headers["Retry-After"] == "1"
        # ... and new requests go elsewhere, while the stream runs on to its end.
        assert _invoke(api, "term")["invoker"] in invs
        assert _complete(stream.join(120)), stream.events[-2:]
        assert leaving.proc.wait(30) == 0  # exits once nothing runs, well within its grace
        drain = admin.get("/api/v1/invokers/inv-c").json()["drain"]
        assert drain is not None and drain["by"] == "invoker" and drain["grace_s"] == 60
    finally:
        leaving.stop()
        for name in invs:
            admin.post(f"/api/v1/invokers/{name}/undrain")


def test_sigterm_with_nothing_running_exits_at_once(cluster: dict[str, Any]) -> None:
    root: Path = cluster["root"]
    idle = registered_invoker(
        root / "inv-idle", cluster["store"], cluster["ctl"].url, "inv-idle", heartbeat=0.3
    )
    idle.args += ["--drain-grace", "600"]
    try:
        idle.start()
        assert idle.proc is not None
        started = time.monotonic()
        os.kill(idle.proc.pid, signal.SIGTERM)
        assert idle.proc.wait(30) == 0
        assert time.monotonic() - started < 15  # not the 600 s grace
    finally:
        idle.stop()


def _direct_stream(inv: InvokerProcess, instance: str) -> tuple[threading.Thread, list[Any]]:
    """A stream straight to an invoker (no controller): its thread and its events."""
    events: list[Any] = []
    body = {"function": "x/direct", "model": "llama", "instance": instance, "stream": True, **BODY}

    def read() -> None:
        with inv.client().stream("POST", "/v1/invoke", json=body) as r:
            events.extend(json.loads(line) for line in r.iter_lines() if line)

    t = threading.Thread(target=read, daemon=True)
    t.start()
    return t, events


def test_a_forced_unload_cuts_a_stream_and_sigterm_past_its_grace_cuts_and_exits(
    cluster: dict[str, Any],
) -> None:
    """What a drain does when its grace runs out, on a standalone invoker."""
    root: Path = cluster["root"]
    alone = InvokerProcess(root / "inv-alone", cluster["store"], extra=("--drain-grace", "0.5"))
    try:
        alone.start()
        bad = alone.post("/v1/unload", {"instance": "i1", "force": "yes"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "force"
        reader, events = _direct_stream(alone, "i1")
        wait_until(lambda: len(events) > 2, 60, "the first tokens")
        busy = alone.post("/v1/unload", {"instance": "i1"})
        assert busy.status_code == 409, busy.text  # busy: refused without force
        cut = alone.post("/v1/unload", {"instance": "i1", "force": True})
        assert cut.status_code == 200 and cut.json()["unloaded"] is True
        reader.join(30)
        assert events[-1]["event"] == "error", events[-2:]

        reader, events = _direct_stream(alone, "i2")
        wait_until(lambda: len(events) > 2, 60, "the first tokens")
        assert alone.proc is not None
        os.kill(alone.proc.pid, signal.SIGTERM)
        reader.join(30)
        assert events[-1]["event"] == "error", events[-2:]  # cut after the 0.5 s grace
        assert [e["event"] for e in events].count("token") < TOKENS
        assert alone.proc.wait(30) == 0
    finally:
        alone.stop()
