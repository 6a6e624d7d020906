"""Live migrations through the controller beyond one plain choice: a real controller (gunicorn,
SQLite and PostgreSQL) and two invoker processes whose decode steps and prefill passes are
slowed, so every migration spends a while in its rounds (the destination holds the copy).

- n = 2: every choice moves to one destination, each identical to the unmigrated run;
- a drain migrates what runs on the drained invoker: several streams of one instance move
  together and complete on the other invoker, identical, and the drain ends "drained";
- kill -9 of the source between the hold and the switch: the stream completes, identical,
  no duplicate and no gap (it resumes from what was relayed);
- kill -9 of the destination mid-migration: the migration is aborted, the stream goes on
  on its source, identical, and the activation's move says "aborted";
- a json_schema generation migrated mid-way ends as valid JSON, identical.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from tests.integration.test_controller_resume import (
    GREEDY,
    INVOKERS,
    PROMPT,
    SEEDED,
    Cluster,
    clusters,
)
from tests.integration.test_controller_resume import _fn as define
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.invoker, pytest.mark.slow]
# DB-agnostic paths run on one database (the suite's time); the rest runs on both.
SQLITE_ONLY = pytest.mark.parametrize("cluster", ["sqlite"], indirect=True)

TOKENS = 240  # about 7 s of decoding at 30 ms a step: a migration (~2 s) ends mid-way
MOVE_AT = 8  # tokens (of each choice) relayed before the migration is asked for
PREFILL_S = 0.3  # each prefill pass sleeps this long: a round takes a while, the hold is seen
UNMIGRATED = {"ignore_eos": True}  # every run is TOKENS long, migrated or not


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    env = {"SLLM_TEST_PREFILL_DELAY": str(PREFILL_S)}
    yield from clusters(request, tmp_path_factory, "moves", invoker_env=env)


@pytest.fixture
def c(cluster: Cluster) -> Cluster:
    cluster.ensure_running()
    return cluster


def _body(**extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_tokens": TOKENS, **UNMIGRATED, **extra}


def _reference(c: Cluster, fn: str, body: dict[str, Any]) -> dict[str, Any]:
    """The result of an unmigrated run (a blocking invocation)."""
    r = c.api.post(f"/api/v1/namespaces/_/functions/{fn}/invocations?blocking=true", json=body)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    assert doc["status"] == "success", doc
    result: dict[str, Any] = doc["result"]
    return result


def _stream(
    c: Cluster, fn: str, body: dict[str, Any], on_event: Callable[[list[dict[str, Any]]], None]
) -> list[dict[str, Any]]:
    """The native NDJSON events of a streaming invocation; `on_event` sees them as they come."""
    events: list[dict[str, Any]] = []
    url = f"/api/v1/namespaces/_/functions/{fn}/invocations?stream=true"
    with c.api.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                events.append(json.loads(line))
                on_event(events)
    return events


def _tokens(events: list[dict[str, Any]], choice: int = 0) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] == "token" and e.get("choice", 0) == choice]


def _check_whole(events: list[dict[str, Any]], texts: list[str]) -> None:
    """One start, one done, every choice's tokens 1..TOKENS (no duplicate, no gap), and
    each choice's text that of the unmigrated run."""
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("done") == 1, kinds[-4:]
    assert events[-1]["event"] == "done", events[-3:]
    for i, text in enumerate(texts):
        mine = _tokens(events, i)
        assert [e["index"] for e in mine] == list(range(1, TOKENS + 1)), i
        assert "".join(e["text"] for e in mine) == text, i
    assert events[-1]["usage"]["completion_tokens"] == len(texts) * TOKENS


def _migrate(c: Cluster, activation_id: str, **body: Any) -> dict[str, Any]:
    r = c.admin.post(f"/api/v1/namespaces/r/activations/{activation_id}/migrate", json=body)
    assert r.status_code == 202, r.text
    doc: dict[str, Any] = r.json()
    return doc


def _stored(c: Cluster, activation_id: str) -> dict[str, Any]:
    found = wait_until(
        lambda: c.admin.get(f"/api/v1/namespaces/r/activations/{activation_id}").status_code == 200,
        30,
        f"activation {activation_id} stored",
    )
    assert found
    doc: dict[str, Any] = c.activation(activation_id)
    return doc


def _held(c: Cluster, name: str, activation_id: str) -> bool:
    """Whether invoker `name` holds a copy of the activation's generation (a migration
    between its hold and its switch)."""
    listed = c.invs[name].client(5).get("/v1/generations").json()["generations"]
    return any(g["id"].startswith(activation_id) and g["state"] == "held" for g in listed)


