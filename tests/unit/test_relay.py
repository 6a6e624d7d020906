"""The relay joins invoker streams by (choice, index): replays dropped, gaps refused, states
rebuilt from what was relayed, planned switches and losses handled as one case."""

from __future__ import annotations

from typing import Any

import pytest

from sllm.controller._relay import BadEvent, Relay, StreamGap

PROMPT = [5, 6, 7]


def start_state(choice: int, seed: int = 42) -> dict[str, Any]:
    """A start state as the invoker exports it (runtime/_sequence.py, start_state)."""
    return {
        "version": 1,
        "id": f"act.{choice}",
        "tokens": list(PROMPT),
        "prompt_len": len(PROMPT),
        "params": {"temperature": 1.0, "seed": seed, "max_tokens": 16},
        "sampler": {"seed": seed + choice},
        "text": {"sent": 0, "held": ""},
        "finished": False,
        "finish_reason": None,
    }


def start(n: int = 1, *, states: bool = True) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event": "start",
        "load": {"cold": True, "tier": "dram", "load_seconds": 0.5},
        "prompt_tokens": len(PROMPT),
        "n": n,
    }
    if states:
        event["states"] = [start_state(i) for i in range(n)]
    return event


def token(index: int, choice: int = 0, tok: int | None = None) -> dict[str, Any]:
    """Token `index` of `choice`: id 100 * choice + index, text "c<choice>t<index> "."""
    text = f"c{choice}t{index} "
    return {
        "event": "token",
        "choice": choice,
        "index": index,
        "token": 100 * choice + index if tok is None else tok,
        "text": text,
        "text_state": {"sent": index, "held": f"h{index}"},
    }


def finish(choice: int = 0, reason: str = "length") -> dict[str, Any]:
    return {"event": "finish", "choice": choice, "finish_reason": reason, "stop_reason": None}


def done(n: int = 1, tokens: int = 0) -> dict[str, Any]:
    return {
        "event": "done",
        "finish_reason": "length",
        "stop_reason": None,
        "usage": {"prompt_tokens": 3, "completion_tokens": tokens, "total_tokens": 3 + tokens},
        "timing": {"ttft_s": 0.1, "tpot_s": 0.01},
        "choices": [{"index": i, "finish_reason": "length", "stop_reason": None} for i in range(n)],
    }


