"""Live migration through the controller: a real controller (gunicorn, SQLite and PostgreSQL)
and two invoker processes whose decode steps are slowed. An admin asks mid-stream
(POST .../activations/{id}/migrate); the destination prefills in rounds while the source
keeps streaming, then the switch: the client's stream goes on with no duplicate and no
gap, and the text is that of an unmigrated run (native NDJSON and the official `openai`
client). Bad requests are clean 4xx."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sllm.cli import main
from tests.integration.test_controller_resume import (
    GREEDY,
    INVOKERS,
    PROMPT,
    SEEDED,
    Cluster,
    clusters,
)
from tests.integration.test_controller_resume import _fn as define
from tests.integration.test_controller_resume import _reference as reference_of
from tests.support.waiting import wait_until

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.invoker, pytest.mark.slow]
# DB-agnostic paths run on one database (the suite's time); the rest runs on both.
SQLITE_ONLY = pytest.mark.parametrize("cluster", ["sqlite"], indirect=True)

TOKENS = 60
MOVE_AT = 8  # tokens relayed before the migration is asked for


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    yield from clusters(request, tmp_path_factory, "migrate")


@pytest.fixture
def c(cluster: Cluster) -> Cluster:
    cluster.ensure_running()
    return cluster


def _migrate(c: Cluster, activation_id: str, **body: Any) -> Any:
    return c.admin.post(f"/api/v1/namespaces/r/activations/{activation_id}/migrate", json=body)


def _stored(c: Cluster, activation_id: str) -> dict[str, Any]:
    found = wait_until(
        lambda: c.admin.get(f"/api/v1/namespaces/r/activations/{activation_id}").status_code == 200,
        30,
        f"activation {activation_id} stored",
    )
    assert found
    doc: dict[str, Any] = c.activation(activation_id)
    return doc


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_a_stream_migrates_live_with_the_same_output(c: Cluster, sampling: dict[str, Any]) -> None:
    fn = f"live-{'greedy' if sampling is GREEDY else 'seeded'}"
    define(c, fn)
    reference = reference_of(c, fn, sampling)
    events: list[dict[str, Any]] = []
    asked: dict[str, Any] = {}
    url = f"/api/v1/namespaces/_/functions/{fn}/invocations?stream=true"
    with c.api.stream("POST", url, json={"prompt": PROMPT, "max_tokens": TOKENS, **sampling}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            events.append(json.loads(line))
            tokens = [e for e in events if e["event"] == "token"]
            if len(tokens) == MOVE_AT and not asked:
                answer = _migrate(c, events[0]["activationId"])
                assert answer.status_code == 202, answer.text
                asked.update(answer.json())
    assert asked["from"] == events[0]["invoker"] and asked["status"] == "requested"
    assert events[-1]["event"] == "done", events[-3:]
    tokens = [e for e in events if e["event"] == "token"]
    assert [e["index"] for e in tokens] == list(range(1, TOKENS + 1))  # no duplicate, no gap
    assert "".join(e["text"] for e in tokens) == reference["result"]["text"]
    assert [e["event"] for e in events].count("start") == 1
    act = _stored(c, events[0]["activationId"])
    assert act["status"] == "success" and act["result"]["text"] == reference["result"]["text"]
    moves = act["moves"]
    assert len(moves) == 1, moves
    move = moves[0]
    other = next(n for n in INVOKERS if n != asked["from"])
    assert (move["kind"], move["from"], move["to"], move["reason"]) == (
        "migrate",
        asked["from"],
        other,
        "api",
    ), move
    assert move["outcome"] == "moved" and move["rounds"] >= 1
    assert MOVE_AT <= move["tokens"] < TOKENS
    # The final round recomputes a little, not the whole prompt and output again.
    assert move["tokens_recomputed"] >= move["tokens"]
    assert move["pause_ms"] is not None and move["pause_ms"] < 10_000
    assert act["invoker"] == other and act["migrations"] == 1


@SQLITE_ONLY
def test_the_openai_client_sees_one_stream_through_a_migration(c: Cluster) -> None:
    define(c, "chat-move")
    oai = openai.OpenAI(base_url=c.ctl.url + "/v1", api_key=c.key, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": PROMPT}]
    whole = oai.chat.completions.create(
        model="chat-move", messages=messages, max_tokens=TOKENS, temperature=0
    )
    expected = whole.choices[0].message.content
    stream = oai.chat.completions.create(
        model="chat-move", messages=messages, max_tokens=TOKENS, temperature=0, stream=True
    )
    parts: list[str] = []
    asked = False
    activation = ""
    for chunk in stream:
        activation = activation or chunk.id
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
        if len(parts) >= MOVE_AT and not asked:
            source = c.serving("chat-move", MOVE_AT)
            running = [
                g["id"]
                for g in c.invs[source].client(5).get("/v1/generations").json()["generations"]
                if g["function"] == "r/chat-move" and g["state"] == "running"
            ]
            assert len(running) == 1
            target = next(n for n in INVOKERS if n != source)
            answer = _migrate(c, running[0], to=target)
            assert answer.status_code == 202, answer.text
            assert answer.json()["to"] == target
            asked = True
    assert asked
    assert "".join(parts) == expected


@SQLITE_ONLY
def test_bad_migration_requests_are_clean_4xx(c: Cluster) -> None:
    define(c, "bad-move")
    missing = _migrate(c, "0" * 32)
    assert missing.status_code == 404, missing.text
    assert _migrate(c, "nosuchactivation").status_code == 400  # not an activation id
    ended = c.api.post(
        "/api/v1/namespaces/_/functions/bad-move/invocations?blocking=true",
        json={"prompt": PROMPT, "max_tokens": 3},
    ).json()["activationId"]
    r = _migrate(c, ended)
    assert r.status_code == 409 and "ended" in r.json()["error"]["message"]
    r = c.admin.post(f"/api/v1/namespaces/r/activations/{ended}/migrate", json={"to": 5})
    assert r.status_code == 400 and r.json()["error"]["param"] == "to"
    r = c.admin.post(f"/api/v1/namespaces/r/activations/{ended}/migrate", json={"where": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "where"
    # A user key is not enough: migrations are an operator's tool.
    assert (
        c.api.post(f"/api/v1/namespaces/_/activations/{ended}/migrate", json={}).status_code == 403
    )

    # While one runs: an unknown destination is a 404, its own invoker a 409.
    url = "/api/v1/namespaces/_/functions/bad-move/invocations?stream=true"
    with c.api.stream("POST", url, json={"prompt": PROMPT, "max_tokens": TOKENS}) as r:
        start: dict[str, Any] = {}
        for line in r.iter_lines():
            if not line:
                continue
            ev = json.loads(line)
            if ev["event"] == "start":
                start = ev
            if ev["event"] == "token" and ev["index"] == 3:
                activation_id, source = start["activationId"], start["invoker"]
                unknown = _migrate(c, activation_id, to="nobody")
                assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "to"
                itself = _migrate(c, activation_id, to=source)
                assert itself.status_code == 409, itself.text
                break


@SQLITE_ONLY
def test_the_cli_migrates_and_waits(c: Cluster, tmp_path: Any, monkeypatch: Any) -> None:
    from click.testing import CliRunner

    define(c, "cli-move")
    url = "/api/v1/namespaces/_/functions/cli-move/invocations"
    activation_id = c.api.post(url, json={"prompt": PROMPT, "max_tokens": TOKENS}).json()[
        "activationId"
    ]
    source = c.serving("cli-move", 3)
    monkeypatch.setenv("SLLM_HOME", str(tmp_path))
    admin_key = c.admin.headers["Authorization"].split(" ", 1)[1]
    env = {"SLLM_APIHOST": c.ctl.url, "SLLM_API_KEY": admin_key}
    started = time.monotonic()
    result = CliRunner().invoke(
        main, ["--namespace", "r", "activation", "migrate", activation_id, "--wait"], env=env
    )
    assert result.exit_code == 0, result.output
    assert f"migrate of choice 0 {source} -> " in result.output
    assert "round(s)" in result.output
    assert time.monotonic() - started < 60


def test_a_client_that_leaves_mid_migration_leaves_nothing_running(c: Cluster) -> None:
    """The client goes away right after asking: whether the migration aborts (its source
    was cancelled) or completes, no copy of the generation stays held or running."""
    define(c, "leave-move")
    url = "/api/v1/namespaces/_/functions/leave-move/invocations?stream=true"
    activation_id = ""
    with c.api.stream("POST", url, json={"prompt": PROMPT, "max_tokens": TOKENS}) as r:
        for line in r.iter_lines():
            if not line:
                continue
            ev = json.loads(line)
            activation_id = activation_id or ev.get("activationId", "")
            if ev["event"] == "token" and ev["index"] == MOVE_AT:
                assert _migrate(c, activation_id).status_code == 202
                break  # the client goes away
    assert activation_id

    def nothing_left() -> bool:
        for proc in c.invs.values():
            listed = proc.client(5).get("/v1/generations").json()["generations"]
            if any(
                g["id"] == activation_id and g["state"] in ("running", "held", "queued")
                for g in listed
            ):
                return False
        return True

    assert wait_until(nothing_left, 30, f"no copy of {activation_id} left running")
    act = _stored(c, activation_id)
    assert act["status"] == "success" and act["result"]["finish_reason"] == "cancelled"
