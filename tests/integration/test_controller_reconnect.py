"""Streams that outlive a connection (controller/_attach.py, _reconnect.py): a real
controller (SQLite and PostgreSQL), a second replica on the same database, and two slowed
invoker processes. A client that drops its stream mid-way reconnects with Last-Event-ID,
to the same replica or to the other one, and gets exactly the tokens it lacks; so does
one whose replica was killed with SIGKILL, also in the middle of a live migration."""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from sllm.cli import main
from tests.integration.test_controller_resume import (
    GREEDY,
    PROMPT,
    Cluster,
    _fn,
    _reference,
    clusters,
)
from tests.support.controller import ControllerProcess, client
from tests.support.process import stop_all
from tests.support.waiting import wait_until

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.invoker, pytest.mark.slow]
# DB-agnostic paths run on one database (the suite's time); the rest runs on both.
SQLITE_ONLY = pytest.mark.parametrize("cluster", ["sqlite"], indirect=True)
TOKENS = 60
LEAVE_AT = 10


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    # Slowed prefill passes: a migration's rounds take a while, so its hold can be seen.
    env = {"SLLM_TEST_PREFILL_DELAY": "0.3"}
    yield from clusters(request, tmp_path_factory, "reconnect", invoker_env=env)


@pytest.fixture
def c(cluster: Cluster) -> Cluster:
    cluster.ensure_running()
    return cluster


def _replica(c: Cluster) -> ControllerProcess:
    """A second controller process on the cluster's database."""
    other = ControllerProcess(c.ctl.env["SLLM_DATABASE_URL"], c.root, workers=1)
    other.start()
    return other


def _read(lines: Iterator[str], events: list[dict[str, Any]], upto: int | None) -> None:
    for line in lines:
        if not line:
            continue
        events.append(json.loads(line))
        if upto is not None and sum(e["event"] == "token" for e in events) >= upto:
            return


def _first_part(c: Cluster, fn: str) -> list[dict[str, Any]]:
    """Stream `fn` and leave after LEAVE_AT tokens (the connection closes)."""
    events: list[dict[str, Any]] = []
    url = f"/api/v1/namespaces/_/functions/{fn}/invocations?stream=true"
    with c.api.stream("POST", url, json={"prompt": PROMPT, "max_tokens": TOKENS, **GREEDY}) as r:
        assert r.status_code == 200, r.read()
        _read(r.iter_lines(), events, LEAVE_AT)
    return events


def _rest(api: httpx.Client, path: str, headers: dict[str, str]) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    with api.stream("GET", path, headers=headers) as r:
        assert r.status_code == 200, r.read()
        _read(r.iter_lines(), events, None)
    return events


def _check_joined(
    first: list[dict[str, Any]], rest: list[dict[str, Any]], reference: dict[str, Any]
) -> None:
    tokens = [e for e in first + rest if e["event"] == "token"]
    assert [e["index"] for e in tokens] == list(range(1, TOKENS + 1))  # no duplicate, no gap
    assert "".join(e["text"] for e in tokens) == reference["result"]["text"]
    assert rest[0]["event"] == "start" and rest[0]["reattached"] is True
    assert rest[-1]["event"] == "done", rest[-3:]
    assert all(e["id"].startswith(first[0]["activationId"] + ":") for e in first + rest)


def _stored_whole(c: Cluster, activation: str, reference: dict[str, Any]) -> dict[str, Any]:
    """The activation once the reconnect stored it (just after its last event was sent)."""

    def whole() -> dict[str, Any] | None:
        act = c.activation(activation)
        done = act.get("result") and act["result"]["text"] == reference["result"]["text"]
        return act if done and act["status"] == "success" else None

    act = wait_until(whole, 10, "the whole generation stored")
    assert act is not None
    return act


@pytest.mark.parametrize("where", ["same", "other"])
def test_a_client_that_drops_its_stream_reconnects_with_last_event_id(
    c: Cluster, where: str
) -> None:
    fn = f"drop-{where}"
    _fn(c, fn)
    reference = _reference(c, fn, GREEDY)
    first = _first_part(c, fn)
    activation = first[0]["activationId"]
    assert first[-1]["id"] == f"{activation}:{LEAVE_AT}"
    other = _replica(c) if where == "other" else None
    try:
        api = client(other.url, c.key, 120) if other else c.api
        path = f"/api/v1/namespaces/_/activations/{activation}/stream"
        rest = _rest(api, path, {"Last-Event-ID": first[-1]["id"]})
    finally:
        if other:
            stop_all([other])
    _check_joined(first, rest, reference)
    act = _stored_whole(c, activation, reference)
    assert any("reconnected from token 10" in line for line in act["logs"]), act["logs"]


