"""Leases, reconciliation and prewarm, against a stand-in invoker the test steers.

A controller in this process (both databases) whose maintenance runs only when
the test calls `maintain()`, and a stub invoker on loopback that holds
invocations, fails loads and records unloads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import func, select, update

from sllm.cli import main
from sllm.controller import Controller
from sllm.controller._openapi import openapi_document
from sllm.core.errors import NotFound
from sllm.db import Activation, Database, Instance
from tests.support.controller import ControllerThread, client
from tests.support.stub_invoker import StubInvoker
from tests.support.waiting import wait_until

NS = "t"


def _until(what: str, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `predicate` (bounded) until it returns something truthy."""
    return wait_until(predicate, timeout, what, interval=0.02)


@pytest.fixture
def stub() -> Iterator[StubInvoker]:
    with StubInvoker().running() as s:
        yield s


@pytest.fixture
def served(db_url: str) -> Iterator[ControllerThread]:
    """One queue worker and one pool thread; maintenance only when the test calls it."""
    ctl = ControllerThread(
        db_url,
        queue_workers=1,
        threads=1,
        blocking_timeout=0.2,
        maintenance_interval=3600.0,
        lease_margin=0.5,
    ).start()
    try:
        ctl.controller.create_namespace(NS)
        yield ctl
    finally:
        ctl.stop()


@pytest.fixture
def ctl(served: ControllerThread) -> Controller:
    return served.controller


def _function(ctl: Controller, name: str = "f", **body: Any) -> None:
    ctl.put_function(NS, name, {"model": "m", **body}, overwrite=False)


def _submit(ctl: Controller, prompt: str, name: str = "f") -> str:
    fn = ctl.function_for(NS, name)
    return ctl.submit(ctl.new_run(NS, fn, {"prompt": prompt}, blocking=False))


def _activation(ctl: Controller, activation_id: str) -> dict[str, Any]:
    return ctl.get_activation(NS, activation_id)


def _expire_lease(ctl: Controller, activation_id: str) -> None:
    # As if the run had outlived its lease (it sat in a backlog, or its process hung).
    with ctl.db.connect(write=True) as conn:
        conn.execute(
            update(Activation).where(Activation.id == activation_id).values(lease_until=0.0)
        )


def _slots_in_use(ctl: Controller) -> int:
    with ctl.db.session() as s:
        return int(s.execute(select(func.coalesce(func.sum(Instance.in_flight), 0))).scalar_one())


def _prompts(stub: StubInvoker) -> list[str]:
    return [body.get("prompt") for body in stub.called("/v1/invoke")]


def test_a_final_state_is_written_once(ctl: Controller, stub: StubInvoker) -> None:
    _function(ctl)
    ctl.heartbeat(stub.status())
    stub.hold = True
    aid = _submit(ctl, "slow")
    stub.wait_for("the invocation to reach the invoker", lambda s: _prompts(s) == ["slow"])
    _expire_lease(ctl, aid)
    ctl.maintain()
    interrupted = _activation(ctl, aid)
    assert (interrupted["status"], interrupted["error"]["code"]) == (
        "platform_error",
        "interrupted",
    )
    stub.release.set()  # the run ends now, after maintenance gave up on it
    _until("the run to give its slot back", lambda: _slots_in_use(ctl) == 0)
    after = _activation(ctl, aid)
    assert (after["status"], after["error"], after["result"]) == (
        "platform_error",
        interrupted["error"],
        None,
    )


def test_an_expired_lease_that_never_reached_an_invoker_is_queued_again_and_run_once(
    ctl: Controller, stub: StubInvoker
) -> None:
    _function(ctl, limits={"timeout": 20})
    aid = _submit(ctl, "waits")  # no invoker yet: claimed, waiting for a slot
    _until("the activation to be claimed", lambda: _activation(ctl, aid)["status"] == "running")
    _expire_lease(ctl, aid)
    ctl.maintain()
    assert _activation(ctl, aid)["status"] == "queued"
    # The first run, still waiting, finds a slot now but no longer holds the lease: it does
    # not send; the activation runs once, claimed again.
    ctl.heartbeat(stub.status())
    done = _until(
        "the activation to end",
        lambda: (a := _activation(ctl, aid))["status"] not in ("queued", "running") and a,
    )
    assert done["status"] == "success", done
    _until("the slots to be given back", lambda: _slots_in_use(ctl) == 0)
    assert _prompts(stub) == ["waits"]