def _other(name: str) -> str:
    return next(n for n in INVOKERS if n != name)


@SQLITE_ONLY
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_every_choice_of_n_migrates_to_one_destination(
    c: Cluster, sampling: dict[str, Any]
) -> None:
    fn = f"two-{'greedy' if sampling is GREEDY else 'seeded'}"
    define(c, fn)
    body = _body(**sampling, n=2)
    reference = _reference(c, fn, body)
    asked: dict[str, Any] = {}

    def ask(events: list[dict[str, Any]]) -> None:
        if not asked and min(len(_tokens(events, i)) for i in (0, 1)) >= MOVE_AT:
            asked.update(_migrate(c, events[0]["activationId"]))

    events = _stream(c, fn, body, ask)
    assert asked["from"] == events[0]["invoker"], asked
    _check_whole(events, [ch["text"] for ch in reference["choices"]])
    act = _stored(c, events[0]["activationId"])
    assert act["status"] == "success"
    assert [ch["text"] for ch in act["result"]["choices"]] == [
        ch["text"] for ch in reference["choices"]
    ]
    dest = _other(asked["from"])
    moves = sorted(act["moves"], key=lambda m: m["choice"])
    assert [(m["choice"], m["kind"], m["outcome"]) for m in moves] == [
        (0, "migrate", "moved"),
        (1, "migrate", "moved"),
    ], moves
    assert all((m["from"], m["to"], m["reason"]) == (asked["from"], dest, "api") for m in moves)
    assert all(MOVE_AT <= m["tokens"] < TOKENS and m["rounds"] >= 1 for m in moves), moves
    assert act["invoker"] == dest and act["migrations"] == 2


def test_a_drain_migrates_the_streams_of_its_invoker_together(c: Cluster) -> None:
    """Three streams of one instance run on the drained invoker: each completes on the
    other one, identical to its unmigrated run, and the drain ends drained, not forced."""
    define(c, "drained")
    bodies = [_body(**{**SEEDED, "seed": seed}) for seed in (11, 22, 33)]
    with ThreadPoolExecutor(3) as pool:
        references = list(pool.map(lambda b: _reference(c, "drained", b), bodies))
    assert len({r["text"] for r in references}) == 3
    source = ""
    drain: dict[str, Any] = {}
    started: dict[int, int] = {}

    def on_event(i: int) -> Callable[[list[dict[str, Any]]], None]:
        def ask(events: list[dict[str, Any]]) -> None:
            nonlocal source
            started[i] = len(_tokens(events))
            if drain or len(started) < 3 or min(started.values()) < MOVE_AT:
                return
            source = events[0]["invoker"]
            r = c.admin.post(f"/api/v1/invokers/{source}/drain", json={})
            assert r.status_code == 202, r.text
            drain.update(r.json())

        return ask

    try:
        with ThreadPoolExecutor(3) as pool:
            runs = list(pool.map(lambda i: _stream(c, "drained", bodies[i], on_event(i)), range(3)))
        assert drain, "the drain was never asked"
        assert {run[0]["invoker"] for run in runs} == {source}  # one instance, one invoker
        dest = _other(source)
        for run, reference in zip(runs, references, strict=True):
            _check_whole(run, [reference["text"]])
            act = _stored(c, run[0]["activationId"])
            assert act["status"] == "success" and act["result"]["text"] == reference["text"]
            assert [
                (m["kind"], m["from"], m["to"], m["reason"], m["outcome"]) for m in act["moves"]
            ] == [("migrate", source, dest, "drain", "moved")], act["moves"]
            assert act["invoker"] == dest

        def drained() -> dict[str, Any] | None:
            doc: dict[str, Any] = c.admin.get(f"/api/v1/invokers/{source}").json()
            return doc if doc["state"] == "drained" else None

        # They moved together: one instance on D took the three (their rounds batched).
        status = c.invs[dest].client(5).get("/v1/status").json()
        mine = [i for i in status["instances"] if i["function"] == "r/drained"]
        assert len(mine) == 1, status["instances"]
        done = wait_until(drained, 30, f"{source} drained")
        assert done is not None and done["drain"]["forced"] is False, done
        assert done["instances"] == 0
    finally:
        if source:
            c.admin.post(f"/api/v1/invokers/{source}/undrain")