@SQLITE_ONLY
def test_from_query_and_native_invoke_with_last_event_id(c: Cluster) -> None:
    fn = "drop-from"
    _fn(c, fn)
    reference = _reference(c, fn, GREEDY)
    first = _first_part(c, fn)
    activation = first[0]["activationId"]
    rest = _rest(c.api, f"/api/v1/namespaces/_/activations/{activation}/stream?from=4", {})
    tokens = [e for e in rest if e["event"] == "token"]
    assert tokens[0]["index"] == 5 and tokens[-1]["index"] == TOKENS
    text = "".join(e["text"] for e in first if e["event"] == "token" and e["index"] <= 4)
    assert text + "".join(e["text"] for e in tokens) == reference["result"]["text"]
    # Read again from the finished generation, through the invoke endpoint's reconnect.
    url = f"/api/v1/namespaces/_/functions/{fn}/invocations?stream=true"
    with c.api.stream(
        "POST", url, json={}, headers={"Last-Event-ID": f"{activation}:{TOKENS - 2}"}
    ) as r:
        assert r.status_code == 200, r.read()
        again: list[dict[str, Any]] = []
        _read(r.iter_lines(), again, None)
    assert [e["index"] for e in again if e["event"] == "token"] == [TOKENS - 1, TOKENS]


@SQLITE_ONLY
def test_the_openai_client_reconnects_with_last_event_id(c: Cluster) -> None:
    fn = "drop-openai"
    _fn(c, fn)
    messages = [{"role": "user", "content": PROMPT}]
    body = {"model": fn, "messages": messages, "max_tokens": TOKENS, "temperature": 0}
    whole = c.api.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
    seen, last_id = "", ""
    with c.api.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        chunks = 0
        for line in r.iter_lines():
            if line.startswith("id: "):
                last_id = line[4:]
            elif line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                seen += delta.get("content") or ""
                chunks += 1
                if chunks > LEAVE_AT:
                    break
    # Chunks count text; ids count tokens (a token may add no text yet).
    assert int(last_id.split(":")[1]) >= LEAVE_AT, last_id
    oai = openai.OpenAI(base_url=f"{c.ctl.url}/v1", api_key=c.key, max_retries=0)
    stream = oai.chat.completions.create(
        model=fn,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=TOKENS,
        temperature=0,
        stream=True,
        extra_headers={"Last-Event-ID": last_id},
    )
    rest = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert seen + rest == whole["content"]


@pytest.mark.parametrize("when", ["streaming", "migrating"])
def test_a_client_whose_replica_is_killed_gets_the_rest_from_another(c: Cluster, when: str) -> None:
    fn = f"kill-ctl-{when}"
    _fn(c, fn)
    reference = _reference(c, fn, GREEDY)
    other = _replica(c)
    (c.root / "v").mkdir(exist_ok=True)
    victim = ControllerProcess(c.ctl.env["SLLM_DATABASE_URL"], c.root / "v", workers=1)
    try:
        victim.start()
        first: list[dict[str, Any]] = []
        held: str | None = None
        url = f"/api/v1/namespaces/_/functions/{fn}/invocations?stream=true"
        api = client(victim.url, c.key, 120)
        body = {"prompt": PROMPT, "max_tokens": TOKENS, **GREEDY}
        with api.stream("POST", url, json=body) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            _read(lines, first, LEAVE_AT)
            activation = first[0]["activationId"]
            if when == "migrating":
                moved = c.admin.post(f"/api/v1/namespaces/r/activations/{activation}/migrate")
                assert moved.status_code == 202, moved.text
                held = wait_until(lambda: _held_on(c, activation), 20, "the hold on D")
            victim.stop(signal.SIGKILL)  # mid-migration: S decodes, D holds a copy
            with contextlib.suppress(httpx.HTTPError):  # the connection broke with it
                _read(lines, first, None)
        last = [e for e in first if "id" in e][-1]["id"]
        rest = _rest(
            client(other.url, c.key, 120),
            f"/api/v1/namespaces/_/activations/{activation}/stream",
            {"Last-Event-ID": last},
        )
    finally:
        stop_all([other, victim])
    tokens = [e for e in first + rest if e["event"] == "token"]
    assert [e["index"] for e in tokens] == list(range(1, TOKENS + 1))
    assert "".join(e["text"] for e in tokens) == reference["result"]["text"]
    assert rest[-1]["event"] == "done"
    _stored_whole(c, activation, reference)
    # The generation ran on in exactly one place: nothing of it is left running or held.
    for proc in c.invs.values():
        listed = proc.client(5).get("/v1/generations").json()["generations"]
        assert not [
            g for g in listed if g["id"] == activation and g["state"] in ("running", "held")
        ]
    if when == "migrating":  # the held copy its dead controller left was cancelled
        assert held is not None
        proc = c.invs[held]
        mine = [g for g in proc.client(5).get("/v1/generations").json()["generations"]]
        assert [g["state"] for g in mine if g["id"] == activation] == ["cancelled"], mine