def test_a_run_rebased_to_a_longer_timeout_keeps_its_lease(
    ctl: Controller, stub: StubInvoker
) -> None:
    _function(ctl, limits={"timeout": 3})
    aid = _submit(ctl, "rebased")  # no invoker yet: claimed under the 3 s timeout
    _until("the activation to be claimed", lambda: _activation(ctl, aid)["status"] == "running")
    with ctl.db.session() as s:
        claimed_until = s.execute(
            select(Activation.lease_until).where(Activation.id == aid)
        ).scalar_one()
    ctl.put_function(NS, "f", {"limits": {"timeout": 30}}, overwrite=True)
    stub.hold = True
    ctl.heartbeat(stub.status())
    stub.wait_for("the invocation to reach the invoker", lambda s: _prompts(s) == ["rebased"])
    _until("the lease of the claim to pass", lambda: time.time() > claimed_until)
    ctl.maintain()  # the run goes on under its new timeout: its lease follows
    assert _activation(ctl, aid)["status"] == "running"
    stub.release.set()
    done = _until(
        "the activation to end",
        lambda: (a := _activation(ctl, aid))["status"] not in ("queued", "running") and a,
    )
    assert (done["status"], done["version"]) == ("success", 2), done


def test_queued_runs_start_while_blocking_runs_hold_the_pool(
    ctl: Controller, stub: StubInvoker
) -> None:
    _function(ctl, limits={"timeout": 20})
    ctl.heartbeat(stub.status())
    stub.hold = True
    fn = ctl.function_for(NS, "f")
    for i in range(2):  # past the blocking wait, they go on running on the pool
        _, finished = ctl.invoke(
            ctl.new_run(NS, fn, {"prompt": f"blocking {i}"}, blocking=True), fn
        )
        assert not finished
    aid = _submit(ctl, "queued")
    stub.wait_for("the queued run to reach the invoker", lambda s: "queued" in _prompts(s))
    activation = _activation(ctl, aid)
    assert activation["status"] == "running" and activation["start"] is not None


def test_instances_the_invoker_holds_without_a_row_are_unloaded(
    ctl: Controller, stub: StubInvoker
) -> None:
    _function(ctl)
    ctl.heartbeat(stub.status())
    aid = _submit(ctl, "places f")
    _until("f to be placed", lambda: _activation(ctl, aid)["status"] == "success")
    held = [
        {"function": f"{NS}/f", "model": "m", "active": 0},  # has a row: kept
        {"function": f"{NS}/lost", "model": "m", "active": 0},  # no row: unloaded
        {"function": f"{NS}/busy", "model": "m", "active": 1},  # no row, busy: later
        {"function": f"{NS}/coming", "loading": True},  # no row, loading: later
    ]
    ctl.heartbeat(stub.status(held))
    stub.wait_for("the unload", lambda s: len(s.called("/v1/unload")) >= 1)
    assert stub.called("/v1/unload") == [{"function": f"{NS}/lost"}]
    ctl.heartbeat(stub.status([held[0], {**held[2], "active": 0}]))  # busy no more
    stub.wait_for("the second unload", lambda s: len(s.called("/v1/unload")) >= 2)
    assert stub.called("/v1/unload")[1:] == [{"function": f"{NS}/busy"}]