def feed(relay: Relay, source: str, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for ev in events:
        out += relay.feed(source, ev)
    return out


def texts(events: list[dict[str, Any]], choice: int = 0) -> list[str]:
    return [e["text"] for e in events if e["event"] == "token" and e["choice"] == choice]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_one_source_passes_its_events_through_unchanged() -> None:
    relay = Relay()
    relay.attach("a#1")
    events = [start(), token(1), token(2), finish(), done(tokens=2)]

    out = feed(relay, "a#1", events)

    assert out == events
    assert relay.finished and relay.unfinished() == [] and relay.moves == []


def test_a_resume_continues_at_the_next_index_and_replays_are_dropped() -> None:
    relay = Relay()
    relay.attach("a#1")
    seen = feed(relay, "a#1", [start(), token(1), token(2), token(3)])
    assert relay.lost("a#1") == [0]
    assert relay.waiting() == [0]

    relay.attach("b#2", [0])
    resumed = {"event": "start", "n": 1, "states": [relay.state(0)], "resumed": 3}
    # A source that replays what was relayed (indexes 2 and 3) before going on.
    seen += feed(
        relay, "b#2", [resumed, token(2), token(3), token(4), token(5), finish(), done(tokens=5)]
    )

    assert texts(seen) == [f"c0t{i} " for i in range(1, 6)]  # no duplicate, no gap
    assert [e["event"] for e in seen].count("start") == 1
    assert seen[-1]["event"] == "done" and relay.finished
    assert seen[-1]["usage"]["completion_tokens"] == 5
    assert seen[-1]["choices"] == [{"index": 0, "finish_reason": "length", "stop_reason": None}]


@pytest.mark.parametrize(
    ("after", "jump"),
    [(0, 2), (3, 5), (3, 9)],
    ids=["first-token-missing", "one-missing", "several-missing"],
)
def test_an_index_jump_is_an_error_never_skipped(after: int, jump: int) -> None:
    relay = Relay()
    relay.attach("a#1")
    feed(relay, "a#1", [start(), *(token(i) for i in range(1, after + 1))])

    with pytest.raises(StreamGap, match=f"from token {after} to {jump}"):
        relay.feed("a#1", token(jump))

    assert relay.relayed(0) == after
    assert relay.state(0)["tokens"] == PROMPT + [i for i in range(1, after + 1)]


def test_states_are_rebuilt_per_choice_with_their_text_state() -> None:
    relay = Relay()
    relay.attach("a#1")
    feed(
        relay,
        "a#1",
        [start(n=3), token(1, 0), token(1, 1), token(2, 0), token(1, 2), token(2, 1), token(3, 0)],
    )
    feed(relay, "a#1", [finish(2, "eos")])  # choice 2 ended before the loss

    assert relay.lost("a#1") == [0, 1]
    zero, one = relay.state(0), relay.state(1)
    assert zero["tokens"] == [*PROMPT, 1, 2, 3]
    assert zero["text"] == {"sent": 3, "held": "h3"}  # the last relayed token's text state
    assert one["tokens"] == [*PROMPT, 101, 102]
    assert one["text"] == {"sent": 2, "held": "h2"}
    assert (zero["sampler"], one["sampler"]) == ({"seed": 42}, {"seed": 43})  # draws implied
    assert zero["prompt_len"] == len(PROMPT) and zero["params"]["seed"] == 42
    # The start state is not changed by a rebuild (a copy each time).
    zero["tokens"].append(999)
    assert relay.state(0)["tokens"] == [*PROMPT, 1, 2, 3]


def test_a_choice_with_no_token_yet_resumes_from_its_start_state() -> None:
    relay = Relay()
    relay.attach("a#1")
    feed(relay, "a#1", [start()])
    relay.lost("a#1")

    assert relay.state(0) == start_state(0)


def test_several_choices_resume_one_after_another_and_done_merges_them() -> None:
    clock = Clock()
    relay = Relay(clock)
    relay.attach("a#1")
    out = feed(relay, "a#1", [start(n=2), token(1, 0), token(1, 1), token(2, 0)])
    relay.lost("a#1")
    for c, source, upto in ((0, "b#2", 4), (1, "b#3", 3)):
        clock.now += 1.0
        relay.move("resume", c, "a", "b", "broken", at=1e9)
        relay.attach(source, [c])
        first = relay.relayed(c) + 1
        got = feed(relay, source, [{"event": "start", "n": 1, "states": [relay.state(c)]}])
        clock.now += 0.25
        got += feed(relay, source, [*(token(i, c) for i in range(first, upto + 1)), finish(c)])
        got += feed(relay, source, [done(tokens=upto)])
        out += got

    assert texts(out, 0) == ["c0t1 ", "c0t2 ", "c0t3 ", "c0t4 "]
    assert texts(out, 1) == ["c1t1 ", "c1t2 ", "c1t3 "]
    ends = [e for e in out if e["event"] == "done"]
    assert len(ends) == 1 and ends[0] is out[-1]  # one end, after the last choice ended
    assert ends[0]["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    assert [c["index"] for c in ends[0]["choices"]] == [0, 1]
    # Choice 1 waited while choice 0 finished: its pause is the longer one.
    assert [(m["choice"], m["tokens"], m["pause_ms"]) for m in relay.moves] == [
        (0, 2, 1250.0),
        (1, 1, 2500.0),
    ]


def test_a_planned_switch_is_the_same_join() -> None:
    """A migration: the old source pauses the choice, a new one continues it."""
    relay = Relay()
    relay.attach("s#1")
    out = feed(relay, "s#1", [start(), token(1), token(2)])
    paused = {**start_state(0), "tokens": [*PROMPT, 1, 2]}
    out += feed(
        relay,
        "s#1",
        [{"event": "paused", "choice": 0, "state": paused}, finish(0, "paused"), done(tokens=2)],
    )

    assert [e["event"] for e in out] == ["start", "token", "token"]  # the pause is not relayed
    assert not relay.finished and relay.waiting() == [0]
    assert relay.paused_state(0) == paused
    assert relay.state(0)["tokens"] == paused["tokens"]
    relay.attach("d#2", [0])
    out += feed(relay, "d#2", [start(states=False), token(3), finish(), done(tokens=3)])

    assert texts(out) == ["c0t1 ", "c0t2 ", "c0t3 "]
    assert out[-2]["finish_reason"] == "length" and out[-1]["event"] == "done"


def test_a_stale_source_is_ignored_once_another_owns_the_choice() -> None:
    relay = Relay()
    relay.attach("a#1")
    out = feed(relay, "a#1", [start(), token(1)])
    relay.lost("a#1")
    relay.attach("b#2", [0])
    out += feed(relay, "b#2", [token(2)])

    # The old source speaks again (a stalled invoker waking up): none of it is relayed.
    out += feed(relay, "a#1", [token(2, tok=777), token(3, tok=777), finish(), done()])

    assert texts(out) == ["c0t1 ", "c0t2 "]
    assert relay.unfinished() == [0] and not relay.finished


def test_a_resumed_stream_must_start_from_what_was_relayed() -> None:
    relay = Relay()
    relay.attach("a#1")
    feed(relay, "a#1", [start(), token(1), token(2)])
    relay.lost("a#1")
    relay.attach("b#2", [0])
    wrong = {**relay.state(0), "tokens": [*PROMPT, 1]}

    with pytest.raises(BadEvent, match="from 4 tokens, not the 5 relayed"):
        relay.feed("b#2", {"event": "start", "n": 1, "states": [wrong]})


@pytest.mark.parametrize(
    "event",
    [
        {"event": "token", "choice": 3, "index": 1, "token": 1, "text": "x"},
        {"event": "token", "choice": "0", "index": 1, "token": 1, "text": "x"},
        {"event": "token", "choice": 0, "token": 1, "text": "x"},
        {"event": "token", "choice": 0, "index": 1, "token": "1", "text": "x"},
        {"event": "finish", "choice": -1, "finish_reason": "length"},
    ],
    ids=["no-such-choice", "choice-not-int", "no-index", "token-not-int", "negative-choice"],
)
def test_events_it_cannot_place_are_errors(event: dict[str, Any]) -> None:
    relay = Relay()
    relay.attach("a#1")
    relay.feed("a#1", start(n=2))

    with pytest.raises(BadEvent):
        relay.feed("a#1", event)


def test_an_end_lost_with_its_stream_is_made_from_what_was_relayed() -> None:
    clock = Clock()
    relay = Relay(clock)
    relay.attach("a#1")
    feed(relay, "a#1", [start(n=2)])
    for i in (1, 2, 3):
        clock.now += 0.5
        feed(relay, "a#1", [token(i, 0), token(i, 1)])
    feed(relay, "a#1", [finish(0, "eos"), finish(1, "length")])

    assert relay.lost("a#1") == []  # both ended; the "done" never came
    end = relay.done_event()

    assert end["finish_reason"] == "eos"
    assert end["usage"]["completion_tokens"] == 6
    assert end["timing"]["tpot_s"] == pytest.approx(0.5)
    assert end["timing"]["load_s"] == 0.5
    assert relay.finished


def test_a_stream_without_start_states_cannot_be_resumed() -> None:
    relay = Relay()
    relay.attach("a#1")
    feed(relay, "a#1", [start(states=False), token(1)])
    relay.lost("a#1")

    assert not relay.resumable
    with pytest.raises(BadEvent, match="no start state"):
        relay.state(0)


def test_a_first_stream_replaced_before_its_start_is_forgotten() -> None:
    """Work that never started is dispatched again from scratch (execute's retry)."""
    relay = Relay()
    relay.attach("a#1")
    assert relay.lost("a#1") == [] and not relay.started
    relay.attach("b#2")

    out = feed(relay, "a#1", [start()]) + feed(relay, "b#2", [start(), token(1), finish()])
    out += feed(relay, "b#2", [done(tokens=1)])

    assert [e["event"] for e in out] == ["start", "token", "finish", "done"]
    assert out[-1] == done(tokens=1)  # one source: its own summary


def test_text_without_a_token_is_relayed_where_the_choice_stands() -> None:
    relay = Relay()
    relay.attach("a#1")
    feed(relay, "a#1", [start(), token(1), token(2)])
    flush = {"event": "token", "choice": 0, "index": 2, "token": None, "text": "!"}
    stale = {"event": "token", "choice": 0, "index": 1, "token": None, "text": "?"}

    assert relay.feed("a#1", flush) == [flush]
    assert relay.feed("a#1", stale) == []
    with pytest.raises(StreamGap):
        relay.feed("a#1", {**flush, "index": 4})
    assert relay.relayed(0) == 2
