"""Held generations (migration targets) on real invoker processes: a held one decodes
nothing, is cancelled and freed when its hold runs out, can be deleted, answers pending
when a round outlasts its wait, and every call refuses what it cannot do with a 4xx naming
the field."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest

from tests.support.invoker import InvokerProcess
from tests.support.migration import (
    MAX_TOKENS,
    SHORT_HOLD_S,
    body,
    exported,
    finished_state,
    hold_body,
    instance_of,
    listed,
    read_more,
    state_at,
    streaming,
    tokens_of,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.invoker]


def test_a_held_generation_decodes_nothing_until_continued(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    src, dst = migration_invokers["slow"], migration_invokers["fast"]
    doc = body(temperature=0)
    gen_id = uuid.uuid4().hex
    seen: list[dict[str, Any]] = []
    with streaming(src, "/v1/invoke", {**doc, "activation": gen_id}) as source:
        read_more(source, seen, 3)
        state = exported(src, gen_id)
        at_hold = len(state["tokens"]) - state["prompt_len"]
        with streaming(dst, "/v1/generations", hold_body(doc, state, gen_id)) as target:
            assert next(target)["held"] is True
            held = listed(dst, gen_id)
            assert held["state"] == "held" and held["tokens"] == at_hold, held
            assert dst.metric("sllm_invoker_held_generations") == 1
            read_more(source, seen, at_hold + 5)  # S goes on: half a second
            assert listed(src, gen_id)["tokens"] >= at_hold + 5
            assert listed(dst, gen_id)["tokens"] == at_hold  # D decoded nothing meanwhile
            assert exported(dst, gen_id)["tokens"] == state["tokens"]
            assert instance_of(dst, "t/llama")["kv_rows"] == 1  # it holds its cache
            paused = dst.client().post(f"/v1/generations/{gen_id}/pause")
            assert paused.status_code == 409 and "held" in paused.text
            assert src.client().delete(f"/v1/generations/{gen_id}").status_code == 200
            # A migration abandoned by the controller: D's copy is deleted.
            r = dst.client().delete(f"/v1/generations/{gen_id}")
            assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
            rest = list(target)
    assert [e["event"] for e in rest] == ["finish", "done"]
    assert rest[0]["finish_reason"] == "cancelled"
    assert dst.metric("sllm_invoker_held_generations") == 0
    wait_until(lambda: instance_of(dst, "t/llama")["kv_rows"] == 0, 5, "the KV row freed")
    assert instance_of(dst, "t/llama")["active"] == 0


def test_a_held_generation_not_continued_in_time_is_cancelled_and_freed(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    short = migration_invokers["short"]
    doc = body(temperature=0)
    full = finished_state(migration_invokers["fast"], doc)
    gen_id = uuid.uuid4().hex
    expired = short.metric("sllm_invoker_hold_expired_total")
    began = time.monotonic()
    with streaming(short, "/v1/generations", hold_body(doc, state_at(full, 4), gen_id)) as target:
        assert next(target)["held"] is True
        assert instance_of(short, "t/llama")["kv_rows"] == 1
        rest = list(target)  # nothing comes until the hold timeout cancels it
    waited = time.monotonic() - began
    assert [e["event"] for e in rest] == ["finish", "done"]
    assert rest[0]["finish_reason"] == "cancelled"
    assert SHORT_HOLD_S - 0.1 <= waited < SHORT_HOLD_S + 5, waited
    assert listed(short, gen_id)["state"] == "cancelled"
    assert short.metric("sllm_invoker_hold_expired_total") == expired + 1
    wait_until(lambda: instance_of(short, "t/llama")["kv_rows"] == 0, 5, "the KV row freed")
    assert instance_of(short, "t/llama")["active"] == 0
    for call, doc_ in (("prefill", {"tokens": full["tokens"]}), ("continue", {"state": full})):
        r = short.post(f"/v1/generations/{gen_id}/{call}", doc_)
        assert r.status_code == 409 and "cancelled" in r.text, r.text


def test_each_round_restarts_the_hold_timeout_and_a_slow_prefill_answers_pending(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    """On "short" (hold timeout 2 s, prefill passes 0.5 s): a round with a short wait is a
    202 that goes on computing; the next round finds it done; the rounds keep the
    generation held past 2 s after the hold, and the continue recomputes only the rest."""
    short = migration_invokers["short"]
    doc = body(temperature=0)
    full = finished_state(migration_invokers["fast"], doc)
    prompt_len = full["prompt_len"]
    gen_id = uuid.uuid4().hex
    url = f"/v1/generations/{gen_id}"
    with streaming(short, "/v1/generations", hold_body(doc, state_at(full, 4), gen_id)) as target:
        assert next(target)["held"] is True
        time.sleep(SHORT_HOLD_S * 0.6)
        round_2 = state_at(full, 20)["tokens"]
        r = short.post(f"{url}/prefill", {"tokens": round_2, "wait": 0.1})
        assert r.status_code == 202, r.text
        assert r.json()["pending"] is True and r.json()["cached"] < len(round_2) - 1
        r = short.post(f"{url}/prefill", {"tokens": round_2, "wait": 10})
        assert r.status_code == 200, r.text
        assert r.json() == {
            "id": gen_id,
            "tokens": len(round_2),
            "cached": len(round_2) - 1,
            "computed": 0,  # computed after the pending answer, before this one began
            "pending": False,
        }
        time.sleep(SHORT_HOLD_S * 0.6)  # past the first deadline: the rounds moved it
        assert listed(short, gen_id)["state"] == "held"
        r = short.post(f"{url}/continue", {"state": state_at(full, 24)})
        assert r.status_code == 200, r.text
        assert r.json() == {"id": gen_id, "tokens": prompt_len + 24, "recomputed": 5}
        after = list(target)
    generated = full["tokens"][prompt_len:]
    assert tokens_of(after) == generated[24:]
    assert after[-1]["finish_reason"] == "length"


def prompt_differs(full: dict[str, Any]) -> list[int]:
    tokens = list(full["tokens"][: full["prompt_len"] + 6])
    tokens[0] = (tokens[0] + 1) % 200
    return tokens


@pytest.mark.parametrize("dst", ["fast", "serial"], ids=["batching", "serial"])
def test_migration_calls_refuse_what_they_cannot_do(
    migration_invokers: dict[str, InvokerProcess], dst: str
) -> None:
    d = migration_invokers[dst]
    doc = body(temperature=0)
    full = finished_state(migration_invokers["fast"], doc)
    prompt_len = full["prompt_len"]
    prompt = full["tokens"][:prompt_len]
    gen_id = uuid.uuid4().hex
    url = f"/v1/generations/{gen_id}"
    hold = hold_body(doc, state_at(full, 4), gen_id)

    def refused(path: str, payload: Any, status: int, param: str | None = None) -> None:
        r = d.post(path, payload)
        assert r.status_code == status, (path, payload, r.text)
        if param is not None:
            assert r.json()["error"].get("param") == param, r.text

    refused("/v1/generations", {**hold, "hold": "yes"}, 400, "hold")
    refused("/v1/generations", {**hold, "state": full}, 400, "state.finished")
    for call, payload in (("prefill", {"tokens": prompt}), ("continue", {"state": full})):
        refused(f"/v1/generations/nope/{call}", payload, 404)
    prefills = {
        "not a list": ({"tokens": "abc"}, "tokens"),
        "empty": ({"tokens": []}, "tokens"),
        "booleans": ({"tokens": [True, *prompt]}, "tokens"),
        "another prompt": ({"tokens": prompt_differs(full)}, "tokens"),
        "shorter than the prompt": ({"tokens": prompt[:-1]}, "tokens"),
        "outside the vocabulary": ({"tokens": [*prompt, 10**6]}, "tokens"),
        "past max_tokens": ({"tokens": prompt + [5] * (MAX_TOKENS + 1)}, "tokens"),
        "past the context": ({"tokens": prompt + [5] * 200}, "tokens"),
        "a negative wait": ({"tokens": prompt, "wait": -1}, "wait"),
        "a wait as text": ({"tokens": prompt, "wait": "1"}, "wait"),
    }
    hostile_draws = {**state_at(full, 12), "sampler": {"seed": 1, "draws": 10**9}}
    continues = {
        "no state": ({}, "state"),
        "a state that is no object": ({"state": 3}, "state"),
        "another prompt": ({"state": {**full, "tokens": prompt_differs(full)}}, "state.tokens"),
        "another prompt length": (
            {"state": {**state_at(full, 12), "prompt_len": prompt_len - 1}},
            "state.tokens",
        ),
        "a hostile draw count": ({"state": hostile_draws}, "state.sampler.draws"),
    }
    recomputed = d.metric("sllm_invoker_migration_recomputed_tokens_count")
    with streaming(d, "/v1/generations", hold) as target:
        assert next(target)["held"] is True
        for payload, param in prefills.values():
            refused(f"{url}/prefill", payload, 400, param)
        for payload, param in continues.values():
            refused(f"{url}/continue", payload, 400, param)
        refused(f"{url}/prefill", [1, 2], 400)
        refused(f"{url}/pause", {}, 409)
        assert listed(d, gen_id)["state"] == "held"  # none of that changed it
        r = d.post(f"{url}/prefill", {"tokens": state_at(full, 8)["tokens"]})
        assert r.status_code == 200 and r.json()["computed"] in (3, 4), r.text
        r = d.post(f"{url}/continue", {"state": state_at(full, 12)})
        assert r.status_code == 200 and r.json()["recomputed"] in (4, 5), r.text
        refused(f"{url}/continue", {"state": state_at(full, 12)}, 409)  # continued already
        refused(f"{url}/prefill", {"tokens": prompt}, 409)
        after = list(target)
    assert tokens_of(after) == full["tokens"][prompt_len + 12 :]
    assert d.metric("sllm_invoker_migration_recomputed_tokens_count") == recomputed + 1
    refused(f"{url}/continue", {"state": state_at(full, 12)}, 409)  # it finished
    # A generation that was never held is no migration target.
    src = migration_invokers["slow"]
    running = uuid.uuid4().hex
    with streaming(src, "/v1/invoke", {**doc, "activation": running}) as source:
        read_more(source, [], 1)
        r = src.post(f"/v1/generations/{running}/prefill", {"tokens": prompt})
        assert r.status_code == 409 and "not held" in r.text, r.text
        r = src.post(f"/v1/generations/{running}/continue", {"state": state_at(full, 4)})
        assert r.status_code == 409 and "not held" in r.text, r.text
        assert src.client().delete(f"/v1/generations/{running}").status_code == 200


def test_continue_with_nothing_new_since_the_last_round_recomputes_next_to_nothing(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    """S paused right after the last round: a serial target has the next logits at hand
    (nothing recomputed), a batching one feeds the last token to its first decode pass."""
    doc = body(temperature=0)
    full = finished_state(migration_invokers["fast"], doc)
    for dst, expected in (("serial", 0), ("fast", 1)):
        d = migration_invokers[dst]
        gen_id = uuid.uuid4().hex
        url = f"/v1/generations/{gen_id}"
        with streaming(d, "/v1/generations", hold_body(doc, state_at(full, 4), gen_id)) as target:
            next(target)
            r = d.post(f"{url}/prefill", {"tokens": state_at(full, 10)["tokens"]})
            assert r.status_code == 200, r.text
            r = d.post(f"{url}/continue", {"state": state_at(full, 10)})
            assert r.status_code == 200 and r.json()["recomputed"] == expected, (dst, r.text)
            after = list(target)
        assert tokens_of(after) == full["tokens"][full["prompt_len"] + 10 :], dst


@pytest.mark.parametrize("dst", ["fast", "serial"], ids=["batching", "serial"])
def test_a_held_generation_can_be_deleted(
    migration_invokers: dict[str, InvokerProcess], dst: str
) -> None:
    d = migration_invokers[dst]
    doc = body(temperature=0)
    full = finished_state(migration_invokers["fast"], doc)
    gen_id = uuid.uuid4().hex
    with streaming(d, "/v1/generations", hold_body(doc, state_at(full, 4), gen_id)) as target:
        assert next(target)["held"] is True
        assert instance_of(d, "t/llama")["active"] == 1
        r = d.client().delete(f"/v1/generations/{gen_id}")
        assert r.status_code == 200 and r.json()["state"] == "cancelled", r.text
        rest = list(target)
    assert [(e["event"], e.get("finish_reason")) for e in rest] == [
        ("finish", "cancelled"),
        ("done", "cancelled"),
    ]
    assert instance_of(d, "t/llama")["active"] == 0
    wait_until(lambda: instance_of(d, "t/llama")["kv_rows"] == 0, 5, "the KV row freed")
    r = d.post(f"/v1/generations/{gen_id}/continue", {"state": state_at(full, 8)})
    assert r.status_code == 409 and "cancelled" in r.text
