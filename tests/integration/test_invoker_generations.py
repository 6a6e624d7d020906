"""Generations as addressable state on real invoker processes: list, read, pause, resume
elsewhere, cancel; indexed events and n choices; instances by id; hostile states."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sllm.store import open_store, push_model
from sllm.tiny_models import build_tiny_model
from tests.support.invoker import InvokerProcess
from tests.support.migration import streaming, tokens_of

pytestmark = [pytest.mark.invoker]

SLOW_STEP_S = 0.05  # invoker "slow" sleeps this long before each decode step
HOOK = Path(__file__).resolve().parents[1] / "support" / "slow_steps"
PROMPT = "hello there, how are you"
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, InvokerProcess]]:
    """Two invokers on one folder store: "slow" (decode steps slowed down) and "fast"."""
    root = tmp_path_factory.mktemp("generations")
    uri = (root / "store").as_uri()
    push_model(str(build_tiny_model("llama", root / "hf", seed=0)), "llama", open_store(uri))
    path = os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH", "")) if p)
    slow = InvokerProcess(
        root / "slow", uri, env={"PYTHONPATH": path, "SLLM_TEST_STEP_DELAY": str(SLOW_STEP_S)}
    )
    fast = InvokerProcess(root / "fast", uri)
    procs = [slow, fast]
    try:
        for p in procs:
            p.start()
        yield {"slow": slow, "fast": fast}
    finally:
        for p in procs:
            p.stop()


def body(**extra: Any) -> dict[str, Any]:
    return {
        "function": "t/gen",
        "model": "llama",
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        **extra,
    }


def read_until_tokens(events: Iterator[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    for ev in events:
        seen.append(ev)
        if len(tokens_of(seen)) >= k:
            return seen
    raise AssertionError(f"the stream ended before {k} tokens: {seen}")


def test_events_carry_choice_and_index(pair: dict[str, InvokerProcess]) -> None:
    fast = pair["fast"]
    gen_id = uuid.uuid4().hex
    with streaming(fast, "/v1/invoke", body(activation=gen_id)) as events:
        evs = list(events)
    start, done = evs[0], evs[-1]
    assert start["event"] == "start" and start["generation"] == gen_id
    assert start["instance"] == "t/gen" and start["n"] == 1
    tokens = [e for e in evs if e["event"] == "token" and e["token"] is not None]
    assert [e["index"] for e in tokens] == list(range(1, len(tokens) + 1))
    assert all(e["choice"] == 0 for e in evs if e["event"] == "token")
    finish = [e for e in evs if e["event"] == "finish"]
    assert finish == [
        {
            "event": "finish",
            "choice": 0,
            "finish_reason": done["finish_reason"],
            "stop_reason": None,
        }
    ]
    assert done["event"] == "done" and done["choices"][0]["finish_reason"] == done["finish_reason"]
    assert done["usage"]["completion_tokens"] == len(tokens)
    blocking = fast.post("/v1/invoke", body()).json()
    assert blocking["tokens"] == [e["token"] for e in tokens]
    assert blocking["choices"][0]["tokens"] == blocking["tokens"]
    # Ended a moment ago: still readable, with its final state.
    got = fast.client().get(f"/v1/generations/{gen_id}").json()
    assert got["state"] == "finished" and got["instance"] == "t/gen"
    assert got["generation"]["tokens"][got["generation"]["prompt_len"] :] == blocking["tokens"]


def test_n_choices_are_multiplexed_into_one_stream(pair: dict[str, InvokerProcess]) -> None:
    fast = pair["fast"]
    doc = body(n=3, temperature=1.0, seed=11, max_tokens=12)
    with streaming(fast, "/v1/invoke", doc) as events:
        evs = list(events)
    assert evs[0]["n"] == 3
    for i in range(3):
        mine = [e for e in evs if e["event"] == "token" and e["choice"] == i and e["token"]]
        assert [e["index"] for e in mine] == list(range(1, len(mine) + 1))
    assert sorted(e["choice"] for e in evs if e["event"] == "finish") == [0, 1, 2]
    done = evs[-1]
    assert [c["index"] for c in done["choices"]] == [0, 1, 2]
    outputs = [tokens_of(evs, i) for i in range(3)]
    assert len({tuple(o) for o in outputs}) > 1  # seeded per choice: they differ
    blocking = fast.post("/v1/invoke", doc).json()  # and each is reproducible
    assert [c["tokens"] for c in blocking["choices"]] == outputs
    assert blocking["usage"]["completion_tokens"] == sum(len(o) for o in outputs)


@pytest.mark.parametrize(
    "sampling",
    [{"temperature": 0}, {"temperature": 1.0, "seed": 1234}],
    ids=["greedy", "seeded-t1"],
)
def test_pause_then_resume_on_another_invoker_continues_token_for_token(
    pair: dict[str, InvokerProcess], sampling: dict[str, Any]
) -> None:
    slow, fast = pair["slow"], pair["fast"]
    reference = fast.post("/v1/invoke", body(**sampling)).json()
    assert len(reference["tokens"]) >= 8, reference  # long enough to pause in the middle
    gen_id = uuid.uuid4().hex
    with streaming(slow, "/v1/invoke", body(activation=gen_id, **sampling)) as events:
        seen = read_until_tokens(events, 3)
        listed = slow.client().get("/v1/generations").json()["generations"]
        mine = [g for g in listed if g["id"] == gen_id]
        assert mine and mine[0]["state"] == "running" and mine[0]["instance"] == "t/gen"
        assert mine[0]["function"] == "t/gen" and mine[0]["tokens"] >= 3
        got = slow.client().get(f"/v1/generations/{gen_id}").json()
        assert got["state"] == "running" and got["generation"]["prompt_len"] > 0
        paused = slow.client().post(f"/v1/generations/{gen_id}/pause")
        assert paused.status_code == 200, paused.text
        state = paused.json()["generation"]
        seen += list(events)
    kinds = [e["event"] for e in seen]
    assert kinds[-3:] == ["paused", "finish", "done"]
    assert seen[-3]["state"] == state and seen[-2]["finish_reason"] == "paused"
    before = tokens_of(seen)
    assert state["tokens"][state["prompt_len"] :] == before
    assert len(before) < len(reference["tokens"])
    # Paused: readable, but no second pause nor a cancel.
    c = slow.client()
    assert c.get(f"/v1/generations/{gen_id}").json()["state"] == "paused"
    assert c.post(f"/v1/generations/{gen_id}/pause").status_code == 409
    assert c.delete(f"/v1/generations/{gen_id}").status_code == 409

    resume = {"function": "t/gen", "model": "llama", "state": state, "activation": gen_id}
    with streaming(fast, "/v1/generations", resume) as events:
        after = list(events)
    assert after[0]["event"] == "start" and after[0]["resumed"] == len(before)
    assert after[0]["generation"] == gen_id
    indexes = [e["index"] for e in after if e["event"] == "token" and e["token"] is not None]
    assert indexes == list(range(len(before) + 1, len(before) + 1 + len(indexes)))
    assert before + tokens_of(after) == reference["tokens"]
    text = "".join(e["text"] for e in seen + after if e["event"] == "token")
    assert text == reference["text"]
    assert after[-1]["finish_reason"] == reference["finish_reason"]


def state_from_events(events: list[dict[str, Any]], choice: int = 0) -> dict[str, Any]:
    """What a relay rebuilds from a resumable stream: the start state, the tokens relayed
    since, and the last token event's text state (runtime/_sequence.py, start_state)."""
    start = events[0]
    assert start["event"] == "start"
    state = dict(start["states"][choice])
    mine = [e for e in events if e["event"] == "token" and e["choice"] == choice]
    state["tokens"] = state["tokens"] + [e["token"] for e in mine if e["token"] is not None]
    if mine:
        state["text"] = mine[-1]["text_state"]
    return state