def test_instances_are_named_by_id_in_invoke_bodies_and_reconciled_by_id(
    ctl: Controller, stub: StubInvoker
) -> None:
    _function(ctl)
    ctl.heartbeat(stub.status())
    aid = _submit(ctl, "places f")
    _until("f to be placed", lambda: _activation(ctl, aid)["status"] == "success")
    with ctl.db.session() as s:
        row_id = s.execute(select(Instance.id)).scalar_one()
    sent = stub.called("/v1/invoke")[0]
    assert (sent["instance"], sent["activation"]) == (str(row_id), aid)
    assert isinstance(sent["version"], int)
    held = [
        {"instance": str(row_id), "function": f"{NS}/f", "active": 0},  # its row: kept
        {"instance": "99999", "function": f"{NS}/f", "active": 0},  # same function, no row
    ]
    ctl.heartbeat(stub.status(held))
    stub.wait_for("the unload", lambda s: len(s.called("/v1/unload")) >= 1)
    assert stub.called("/v1/unload") == [{"instance": "99999", "function": f"{NS}/f"}]
    assert _instances(ctl) == 1


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,),
    "integer": (int,),
    "number": (int, float),
    "boolean": (bool,),
    "object": (dict,),
    "array": (list,),
    "null": (type(None),),
}


def _assert_described(doc: Any, schema: dict[str, Any], where: str = "") -> None:
    """`doc` has the schema's types, and every field of an object it describes is in it."""
    kinds = schema.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    ok = any(
        isinstance(doc, _JSON_TYPES[k]) and not (k in ("integer", "number") and doc is True)
        for k in kinds
    )
    assert not kinds or ok, f"{where or 'the document'}: {doc!r} is not {kinds}"
    if isinstance(doc, dict) and "properties" in schema:
        props = schema["properties"]
        assert set(doc) <= set(props), f"{where}: not in the schema: {set(doc) - set(props)}"
        assert set(schema.get("required", [])) <= set(doc), f"{where}: required fields missing"
        for key, value in doc.items():
            _assert_described(value, props[key], f"{where}.{key}")


def _tick(ctl: Controller, stub: StubInvoker) -> None:
    """A heartbeat of the stub (it stays in rotation) and a maintenance pass."""
    ctl.heartbeat(stub.status())
    ctl.maintain()


def test_a_failing_prewarm_backs_off_and_shows_why(
    served: ControllerThread, ctl: Controller, stub: StubInvoker, tmp_path: Path
) -> None:
    stub.load_error = {"code": "platform_error", "message": "model 'm' is corrupt"}
    ctl.heartbeat(stub.status())
    _function(ctl, scaling={"min_instances": 1})

    def failed(count: int) -> dict[str, Any] | None:
        err = ctl.get_function(NS, "f")["load_error"]
        return err if err is not None and err["failures"] == count else None

    _tick(ctl, stub)
    first = _until("the first failed load", lambda: failed(1))
    assert first["message"] == "model 'm' is corrupt"
    assert first["retry_at"] - first["at"] == pytest.approx(1.0)
    _tick(ctl, stub)  # within the backoff: no load
    assert time.time() < first["retry_at"], "the machine was too slow for this check"
    assert len(stub.called("/v1/load")) == 1
    # After the backoff, loads go on, each wait twice the one before.
    second = _until("the second failed load", lambda: (_tick(ctl, stub), failed(2))[1])
    assert second["retry_at"] - second["at"] == pytest.approx(2.0)

    key = served.controller.create_key(NS, {})["key"]
    shown = CliRunner().invoke(
        main,
        ["fn", "get", "f"],
        env={"SLLM_APIHOST": served.url, "SLLM_API_KEY": key, "SLLM_HOME": str(tmp_path)},
        catch_exceptions=False,
    )
    assert shown.exit_code == 0, shown.output
    assert "load error" in shown.output and "model 'm' is corrupt" in shown.output
    schema = openapi_document()["components"]["schemas"]["Function"]
    with client(served.url, key) as c:
        shown_failing = c.get(f"/api/v1/namespaces/{NS}/functions/f").json()
    assert shown_failing["load_error"]["failures"] >= 2, shown_failing
    _assert_described(shown_failing, schema)

    stub.load_error = None  # fixed: the next load succeeds and the error goes
    _until(
        "a successful load",
        lambda: (_tick(ctl, stub), ctl.get_function(NS, "f")["load_error"] is None)[1],
        timeout=15.0,
    )
    with client(served.url, key) as c:
        shown_warm = c.get(f"/api/v1/namespaces/{NS}/functions/f").json()
    assert shown_warm["load_error"] is None
    _assert_described(shown_warm, schema)