def test_kill_9_of_the_source_mid_migration_loses_nothing(c: Cluster) -> None:
    define(c, "kill-source")
    body = _body(**GREEDY)
    reference = _reference(c, "kill-source", body)
    killed: dict[str, Any] = {}

    def kill_once_held(events: list[dict[str, Any]]) -> None:
        if killed or len(_tokens(events)) < MOVE_AT:
            return
        activation_id, source = events[0]["activationId"], events[0]["invoker"]
        _migrate(c, activation_id)
        held = wait_until(lambda: _held(c, _other(source), activation_id), 20, "the hold on D")
        assert held, "the destination never held the generation"
        killed.update(name=source, at_token=len(_tokens(events)))
        c.kill(source)

    started = time.monotonic()
    events = _stream(c, "kill-source", body, kill_once_held)
    assert time.monotonic() - started < 90
    assert killed
    _check_whole(events, [reference["text"]])
    act = _stored(c, events[0]["activationId"])
    assert act["status"] == "success" and act["result"]["text"] == reference["text"]
    survivor = _other(killed["name"])
    assert act["invoker"] == survivor
    # Killed between its hold and its switch: the migration aborted (its source is gone),
    # and the generation resumed on D from what was relayed.
    moves = [(m["kind"], m["from"], m["to"], m.get("outcome", "moved")) for m in act["moves"]]
    assert moves == [
        ("migrate", killed["name"], survivor, "aborted"),
        ("resume", killed["name"], survivor, "moved"),
    ], act["moves"]
    assert act["moves"][1]["tokens"] >= killed["at_token"]


def test_kill_9_of_the_destination_mid_migration_aborts_it(c: Cluster) -> None:
    define(c, "kill-dest")
    body = _body(**GREEDY)
    reference = _reference(c, "kill-dest", body)
    killed: dict[str, Any] = {}

    def kill_once_held(events: list[dict[str, Any]]) -> None:
        if killed or len(_tokens(events)) < MOVE_AT:
            return
        activation_id, dest = events[0]["activationId"], _other(events[0]["invoker"])
        _migrate(c, activation_id)
        held = wait_until(lambda: _held(c, dest, activation_id), 20, "the hold on D")
        assert held, "the destination never held the generation"
        killed.update(name=dest)
        c.kill(dest)

    events = _stream(c, "kill-dest", body, kill_once_held)
    assert killed
    _check_whole(events, [reference["text"]])
    act = _stored(c, events[0]["activationId"])
    source = events[0]["invoker"]
    assert act["status"] == "success" and act["result"]["text"] == reference["text"]
    assert act["invoker"] == source and act["migrations"] == 0
    assert [(m["kind"], m["from"], m["to"], m["outcome"]) for m in act["moves"]] == [
        ("migrate", source, killed["name"], "aborted")
    ], act["moves"]
    assert act["moves"][0]["error"], act["moves"]


SCHEMA = {
    "type": "object",
    "properties": {
        "mood": {"enum": ["happy", "sad", "calm"]},
        # A long list of fixed length: the JSON is long enough for a migration mid-way.
        "words": {
            "type": "array",
            "items": {"enum": ["alpha", "beta", "gamma", "delta"]},
            "minItems": 60,
            "maxItems": 60,
        },
    },
    "required": ["mood", "words"],
    "additionalProperties": False,
}


@SQLITE_ONLY
def test_a_json_schema_generation_migrated_mid_way_stays_valid_json(c: Cluster) -> None:
    define(c, "schema-move")
    fmt = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}
    body = {"prompt": PROMPT, "max_tokens": 2000, "temperature": 1.0, "seed": 7}
    body["response_format"] = fmt
    reference = _reference(c, "schema-move", body)
    assert reference["finish_reason"] == "stop", reference  # the grammar ended it
    n = reference["usage"]["completion_tokens"]
    assert n > 4 * MOVE_AT, n
    asked: dict[str, Any] = {}

    def ask(events: list[dict[str, Any]]) -> None:
        if not asked and len(_tokens(events)) >= MOVE_AT:
            asked.update(_migrate(c, events[0]["activationId"]))

    events = _stream(c, "schema-move", body, ask)
    tokens = _tokens(events)
    assert [e["index"] for e in tokens] == list(range(1, n + 1))
    text = "".join(e["text"] for e in tokens)
    assert text == reference["text"]
    value = json.loads(text)
    assert value["mood"] in ("happy", "sad", "calm") and len(value["words"]) == 60
    act = _stored(c, events[0]["activationId"])
    assert [(m["kind"], m["outcome"]) for m in act["moves"]] == [("migrate", "moved")], act
    assert MOVE_AT <= act["moves"][0]["tokens"] < n