@pytest.mark.parametrize(
    "sampling",
    [
        {"temperature": 0},
        {"temperature": 1.0, "seed": 99},
        {"temperature": 0.8, "top_p": 0.9},  # no seed: the start state carries the drawn one
    ],
    ids=["greedy", "seeded", "unseeded"],
)
def test_a_resumable_stream_carries_what_a_resume_needs(
    pair: dict[str, InvokerProcess], sampling: dict[str, Any]
) -> None:
    """Nothing is asked of the source afterwards: the relayed events alone resume the
    generation on another invoker, token for token and character for character."""
    slow, fast = pair["slow"], pair["fast"]
    gen_id = uuid.uuid4().hex
    with streaming(slow, "/v1/invoke", body(activation=gen_id, resumable=True, **sampling)) as ev:
        seen = read_until_tokens(ev, 5)
    start = seen[0]
    assert [s["prompt_len"] for s in start["states"]] == [len(start["states"][0]["tokens"])]
    assert all("text_state" in e for e in seen if e["event"] == "token")
    state = state_from_events(seen)
    seed = state["sampler"]["seed"]
    assert isinstance(seed, int)
    reference = fast.post("/v1/invoke", body(**{**sampling, "seed": seed})).json()

    resume = {"function": "t/gen", "model": "llama", "state": state, "resumable": True}
    with streaming(fast, "/v1/generations", resume) as events:
        after = list(events)
    assert after[0]["states"][0]["tokens"] == state["tokens"]
    before = tokens_of(seen)
    assert before + tokens_of(after) == reference["tokens"]
    text = "".join(e["text"] for e in seen + after if e["event"] == "token")
    assert text == reference["text"]
    # A plain stream carries neither (it costs every client bytes per token).
    with streaming(fast, "/v1/invoke", body(max_tokens=3)) as events:
        plain = list(events)
    assert "states" not in plain[0]
    assert not any("text_state" in e for e in plain)
    assert fast.client().post("/v1/invoke", json=body(resumable="yes")).status_code == 400