def _held_on(c: Cluster, activation: str) -> str | None:
    """The invoker that holds a migration target of `activation`, if any."""
    for name, proc in c.invs.items():
        listed = proc.client(5).get("/v1/generations").json()["generations"]
        if any(g["id"] == activation and g["state"] == "held" for g in listed):
            return name
    return None


@SQLITE_ONLY
def test_reconnects_with_bad_ids_are_4xx(c: Cluster) -> None:
    path = "/api/v1/namespaces/_/activations"
    missing = "0" * 32
    r = c.api.get(f"{path}/{missing}/stream")
    assert r.status_code == 404 and "no generation" in r.json()["error"]["message"], r.text
    r = c.api.get(f"{path}/{missing}/stream", headers={"Last-Event-ID": "junk"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "Last-Event-ID", r.text
    r = c.api.get(f"{path}/{missing}/stream?from=x1")
    assert r.status_code == 400 and r.json()["error"]["param"] == "from", r.text
    r = c.api.get(f"{path}/nothex/stream")
    assert r.status_code == 400, r.text
    r = c.api.get(f"{path}/{missing}/stream", headers={"Last-Event-ID": f"{'1' * 32}:3"})
    assert r.status_code == 400 and "names activation" in r.json()["error"]["message"], r.text


@SQLITE_ONLY
def test_the_cli_reconnects_to_a_stream(
    c: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = "drop-cli"
    _fn(c, fn)
    reference = _reference(c, fn, GREEDY)
    first = _first_part(c, fn)
    had = "".join(e["text"] for e in first if e["event"] == "token")
    monkeypatch.setenv("SLLM_HOME", str(tmp_path))
    env = {"SLLM_APIHOST": c.ctl.url, "SLLM_API_KEY": c.key}
    args = ["activation", "stream", first[0]["activationId"], "--from", str(LEAVE_AT)]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output + result.stderr
    assert had + result.stdout.rstrip("\n") == reference["result"]["text"]
    assert "ok: activation" in result.stderr, result.stderr
    bad = CliRunner().invoke(
        main, ["activation", "stream", first[0]["activationId"], "--from", "x"], env=env
    )
    assert bad.exit_code != 0 and "'from'" in bad.stderr, bad.stderr


@SQLITE_ONLY
def test_cancel_stops_a_generation_its_client_left_at_once(
    c: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fn = "drop-cancel"
    _fn(c, fn)
    first = _first_part(c, fn)
    activation = first[0]["activationId"]
    assert _running_on(c, activation)  # it runs on without its client
    path = f"/api/v1/namespaces/_/activations/{activation}"
    r = c.api.post(f"{path}/cancel")
    assert r.status_code == 200, r.text
    assert [x["generation"] for x in r.json()["cancelled"]] == [activation]
    assert not _running_on(c, activation)
    again = c.api.post(f"{path}/cancel")
    assert again.status_code == 409 and "has ended (cancelled)" in again.text, again.text
    r = c.api.get(f"{path}/stream", headers={"Last-Event-ID": first[-1]["id"]})
    assert r.status_code == 409 and "does not run any more" in r.text, r.text
    assert c.api.post(f"/api/v1/namespaces/_/activations/{'0' * 32}/cancel").status_code == 404
    assert c.api.post("/api/v1/namespaces/_/activations/nothex/cancel").status_code == 400
    # The CLI: a second generation, cancelled by `sllm activation cancel`.
    second = _first_part(c, fn)[0]["activationId"]
    monkeypatch.setenv("SLLM_HOME", str(tmp_path))
    env = {"SLLM_APIHOST": c.ctl.url, "SLLM_API_KEY": c.key}
    result = CliRunner().invoke(main, ["activation", "cancel", second], env=env)
    assert result.exit_code == 0 and f"cancelled activation {second}" in result.stdout, (
        result.output + result.stderr
    )
    assert not _running_on(c, second)


def _running_on(c: Cluster, activation: str) -> list[str]:
    """The invokers on which a generation of `activation` runs now."""
    return [
        name
        for name, proc in c.invs.items()
        for g in proc.client(5).get("/v1/generations").json()["generations"]
        if g["id"] == activation and g["state"] == "running"
    ]
