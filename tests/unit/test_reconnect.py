"""Event ids and reconnect progress (controller/_reconnect.py), and which invoker streams a
reconnect reads (controller/_attach.py plan_attach)."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from controller._attach import Found, plan_attach
from controller._reconnect import Progress, missing, parse_event_id, parse_from
from sllm.core.errors import Conflict, InvalidRequest

ACT = "3f" * 16


def token(choice: int, index: int) -> dict[str, object]:
    return {"event": "token", "choice": choice, "index": index, "token": 7, "text": "x"}


def test_an_event_id_says_how_far_the_client_is_per_choice() -> None:
    p = Progress(ACT)
    assert p.event_id() == f"{ACT}:0"
    p.see(token(0, 1))
    p.see(token(0, 2))
    assert p.event_id() == f"{ACT}:2"
    p.start(2)
    p.see(token(1, 1))
    assert p.event_id() == f"{ACT}:2.1"
    p.see({"event": "finish", "choice": 0})
    assert p.event_id() == f"{ACT}:2.1"
    assert parse_event_id(p.event_id()) == (ACT, {0: 2, 1: 1})


def test_a_reconnected_progress_goes_on_from_what_the_client_had() -> None:
    p = Progress(ACT, {0: 9})
    p.see(token(0, 10))
    assert p.event_id() == f"{ACT}:10"


def test_missing_drops_the_tokens_the_client_has_and_keeps_the_rest() -> None:
    events = [{"event": "start"}, token(0, 1), token(1, 1), token(0, 2), {"event": "done"}]
    kept = list(missing(iter(events), {0: 1, 1: 0}))
    assert kept == [{"event": "start"}, token(1, 1), token(0, 2), {"event": "done"}]


@pytest.mark.parametrize(
    "value",
    ["", "abc", f"{ACT}", f"{ACT}:", f"{ACT}:x", f"{ACT[:-1]}:1", f"{ACT}:1..2", f"{ACT}:-1"],
)
def test_a_bad_last_event_id_is_a_400_naming_the_header(value: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_event_id(value)
    assert e.value.param == "Last-Event-ID"


@pytest.mark.parametrize("value", ["", "a", "1.", "1e3", "9" * 10])
def test_a_bad_from_is_a_400(value: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        parse_from(value)
    assert e.value.param == "from"


def found(name: str, state: str, tokens: int) -> Found:
    return Found(name, 1, f"http://{name}", state, tokens, "1", "ns/f")


def test_the_plan_replays_ended_streams_oldest_first_then_follows_the_running_one() -> None:
    s, d, x = found("s", "paused", 20), found("d", "running", 25), found("x", "held", 18)
    old = found("o", "paused", 5)
    plan = plan_attach([d, x, s, old], ACT)
    assert plan.replays == [old, s] and plan.live == d and plan.stale == [x]


def test_the_plan_for_a_finished_generation_replays_up_to_its_end() -> None:
    s, d = found("s", "paused", 20), found("d", "finished", 60)
    plan = plan_attach([d, s], ACT)
    assert plan.replays == [s, d] and plan.live is None


def test_the_plan_for_a_generation_paused_with_nothing_running_replays_it_to_resume() -> None:
    s, x = found("s", "paused", 20), found("x", "held", 18)
    plan = plan_attach([s, x], ACT)
    assert plan.replays == [s] and plan.live is None and plan.stale == [x]


def test_a_generation_nobody_came_back_for_is_a_conflict() -> None:
    with pytest.raises(Conflict) as e:
        plan_attach([found("s", "cancelled", 12)], ACT)
    assert "cancelled on s" in e.value.message


def test_a_held_start_is_skipped_after_the_relay_started_and_refused_before() -> None:
    from controller._resume import _skip_held_start

    def stream() -> Generator[dict[str, Any], None, None]:
        yield {"event": "start", "held": True, "states": [{"tokens": [1], "prompt_len": 1}]}
        yield token(0, 9)

    assert list(_skip_held_start(stream(), True)) == [token(0, 9)]
    with pytest.raises(Conflict) as e:
        list(_skip_held_start(stream(), False))
    assert "over a minute ago" in e.value.message