def test_cancel_ends_the_stream(pair: dict[str, InvokerProcess]) -> None:
    slow = pair["slow"]
    gen_id = uuid.uuid4().hex
    with streaming(slow, "/v1/invoke", body(activation=gen_id)) as events:
        seen = read_until_tokens(events, 2)
        r = slow.client().delete(f"/v1/generations/{gen_id}")
        assert r.status_code == 200, r.text
        assert r.json()["state"] == "cancelled"
        seen += list(events)
    assert [e["event"] for e in seen][-2:] == ["finish", "done"]
    assert seen[-2]["finish_reason"] == "cancelled"
    assert len(tokens_of(seen)) < MAX_TOKENS
    c = slow.client()
    assert c.delete(f"/v1/generations/{gen_id}").status_code == 409
    assert c.post(f"/v1/generations/{gen_id}/pause").status_code == 409
    assert c.get(f"/v1/generations/{gen_id}").json()["state"] == "cancelled"


def test_unknown_generations_are_404(pair: dict[str, InvokerProcess]) -> None:
    c = pair["fast"].client()
    assert c.get("/v1/generations/nope").status_code == 404
    assert c.post("/v1/generations/nope/pause").status_code == 404
    assert c.delete("/v1/generations/nope").status_code == 404
    assert c.get("/v1/generations/nope", headers={"Authorization": "Bearer x"}).status_code == 401


def _finished_state(proc: InvokerProcess, **sampling: Any) -> dict[str, Any]:
    gen_id = uuid.uuid4().hex
    proc.post("/v1/invoke", body(activation=gen_id, max_tokens=6, **sampling)).raise_for_status()
    state: dict[str, Any] = proc.client().get(f"/v1/generations/{gen_id}").json()["generation"]
    # A state paused after 6 tokens: what a hostile edit starts from.
    return {**state, "finished": False, "finish_reason": None}


