"""Draining invokers at the controller, against stand-in invokers the test steers.

A controller in this process (both databases) whose maintenance runs only when
the test calls `maintain()`, its HTTP API for the admin calls, and stub
invokers that hold invocations, record unloads, and say what they run.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update

from sllm.controller import Controller
from sllm.controller._activations import Run
from sllm.db import Instance, Invoker
from tests.support.controller import ControllerThread, client
from tests.support.invoker import metric_value
from tests.support.stub_invoker import StubInvoker
from tests.support.waiting import wait_until

NS = "t"


@pytest.fixture
def served(db_url: str) -> Iterator[ControllerThread]:
    ctl = ControllerThread(db_url, threads=4, maintenance_interval=3600.0).start()
    try:
        ctl.controller.create_namespace(NS)
        yield ctl
    finally:
        ctl.stop()


@pytest.fixture
def ctl(served: ControllerThread) -> Controller:
    return served.controller


@pytest.fixture
def admin(served: ControllerThread) -> Iterator[httpx.Client]:
    with served.admin(timeout=30) as c:
        yield c


@pytest.fixture
def stubs() -> Iterator[tuple[StubInvoker, StubInvoker]]:
    with StubInvoker("a").running() as a, StubInvoker("b").running() as b:
        yield a, b


def _run(ctl: Controller, prompt: str) -> tuple[threading.Thread, list[Run]]:
    """A blocking invocation of function f on a thread of its own; its Run once it ended."""
    done: list[Run] = []

    def go() -> None:
        fn = ctl.function_for(NS, "f")
        run, _ = ctl.invoke(ctl.new_run(NS, fn, {"prompt": prompt}, blocking=True), fn)
        done.append(run)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t, done


def _sent(stub: StubInvoker) -> list[str]:
    return [b["prompt"] for b in stub.called("/v1/invoke")]


def _rows(ctl: Controller, invoker: str) -> list[tuple[int, str, int]]:
    with ctl.db.session() as s:
        return [
            tuple(r)
            for r in s.execute(
                select(Instance.id, Instance.state, Instance.in_flight)
                .join(Invoker, Invoker.id == Instance.invoker_id)
                .where(Invoker.name == invoker)
            ).all()
        ]


def _drain(admin: httpx.Client, name: str, **body: Any) -> dict[str, Any]:
    r = admin.post(f"/api/v1/invokers/{name}/drain", json=body)
    assert r.status_code == 202, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _doc(admin: httpx.Client, name: str) -> dict[str, Any]:
    r = admin.get(f"/api/v1/invokers/{name}")
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def test_a_drain_waits_for_what_runs_sends_new_work_elsewhere_then_unloads(
    ctl: Controller, admin: httpx.Client, stubs: tuple[StubInvoker, StubInvoker]
) -> None:
    a, b = stubs
    ctl.put_function(NS, "f", {"model": "m", "limits": {"timeout": 120}}, overwrite=False)
    ctl.heartbeat(a.status())
    a.hold = True
    first, first_done = _run(ctl, "running at the drain")
    a.wait_for("the first run to reach a", lambda s: _sent(s) == ["running at the drain"])
    ctl.heartbeat(b.status())
    (instance,) = _rows(ctl, "a")

    doc = _drain(admin, "a")
    # The default grace: the longest timeout of the functions placed there.
    assert doc["state"] == "draining" and doc["drain"]["grace_s"] == 120
    assert (doc["drain"]["by"], doc["drain"]["instances_left"]) == ("admin", 1)
    assert _rows(ctl, "a") == [(instance[0], "unloading", 1)]  # no new request goes there

    # New work goes to b, though f allows one instance: the draining one does not count.
    second, second_done = _run(ctl, "after the drain")
    second.join(10)
    assert second_done[0].status == "success" and second_done[0].invoker == "b"
    assert _sent(b) == ["after the drain"]

    ctl.heartbeat(a.status(generations=["g1"]))
    ctl.maintain()  # busy: waited for (nothing moves it yet), not unloaded
    assert a.called("/v1/unload") == []
    progress = _doc(admin, "a")
    assert progress["state"] == "draining"
    assert (progress["drain"]["generations_left"], progress["drain"]["instances_left"]) == (1, 1)

    a.release.set()
    first.join(10)
    assert first_done[0].status == "success" and first_done[0].invoker == "a"
    ctl.heartbeat(a.status(generations=[]))
    ctl.maintain()
    assert a.called("/v1/unload") == [{"instance": str(instance[0]), "function": f"{NS}/f"}]
    ctl.maintain()
    drained = _doc(admin, "a")
    assert drained["state"] == "drained" and drained["drain"]["finished_at"] is not None
    assert drained["drain"]["forced"] is False and drained["instances"] == 0
    metrics = admin.get("/metrics").text
    assert metric_value(metrics, "sllm_invokers", state="drained") == 1
    assert metric_value(metrics, "sllm_invokers", state="active") == 1

    ctl.heartbeat(a.status())  # heartbeats keep it drained
    assert _doc(admin, "a")["state"] == "drained"
    undrained = admin.post("/api/v1/invokers/a/undrain")
    assert undrained.status_code == 200 and undrained.json()["state"] == "active"
    assert undrained.json()["drain"] is None
    # Back in placement: drain b, and f goes back to a.
    _drain(admin, "b")
    a.hold = False
    third, third_done = _run(ctl, "after the undrain")
    third.join(10)
    assert third_done[0].status == "success" and third_done[0].invoker == "a"


def test_when_the_grace_runs_out_what_still_runs_is_cut(
    ctl: Controller, admin: httpx.Client, stubs: tuple[StubInvoker, StubInvoker]
) -> None:
    a, _ = stubs
    ctl.put_function(NS, "f", {"model": "m"}, overwrite=False)
    ctl.heartbeat(a.status())
    a.hold = True
    running, _ = _run(ctl, "long")
    a.wait_for("the run to reach a", lambda s: _sent(s) == ["long"])
    (instance,) = _rows(ctl, "a")
    assert _drain(admin, "a", grace_s=30)["drain"]["grace_s"] == 30
    # Draining again changes only the grace: 0 cuts at the next pass.
    again = _drain(admin, "a", grace_s=0)
    assert again["drain"]["grace_s"] == 0 and again["state"] == "draining"
    ctl.heartbeat(a.status(generations=["long"]))
    ctl.maintain()
    assert a.called("/v1/unload") == [
        {"instance": str(instance[0]), "function": f"{NS}/f", "force": True}
    ]
    doc = _doc(admin, "a")
    assert doc["state"] == "drained" and doc["drain"]["forced"] is True
    a.release.set()
    running.join(10)


def test_an_invoker_that_drains_itself_is_retried_elsewhere_and_back_when_restarted(
    ctl: Controller, admin: httpx.Client, stubs: tuple[StubInvoker, StubInvoker]
) -> None:
    a, b = stubs
    ctl.put_function(NS, "f", {"model": "m"}, overwrite=False)
    ctl.heartbeat(a.status())
    ctl.heartbeat(b.status())
    warm, warm_done = _run(ctl, "warm")
    warm.join(10)
    placed = warm_done[0].invoker
    here, there = (a, b) if placed == "a" else (b, a)
    # SIGTERM: it refuses new work before the controller has heard of it ...
    here.draining = True
    refused, refused_done = _run(ctl, "raced the drain")
    here.wait_for("a refused try", lambda s: "raced the drain" in _sent(s))
    # ... its next heartbeat (sent at once) says so, and the request goes elsewhere.
    assert ctl.heartbeat(here.status(draining={"since": 5.0, "grace_s": 30}))["state"] == "draining"
    refused.join(10)
    assert refused_done[0].status == "success" and refused_done[0].invoker == there.name
    doc = _doc(admin, here.name)
    assert (doc["state"], doc["drain"]["by"], doc["drain"]["grace_s"]) == (
        "draining",
        "invoker",
        30,
    )
    conflict = admin.post(f"/api/v1/invokers/{here.name}/undrain")
    assert conflict.status_code == 409 and "shutting down" in conflict.json()["error"]["message"]
    # Restarted: a new process, which does not drain.
    here.draining = False
    assert ctl.heartbeat(here.status())["state"] == "active"
    assert _doc(admin, here.name)["drain"] is None


def test_an_admins_drain_outlives_a_lost_invoker(
    ctl: Controller, admin: httpx.Client, stubs: tuple[StubInvoker, StubInvoker]
) -> None:
    a, _ = stubs
    ctl.heartbeat(a.status())
    _drain(admin, "a")
    ctl.maintain()
    assert _doc(admin, "a")["state"] == "drained"  # nothing ran there
    with ctl.db.session(write=True) as s:
        s.execute(update(Invoker).where(Invoker.name == "a").values(last_heartbeat=0.0))
    ctl.maintain()
    assert _doc(admin, "a")["state"] == "lost"
    refused = admin.post("/api/v1/invokers/a/drain", json={})
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "conflict"
    assert ctl.heartbeat(a.status())["state"] == "drained"  # back, still drained


BAD_DRAINS: dict[str, tuple[str, Any, int, str | None]] = {
    "unknown invoker": ("nobody", {}, 404, None),
    "a name no invoker has": ("x" * 129, {}, 400, None),
    "a control character in the name": ("a%01b", {}, 400, None),
    "grace_s negative": ("a", {"grace_s": -1}, 400, "grace_s"),
    "grace_s a string": ("a", {"grace_s": "60"}, 400, "grace_s"),
    "grace_s a boolean": ("a", {"grace_s": True}, 400, "grace_s"),
    "grace_s past a day": ("a", {"grace_s": 86_401}, 400, "grace_s"),
    "an unknown field": ("a", {"grace": 5}, 400, "grace"),
    "not an object": ("a", [1], 400, None),
}


@pytest.mark.parametrize(
    ("name", "body", "status", "param"), BAD_DRAINS.values(), ids=BAD_DRAINS.keys()
)
def test_bad_drain_requests_are_clean_4xx(
    ctl: Controller,
    admin: httpx.Client,
    stubs: tuple[StubInvoker, StubInvoker],
    name: str,
    body: Any,
    status: int,
    param: str | None,
) -> None:
    ctl.heartbeat(stubs[0].status())
    r = admin.post(f"/api/v1/invokers/{name}/drain", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"].get("param") == param
    assert _doc(admin, "a")["state"] == "active"  # nothing changed


def test_drain_needs_an_admin_key_and_heartbeats_a_well_formed_report(
    served: ControllerThread, ctl: Controller, admin: httpx.Client, stubs: tuple[StubInvoker, ...]
) -> None:
    a = stubs[0]
    ctl.heartbeat(a.status())
    key = ctl.create_key(NS, {})["key"]
    for path in ("/api/v1/invokers/a/drain", "/api/v1/invokers/a/undrain"):
        assert client(served.url, key).post(path).status_code == 403
        assert httpx.post(served.url + path).status_code == 401
        assert client(served.url, "nobody:nothing").post(path).status_code == 401
    assert admin.post("/api/v1/invokers/nobody/undrain").status_code == 404
    assert admin.post("/api/v1/invokers/a/undrain").json()["state"] == "active"  # a no-op
    bad = httpx.post(
        served.url + "/internal/v1/invokers/heartbeat",
        json={**a.status(), "draining": {"since": 1}},
        headers={"Authorization": "Bearer test-internal-token"},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "draining"
    wait_until(lambda: _doc(admin, "a")["state"] == "active", 1, "a to stay active")


def test_migrations_off_one_invoker_at_once_share_one_destination_instance(
    ctl: Controller, stubs: tuple[StubInvoker, StubInvoker], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain moves the generations of an instance at once: the second one's look for a
    warm instance came before the first placed its new instance on b, and its scale-out
    finds b taken (one instance per invoker); it must still join that instance, not be
    refused ("no invoker can take the generation")."""
    ctl.put_function(NS, "f", {"model": "m"}, overwrite=False)
    for stub in stubs:
        ctl.heartbeat(stub.status())
    fn = ctl.function_for(NS, "f")
    with ctl.db.session() as s:
        a = s.execute(select(Invoker.id).where(Invoker.name == "a")).scalar_one()
    first = ctl.dispatcher.migration_slot(fn, a, None)
    assert first is not None and (first.invoker, first.cold) == ("b", True)
    warm = ctl.dispatcher._warm
    looks: list[Any] = []

    def late(*args: Any) -> Any:  # the first look happened before `first` was placed
        looks.append(args)
        return None if len(looks) == 1 else warm(*args)

    monkeypatch.setattr(ctl.dispatcher, "_warm", late)
    second = ctl.dispatcher.migration_slot(fn, a, None)
    assert second is not None and second.instance_id == first.instance_id
    assert _rows(ctl, "b") == [(first.instance_id, "loading", 2)]