def _instances(ctl: Controller) -> int:
    with ctl.db.session() as s:
        return int(s.execute(select(func.count()).select_from(Instance)).scalar_one())


def test_a_blocking_run_never_waits_behind_prewarm_loads(
    ctl: Controller, stub: StubInvoker
) -> None:
    # The run pool has one thread (see `served`); loads that hang must not take it.
    for name in ("warm1", "warm2"):
        _function(ctl, name, scaling={"min_instances": 1})
    _function(ctl, limits={"timeout": 20})  # past the blocking wait: runs on the pool
    stub.hold_loads = True
    _tick(ctl, stub)
    stub.wait_for("the prewarm loads", lambda s: len(s.called("/v1/load")) == 2)
    fn = ctl.function_for(NS, "f")
    ctl.invoke(ctl.new_run(NS, fn, {"prompt": "blocking"}, blocking=True), fn)
    stub.wait_for("the blocking run to reach the invoker", lambda s: "blocking" in _prompts(s))


def test_a_closed_controller_answers_heartbeats_that_report_orphans(
    ctl: Controller, stub: StubInvoker
) -> None:
    ctl.heartbeat(stub.status())
    ctl.close()  # as a gunicorn worker does on its way out; requests may still come in
    lost = [{"function": f"{NS}/lost", "model": "m", "active": 0}]
    for _ in range(2):
        ctl.heartbeat(stub.status(lost))
    assert stub.called("/v1/unload") == []


@pytest.mark.parametrize(
    "code", ["overloaded", "invoker_lost", "unavailable"], ids=lambda code: code
)
def test_a_prewarm_put_off_by_a_busy_invoker_is_no_load_failure(
    ctl: Controller, stub: StubInvoker, code: str
) -> None:
    stub.load_error = {"code": code, "message": "busy for now"}
    _function(ctl, scaling={"min_instances": 1})
    _tick(ctl, stub)
    stub.wait_for("the first load", lambda s: len(s.called("/v1/load")) == 1)
    _until("its slot to be given back", lambda: _instances(ctl) == 0)
    _tick(ctl, stub)  # no backoff: the next pass loads again
    stub.wait_for("the second load", lambda s: len(s.called("/v1/load")) == 2)
    _until("its slot to be given back", lambda: _instances(ctl) == 0)
    assert ctl.get_function(NS, "f")["load_error"] is None


def test_a_prewarm_that_breaks_unexpectedly_gives_its_slot_back(
    ctl: Controller, stub: StubInvoker, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(ctl.invokers, "call", broken)
    _function(ctl, scaling={"min_instances": 1})
    _tick(ctl, stub)
    _until("its slot to be given back", lambda: _instances(ctl) == 0)


@pytest.mark.parametrize("blocking", [False, True], ids=["queued", "past-the-blocking-wait"])
def test_a_run_of_a_namespace_deleted_under_a_stale_worker_is_a_404(
    served: ControllerThread,
    ctl: Controller,
    monkeypatch: pytest.MonkeyPatch,
    blocking: bool,
) -> None:
    _function(ctl, limits={"timeout": 20})
    other = Controller(served.config, Database(served.config.database_url))  # another worker
    try:
        stale = other.function_for(NS, "f")  # cached there
        ctl.delete_namespace(NS)
        run = other.new_run(NS, stale, {"prompt": "hi"}, blocking=blocking)
        with pytest.raises(NotFound):
            if blocking:  # it outlives the blocking wait, and is stored as running then
                monkeypatch.setattr(other, "_drain", lambda run, fn: time.sleep(2))
                other.invoke(run, stale)
            else:
                other.submit(run)
    finally:
        other.close()
        other.db.dispose()
