"""Migrations driven by hand between real invoker processes: the client's tokens and text
are exactly those of an unmigrated run (greedy and seeded, early, mid-way and near the end,
two architectures, batching and serial), a json_schema generation stays valid JSON, and the
choices of one request move one hold each."""

from __future__ import annotations

import json
import uuid
from contextlib import ExitStack
from typing import Any

import pytest

from tests.support.invoker import InvokerProcess
from tests.support.migration import (
    MAX_TOKENS,
    body,
    check_migrated,
    exported,
    hold_body,
    migrate,
    read_more,
    streaming,
    text_of,
    tokens_of,
)

pytestmark = [pytest.mark.invoker]


SAMPLINGS = {"greedy": {"temperature": 0}, "seeded": {"temperature": 1.0, "seed": 4321}}
# (hold after, prefill rounds at): S's token counts, of MAX_TOKENS
WHEN = {"early": (2, (4,)), "mid": (14, (17, 20)), "late": (26, (29,))}
CASES = [
    *[("llama", "slow", "fast", s, w) for s in SAMPLINGS for w in WHEN],  # batching
    *[("qwen2", "slow", "fast", s, "mid") for s in SAMPLINGS],  # a second architecture
    *[("llama", "slow", "serial", s, "mid") for s in SAMPLINGS],  # onto --no-batching
    ("qwen2", "serial", "fast", "seeded", "late"),  # from --no-batching
]


@pytest.mark.parametrize(
    ("model", "src", "dst", "sampling", "when"),
    CASES,
    ids=[f"{m}-{s}-to-{d}-{p}-{w}" for m, s, d, p, w in CASES],
)
def test_a_migrated_generation_equals_the_unmigrated_one(
    migration_invokers: dict[str, InvokerProcess],
    model: str,
    src: str,
    dst: str,
    sampling: str,
    when: str,
) -> None:
    doc = body(model, **SAMPLINGS[sampling])
    reference = migration_invokers["fast"].post("/v1/invoke", doc).json()
    assert len(reference["tokens"]) == MAX_TOKENS, reference
    assert len(set(reference["tokens"])) > 4, reference  # not one token over and over
    hold_at, rounds = WHEN[when]

    m = migrate(
        migration_invokers[src], migration_invokers[dst], doc, hold_at=hold_at, rounds=rounds
    )

    check_migrated(m, reference)


SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "mood": {"enum": ["happy", "sad", "calm"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "mood", "age"],
    "additionalProperties": False,
}


def test_a_json_schema_generation_migrated_mid_way_is_valid_json(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    """The grammar state moves with the final state: D goes on inside the same JSON value."""
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": SCHEMA}}
    doc = body(max_tokens=100, temperature=1.0, seed=7, response_format=fmt)
    reference = migration_invokers["fast"].post("/v1/invoke", doc).json()
    n = len(reference["tokens"])
    assert reference["finish_reason"] == "stop" and n >= 24, reference  # the grammar ended it

    m = migrate(
        migration_invokers["slow"],
        migration_invokers["fast"],
        doc,
        hold_at=n // 2 - 6,
        rounds=(n // 2 - 3,),
    )

    check_migrated(m, reference)
    value = json.loads(text_of(m.source) + text_of(m.target))
    assert set(value) == {"name", "mood", "age"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 8
    assert value["mood"] in ("happy", "sad", "calm")
    assert isinstance(value["age"], int) and 0 <= value["age"] <= 99


def test_the_choices_of_one_request_move_as_one_hold_each(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    """n = 2 on S: each choice is held, prefilled and continued on D under its own id, its
    events carrying its choice index; D batches the two."""
    src, dst = migration_invokers["slow"], migration_invokers["fast"]
    doc = body(n=2, temperature=1.0, seed=99)
    reference = dst.post("/v1/invoke", doc).json()
    gen_id = uuid.uuid4().hex
    ids = [f"{gen_id}.{i}" for i in range(2)]
    seen: list[dict[str, Any]] = []
    with streaming(src, "/v1/invoke", {**doc, "activation": gen_id}) as source, ExitStack() as es:
        read_more(source, seen, 4, choices=2)
        targets = []
        for i, one in enumerate(ids):
            hold = {**hold_body(doc, exported(src, one), one), "choice": i}
            targets.append(es.enter_context(streaming(dst, "/v1/generations", hold)))
        starts = [next(t) for t in targets]
        assert all(s["held"] for s in starts)
        read_more(source, seen, 8, choices=2)
        for one in ids:
            tokens = exported(src, one)["tokens"]
            r = dst.post(f"/v1/generations/{one}/prefill", {"tokens": tokens})
            assert r.status_code == 200, r.text
        finals = []
        for one in ids:
            paused = src.client().post(f"/v1/generations/{one}/pause")
            assert paused.status_code == 200, paused.text
            finals.append(paused.json()["generation"])
        seen += list(source)
        for one, final in zip(ids, finals, strict=True):
            r = dst.post(f"/v1/generations/{one}/continue", {"state": final})
            assert r.status_code == 200, r.text
        afters = [list(t) for t in targets]
    assert sorted(e["choice"] for e in seen if e["event"] == "paused") == [0, 1]
    for i, after in enumerate(afters):
        assert {e["choice"] for e in after if e["event"] in ("token", "finish")} == {i}
        expected = reference["choices"][i]["tokens"]
        assert tokens_of(seen, i) + tokens_of(after, i) == expected
    assert reference["choices"][0]["tokens"] != reference["choices"][1]["tokens"]
