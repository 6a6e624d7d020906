"""A resumable generation outlives its reader (invoker/_feed.py) on real invoker processes:
it runs on when the reader leaves, a later reader gets its whole stream from the start
event, and one nobody reads again is cancelled after the detach grace."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from tests.support.invoker import InvokerProcess
from tests.support.migration import (
    MAX_TOKENS,
    SHORT_DETACH_S,
    body,
    listed,
    read_more,
    streaming,
    tokens_of,
)
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.invoker]


def attach(proc: InvokerProcess, gen_id: str) -> list[dict[str, Any]]:
    """Every event `GET /v1/generations/{id}/events` sends, to its end."""
    with proc.client() as client, client.stream("GET", f"/v1/generations/{gen_id}/events") as r:
        assert r.status_code == 200, r.read()
        return [json.loads(line) for line in r.iter_lines() if line]


def full_run(proc: InvokerProcess, doc: dict[str, Any]) -> list[dict[str, Any]]:
    with streaming(proc, "/v1/invoke", doc) as events:
        return list(events)


@pytest.mark.parametrize("source", ["slow", "serial"])
def test_a_generation_runs_on_after_its_reader_leaves_and_a_new_reader_gets_all_of_it(
    migration_invokers: dict[str, InvokerProcess], source: str
) -> None:
    proc = migration_invokers[source]
    doc = body(temperature=0, resumable=True)
    reference = full_run(migration_invokers["fast"], doc)
    gen_id = uuid.uuid4().hex
    seen: list[dict[str, Any]] = []
    with streaming(proc, "/v1/invoke", {**doc, "activation": gen_id}) as events:
        read_more(events, seen, 3)
    # The reader left after 3 tokens: the generation goes on without it.
    at_leave = listed(proc, gen_id)["tokens"]
    wait_until(lambda: listed(proc, gen_id)["tokens"] >= at_leave + 3, 10, "decoding on")
    assert listed(proc, gen_id)["state"] == "running"
    rest = attach(proc, gen_id)
    assert rest[0]["event"] == "start" and rest[0]["states"][0]["tokens"], rest[0]
    assert [e["index"] for e in rest if e["event"] == "token"] == list(range(1, MAX_TOKENS + 1))
    assert tokens_of(rest) == tokens_of(reference)
    assert all("text_state" in e for e in rest if e["event"] == "token")
    assert [e["event"] for e in rest[-2:]] == ["finish", "done"]
    assert rest[-2]["finish_reason"] == "length"
    assert listed(proc, gen_id)["state"] == "finished"
    # An ended generation's stream can still be read while its entry is kept.
    assert tokens_of(attach(proc, gen_id)) == tokens_of(reference)


def test_two_readers_at_once_read_the_same_stream(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    proc = migration_invokers["slow"]
    doc = body(temperature=0, resumable=True)
    gen_id = uuid.uuid4().hex
    with streaming(proc, "/v1/invoke", {**doc, "activation": gen_id}) as events:
        seen: list[dict[str, Any]] = []
        read_more(events, seen, 2)
        second = attach(proc, gen_id)  # reads to the end while the first reader waits
        seen += list(events)
    assert tokens_of(second) == tokens_of(seen)
    assert len(tokens_of(seen)) == MAX_TOKENS


def test_a_detached_generation_nobody_reads_is_cancelled_after_the_grace(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    proc = migration_invokers["short"]  # --detach-grace 2 s
    doc = body(temperature=0, resumable=True, max_tokens=100)  # 10 s of decoding
    gen_id = uuid.uuid4().hex
    with streaming(proc, "/v1/invoke", {**doc, "activation": gen_id}) as events:
        read_more(events, [], 2)
    left = time.monotonic()
    assert listed(proc, gen_id)["state"] == "running"
    wait_until(
        lambda: listed(proc, gen_id)["state"] == "cancelled",
        SHORT_DETACH_S + 10,
        "the detached generation cancelled",
    )
    assert time.monotonic() - left >= SHORT_DETACH_S - 0.5
    wait_until(lambda: proc.client().get("/v1/status").json()["instances"], 5, "status")


def test_a_reader_that_attaches_within_the_grace_keeps_it_running(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    proc = migration_invokers["short"]
    doc = body(temperature=0, resumable=True)
    gen_id = uuid.uuid4().hex
    with streaming(proc, "/v1/invoke", {**doc, "activation": gen_id}) as events:
        read_more(events, [], 2)
    time.sleep(SHORT_DETACH_S / 2)
    rest = attach(proc, gen_id)
    assert len(tokens_of(rest)) == MAX_TOKENS and rest[-1]["event"] == "done"


def test_events_of_a_generation_that_is_not_resumable_or_unknown_are_refused(
    migration_invokers: dict[str, InvokerProcess],
) -> None:
    proc = migration_invokers["fast"]
    gen_id = uuid.uuid4().hex
    with streaming(proc, "/v1/invoke", {**body(temperature=0), "activation": gen_id}) as events:
        read_more(events, [], 1)
        r = proc.client().get(f"/v1/generations/{gen_id}/events")
        assert r.status_code == 409 and "resumable" in r.json()["error"]["message"], r.text
    r = proc.client().get(f"/v1/generations/{uuid.uuid4().hex}/events")
    assert r.status_code == 404, r.text
