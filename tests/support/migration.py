"""Invokers and helpers for the migration-target tests: a generation is moved from S to D by
hand, the way the controller drives it (hold on D with S's state, prefill rounds while S
decodes, pause S, continue D)."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllm.store import open_store, push_model
from sllm.tiny_models import build_tiny_model
from tests.support.invoker import InvokerProcess

SLOW_STEP_S = 0.1  # a source decodes one token per 0.1 s: rounds fit between its tokens
HOOK = Path(__file__).resolve().parent / "slow_steps"
PROMPT = "hello there, how are you"
MAX_TOKENS = 36
MODELS = ("llama", "qwen2")
SHORT_HOLD_S = 2.0  # the "short" invoker's --hold-timeout
SHORT_PREFILL_S = 0.5  # and each of its prefill passes sleeps this long first
SHORT_DETACH_S = 2.0  # and its --detach-grace


@contextmanager
def start_migration_invokers(root: Path) -> Iterator[dict[str, InvokerProcess]]:
    """Four invokers on one folder store, every model loaded on each:

    slow    batching, decode steps slowed (a source)
    fast    batching (a destination)
    serial  --no-batching, decode steps slowed (a source or a destination)
    short   batching, --hold-timeout 2 s, --detach-grace 2 s, decode and prefill slowed
    """
    uri = (root / "store").as_uri()
    store = open_store(uri)
    for model in MODELS:
        # Wide weights for qwen2: its default tiny weights repeat one token greedily.
        std = 0.5 if model == "qwen2" else None
        folder = build_tiny_model(model, root / f"hf-{model}", seed=0, init_std=std)
        push_model(str(folder), model, store, progress=False)
    path = os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH", "")) if p)
    slowed = {"PYTHONPATH": path, "SLLM_TEST_STEP_DELAY": str(SLOW_STEP_S)}
    short = {**slowed, "SLLM_TEST_PREFILL_DELAY": str(SHORT_PREFILL_S)}
    out = {
        "slow": InvokerProcess(root / "slow", uri, env=slowed),
        "fast": InvokerProcess(root / "fast", uri),
        "serial": InvokerProcess(root / "serial", uri, env=slowed, extra=("--no-batching",)),
        "short": InvokerProcess(
            root / "short",
            uri,
            env=short,
            extra=("--hold-timeout", str(SHORT_HOLD_S), "--detach-grace", str(SHORT_DETACH_S)),
        ),
    }
    try:
        for p in out.values():
            p.start()
        for p in out.values():
            for model in MODELS:  # warm: a cold load on D would let S run far ahead
                p.post("/v1/load", {"function": f"t/{model}", "model": model}).raise_for_status()
        yield out
    finally:
        for p in out.values():
            p.stop()


def body(model: str = "llama", **extra: Any) -> dict[str, Any]:
    """An invoke body for function t/MODEL: MAX_TOKENS tokens, eos ignored."""
    return {
        "function": f"t/{model}",
        "model": model,
        "prompt": PROMPT,
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,  # every run is MAX_TOKENS long: "near the end" is well defined
        **extra,
    }


@contextmanager
def streaming(proc: InvokerProcess, path: str, doc: Any) -> Iterator[Iterator[dict[str, Any]]]:
    """The NDJSON events of a streaming POST, read as they come."""
    with (
        proc.client() as client,
        client.stream("POST", path, json={**doc, "stream": True}) as r,
    ):
        assert r.status_code == 200, r.read()
        yield (json.loads(line) for line in r.iter_lines() if line)


def tokens_of(events: list[dict[str, Any]], choice: int = 0) -> list[int]:
    return [
        e["token"]
        for e in events
        if e["event"] == "token" and e["choice"] == choice and e["token"] is not None
    ]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in events if e["event"] == "token")


def read_more(
    events: Iterator[dict[str, Any]], seen: list[dict[str, Any]], k: int, choices: int = 1
) -> None:
    """Append events to `seen` until each of its first `choices` choices has `k` tokens."""
    while min(len(tokens_of(seen, i)) for i in range(choices)) < k:
        ev = next(events, None)
        assert ev is not None, f"the stream ended before {k} tokens: {seen}"
        seen.append(ev)


def exported(proc: InvokerProcess, gen_id: str) -> dict[str, Any]:
    r = proc.client().get(f"/v1/generations/{gen_id}")
    assert r.status_code == 200, r.text
    state: dict[str, Any] = r.json()["generation"]
    return state


def listed(proc: InvokerProcess, gen_id: str) -> dict[str, Any]:
    mine = [g for g in proc.client().get("/v1/generations").json()["generations"]]
    found = [g for g in mine if g["id"] == gen_id]
    assert len(found) == 1, mine
    return found[0]


def hold_body(doc: dict[str, Any], state: dict[str, Any], gen_id: str) -> dict[str, Any]:
    return {
        "function": doc["function"],
        "model": doc["model"],
        "state": state,
        "hold": True,
        "activation": gen_id,
    }


@dataclass
class Migration:
    source: list[dict[str, Any]]  # S's stream, through its paused / finish / done
    target: list[dict[str, Any]]  # D's stream, from its held start to done
    rounds: list[dict[str, Any]]  # the prefill answers
    last_sent: int  # tokens sent in the last prefill round
    final: dict[str, Any]  # S's final state
    continued: dict[str, Any]  # the continue answer


def migrate(
    src: InvokerProcess,
    dst: InvokerProcess,
    doc: dict[str, Any],
    *,
    hold_at: int,
    rounds: tuple[int, ...],
) -> Migration:
    """Move a generation from `src` to `dst`: hold after `hold_at` tokens, a prefill round
    once S has each of `rounds` tokens, then pause S and continue D."""
    gen_id = uuid.uuid4().hex
    seen: list[dict[str, Any]] = []
    answers = []
    with streaming(src, "/v1/invoke", {**doc, "activation": gen_id}) as source:
        read_more(source, seen, hold_at)
        state = exported(src, gen_id)
        with streaming(dst, "/v1/generations", hold_body(doc, state, gen_id)) as target:
            start = next(target)
            assert start["event"] == "start" and start["held"] is True, start
            assert start["resumed"] == len(state["tokens"]) - state["prompt_len"]
            sent = state["tokens"]
            for k in rounds:
                read_more(source, seen, k)
                sent = exported(src, gen_id)["tokens"]
                r = dst.post(f"/v1/generations/{gen_id}/prefill", {"tokens": sent})
                assert r.status_code == 200, r.text
                answers.append(r.json())
            paused = src.client().post(f"/v1/generations/{gen_id}/pause")
            assert paused.status_code == 200, paused.text
            final = paused.json()["generation"]
            seen += list(source)
            r = dst.post(f"/v1/generations/{gen_id}/continue", {"state": final})
            assert r.status_code == 200, r.text
            after = [start, *target]
    return Migration(seen, after, answers, len(sent), final, r.json())


def check_migrated(m: Migration, reference: dict[str, Any]) -> None:
    """What a client of the relay would see equals the unmigrated run, and the rounds paid off."""
    kinds = [e["event"] for e in m.source]
    assert kinds[-3:] == ["paused", "finish", "done"], kinds
    before = tokens_of(m.source)
    assert m.final["tokens"][m.final["prompt_len"] :] == before
    indexes = [e["index"] for e in m.target if e["event"] == "token" and e["token"] is not None]
    assert indexes == list(range(len(before) + 1, len(reference["tokens"]) + 1))
    assert before + tokens_of(m.target) == reference["tokens"]
    assert text_of(m.source) + text_of(m.target) == reference["text"]
    assert m.target[-1]["event"] == "done"
    assert m.target[-1]["finish_reason"] == reference["finish_reason"]
    # Each round computed what was new since the previous one; the continue only the rest.
    for answer in m.rounds:
        assert answer["pending"] is False and answer["cached"] in (
            answer["tokens"] - 1,  # batching: the last token waits for the first decode pass
            answer["tokens"],  # serial
        ), answer
    final_len = len(m.final["tokens"])
    new = final_len - m.last_sent
    assert m.continued["tokens"] == final_len
    assert new <= m.continued["recomputed"] <= new + 1, (m.continued, m.last_sent)
    assert m.continued["recomputed"] < final_len // 2  # not the whole sequence again


def instance_of(proc: InvokerProcess, function: str) -> dict[str, Any]:
    found = [
        i for i in proc.client().get("/v1/status").json()["instances"] if i["function"] == function
    ]
    assert len(found) == 1, found
    return found[0]


def finished_state(proc: InvokerProcess, doc: dict[str, Any]) -> dict[str, Any]:
    """The whole state of a run of `doc` (finished): what states_at cuts down."""
    gen_id = uuid.uuid4().hex
    proc.post("/v1/invoke", {**doc, "activation": gen_id}).raise_for_status()
    state = exported(proc, gen_id)
    assert state["finished"] and len(state["tokens"]) - state["prompt_len"] == MAX_TOKENS
    return state


def state_at(full: dict[str, Any], k: int) -> dict[str, Any]:
    """The state of that run after k tokens, as a relay could rebuild it (greedy: exact)."""
    return {
        "version": full["version"],
        "tokens": full["tokens"][: full["prompt_len"] + k],
        "prompt_len": full["prompt_len"],
        "params": full["params"],
    }