def _edit(state: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = json.loads(json.dumps(state))
    *parents, last = path.split(".")
    node = out
    for key in parents:
        node = node[key]
    if value is _DROP:
        del node[last]
    else:
        node[last] = value
    return out


_DROP = object()
HOSTILE = {
    "huge draw count": ("sampler.draws", 10**18),
    "huge draw count without rng": ("sampler", {"seed": 5, "draws": 10**18}),
    "draws as a string": ("sampler.draws", "7"),
    "token id out of range": ("tokens", [10**9]),
    "negative token id": ("tokens", [-1, 2]),
    "tokens missing": ("tokens", _DROP),
    "tokens not a list": ("tokens", "abc"),
    "prompt_len zero": ("prompt_len", 0),
    "prompt_len past the tokens": ("prompt_len", 10**6),
    "prompt_len mistyped": ("prompt_len", "3"),
    "budget larger than the context": ("params.max_tokens", 10**6),
    "params mistyped": ("params", [1, 2]),
    "temperature out of range": ("params.temperature", 50),
    "rng not a generator state": ("sampler.rng", "aGVsbG8="),
    "held text too long": ("text.held", "x" * 100_000),
    "text offsets past the end": ("text.read", 10**9),
    "bad version": ("version", 99),
    "finished without a reason": ("finished", True),
    "more tokens than the context": ("tokens", [5] * 200_000),
}


@pytest.mark.parametrize(("path", "value"), HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_states_are_a_quick_400(
    pair: dict[str, InvokerProcess], path: str, value: Any
) -> None:
    fast = pair["fast"]
    state = _finished_state(fast, temperature=1.0, seed=3)
    began = time.monotonic()
    r = fast.post(
        "/v1/generations",
        {"function": "t/gen", "model": "llama", "state": _edit(state, path, value)},
    )
    assert r.status_code == 400, r.text
    assert time.monotonic() - began < 5.0
    assert r.json()["error"]["message"]


def test_a_resumed_choice_keeps_its_index(pair: dict[str, InvokerProcess]) -> None:
    fast = pair["fast"]
    gen_id = uuid.uuid4().hex
    fast.post("/v1/invoke", body(activation=gen_id, max_tokens=4)).raise_for_status()
    state = fast.client().get(f"/v1/generations/{gen_id}").json()["generation"]
    doc = {"function": "t/gen", "model": "llama", "state": state, "choice": 2}
    with streaming(fast, "/v1/generations", doc) as events:
        evs = list(events)
    assert [e["event"] for e in evs] == ["start", "finish", "done"]  # it had finished
    assert evs[0]["resumed"] == 4 and evs[1]["choice"] == 2
    assert evs[-1]["choices"] == [
        {"index": 2, "finish_reason": state["finish_reason"], "stop_reason": None}
    ]
    assert evs[-1]["usage"]["completion_tokens"] == 4


def test_malformed_resume_bodies(pair: dict[str, InvokerProcess]) -> None:
    fast = pair["fast"]
    for doc in (
        {"function": "t/gen", "model": "llama"},
        {"function": "t/gen", "model": "llama", "state": 3},
    ):
        assert fast.post("/v1/generations", doc).status_code == 400
    ten_mb = {"function": "t/gen", "model": "llama", "state": {"tokens": [1] * 5_000_000}}
    r = httpx.post(
        f"{fast.url}/v1/generations",
        content=json.dumps(ten_mb).encode(),
        headers={**fast.headers(), "Content-Type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 413  # over the body limit: refused before parsing


def test_two_instances_of_one_function_and_unload_of_exactly_one(
    pair: dict[str, InvokerProcess],
) -> None:
    fast = pair["fast"]
    fn = f"t/{uuid.uuid4().hex[:8]}"
    for inst in ("901", "902"):
        r = fast.post(
            "/v1/load", {"function": fn, "model": "llama", "instance": inst, "version": 3}
        )
        assert r.status_code == 200, r.text
        assert r.json()["instance"] == inst and r.json()["version"] == 3
    held = [i for i in fast.client().get("/v1/status").json()["instances"] if i["function"] == fn]
    assert sorted((i["instance"], i["version"]) for i in held) == [("901", 3), ("902", 3)]
    with streaming(fast, "/v1/invoke", body(function=fn, instance="902", version=3)) as events:
        assert next(events)["instance"] == "902"
    ambiguous = fast.post("/v1/unload", {"function": fn})
    assert ambiguous.status_code == 409 and "901" in ambiguous.text and "902" in ambiguous.text
    r = fast.post("/v1/unload", {"instance": "901"})
    assert r.status_code == 200 and r.json()["instance"] == "901"
    held = [i for i in fast.client().get("/v1/status").json()["instances"] if i["function"] == fn]
    assert [i["instance"] for i in held] == ["902"]
    assert fast.post("/v1/unload", {"instance": "901"}).status_code == 404
    assert fast.post("/v1/unload", {"function": fn}).json()["instance"] == "902"
