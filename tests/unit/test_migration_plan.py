"""The migration's round decision and its orchestration over a fake wire (no processes)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest

from sllm.controller._invokers import InvokerLost
from sllm.controller._migration import Migration, RoundPolicy, next_move
from sllm.core.errors import Conflict

PROMPT = list(range(100, 110))


@pytest.mark.parametrize(
    ("new", "rounds", "elapsed", "expected"),
    [
        (20, 1, 0.7, "round"),
        (1, 2, 0.8, "final"),
        (4, 1, 0.1, "round"),  # at the threshold: one more round
        (3, 1, 0.1, "final"),
        (30, 4, 5.0, "final"),  # rounds used up
        (30, 2, 200.0, "abort"),  # past the deadline with rounds still wanted
        (0, 9, 999.0, "final"),  # nothing new: switch, whatever the clock
    ],
)
def test_next_move(new: int, rounds: int, elapsed: float, expected: str) -> None:
    assert next_move(new, rounds, elapsed, RoundPolicy(threshold=4, max_rounds=4)) == expected


@pytest.mark.parametrize(
    ("max_rounds", "expected"),
    [(4, "round"), (1, "round"), (0, "final")],
    ids=["live", "one-round", "stop-and-recompute"],
)
def test_before_any_round_only_zero_rounds_go_straight_to_the_switch(
    max_rounds: int, expected: str
) -> None:
    assert next_move(0, 0, 0.0, RoundPolicy(threshold=4, max_rounds=max_rounds)) == expected


class FakeWire:
    """S generates `per_round[i]` tokens while round i runs on D; calls are logged."""

    def __init__(self, per_round: list[int], *, fail: str | None = None) -> None:
        self.tokens = [*PROMPT, 1, 2, 3]  # three generated when the migration begins
        self.per_round = list(per_round)
        self.fail = fail
        self.calls: list[str] = []
        self.held: list[int] = []
        self.paused = False
        self.finished = False

    def _maybe_fail(self, name: str) -> None:
        self.calls.append(name)
        if self.fail == name:
            raise InvokerLost(f"{name} failed")

    def state(self, url: str, gen_id: str) -> dict[str, Any]:
        self._maybe_fail("state")
        return {
            "tokens": list(self.tokens),
            "prompt_len": len(PROMPT),
            "finished": self.finished,
        }

    def hold(self, url: str, state: dict[str, Any], choice: int) -> Iterator[dict[str, Any]]:
        self._maybe_fail("hold")
        assert url == "http://d" and choice == 0

        def events() -> Iterator[dict[str, Any]]:
            yield {"event": "start"}

        return events()

    def prefill(self, url: str, gen_id: str, tokens: list[int]) -> int:
        self._maybe_fail("prefill")
        assert tokens[: len(self.held)] == self.held  # only ever extends
        self.held = list(tokens)
        # S decodes while D computes this round.
        for _ in range(self.per_round.pop(0) if self.per_round else 0):
            self.tokens.append(len(self.tokens))
        return len(tokens)

    def pause(self, url: str, gen_id: str) -> dict[str, Any]:
        self._maybe_fail("pause")
        if self.finished:
            raise Conflict("already finished")
        self.paused = True
        return {"tokens": list(self.tokens), "prompt_len": len(PROMPT)}

    def resume(self, url: str, gen_id: str, state: dict[str, Any]) -> int:
        self._maybe_fail("resume")
        recomputed = len(state["tokens"]) - len(self.held)
        self.held = list(state["tokens"])
        return recomputed

    def cancel(self, url: str, gen_id: str) -> None:
        self.calls.append("cancel")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.1
        return self.now


def migration(wire: FakeWire, **policy: Any) -> Migration:
    return Migration(
        wire,
        "gen-1",
        0,
        source="s",
        dest="d",
        source_url="http://s",
        dest_url="http://d",
        reason="api",
        policy=RoundPolicy(**{"threshold": 4, "max_rounds": 4, **policy}),
        clock=Clock(),
        wall=lambda: 1_000.0,
    )


def test_rounds_shrink_what_the_final_round_recomputes() -> None:
    wire = FakeWire([20, 1])
    out = migration(wire).run()

    assert out.moved and out.events is not None and out.final is None
    assert next(out.events) == {"event": "start"}  # D's stream, handed to the relay
    record = out.record
    assert record["outcome"] == "moved" and record["rounds"] == 2
    # Round 1: prompt + 3 generated; round 2: the 20 made meanwhile; final: the 1 after.
    assert record["tokens_recomputed"] == len(PROMPT) + 3 + 20 + 1
    assert wire.held == wire.tokens and wire.paused
    assert record["tokens"] == 3 + 20 + 1
    assert {"from": "s", "to": "d", "kind": "migrate", "reason": "api"}.items() <= record.items()
    assert record["switch_ms"] >= 0 and record["total_ms"] >= record["switch_ms"]
    assert wire.calls.count("pause") == 1 and "cancel" not in wire.calls


def test_the_round_limit_ends_the_rounds() -> None:
    wire = FakeWire([30, 30, 30, 30, 30])
    out = migration(wire, max_rounds=3).run()
    assert out.moved and out.record["rounds"] == 3


def test_a_migration_past_its_deadline_is_aborted_and_the_source_goes_on() -> None:
    wire = FakeWire([30] * 10)
    out = migration(wire, deadline_s=0.25, max_rounds=10).run()
    assert not out.moved and out.record["outcome"] == "aborted"
    assert "deadline" in out.record["error"]
    assert not wire.paused and "cancel" in wire.calls


@pytest.mark.parametrize("step", ["state", "hold", "prefill", "pause"])
def test_a_failure_before_the_switch_aborts_and_the_source_goes_on(step: str) -> None:
    wire = FakeWire([20, 1], fail=step)
    out = migration(wire).run()

    assert not out.moved and out.events is None and out.final is None
    assert out.record["outcome"] == "aborted" and f"{step} failed" in out.record["error"]
    assert not wire.paused
    # D's held copy is dropped once it exists.
    assert ("cancel" in wire.calls) == (step in ("prefill", "pause"))


def test_a_generation_that_finishes_on_its_source_is_not_moved() -> None:
    wire = FakeWire([20, 1])
    original = wire.prefill

    def prefill_then_finish(url: str, gen_id: str, tokens: list[int]) -> int:
        wire.finished = True
        return original(url, gen_id, tokens)

    wire.prefill = prefill_then_finish  # type: ignore[method-assign]
    out = migration(wire).run()
    assert not out.moved and "finished" in out.record["error"]
    assert not wire.paused and "cancel" in wire.calls


def test_when_the_destination_fails_after_the_pause_the_final_state_is_handed_back() -> None:
    wire = FakeWire([20, 1], fail="resume")
    out = migration(wire).run()

    assert not out.moved and out.record["outcome"] == "failed"
    assert out.final is not None and out.final["tokens"] == wire.tokens  # the relay resumes it
    assert wire.paused


def test_stop_and_recompute_pauses_first_and_the_destination_prefills_everything() -> None:
    wire = FakeWire([])
    out = migration(wire, max_rounds=0).run()

    assert out.moved and out.events is not None and out.record["rounds"] == 0
    # No round while S decodes: S pauses before D is even asked to hold the generation.
    assert wire.calls == ["pause", "hold", "prefill", "resume"]
    assert out.record["tokens_recomputed"] == len(PROMPT) + 3  # the whole sequence
    assert wire.held == wire.tokens and out.record["tokens"] == 3


def test_stop_and_recompute_hands_the_final_state_back_when_the_destination_fails() -> None:
    wire = FakeWire([], fail="prefill")
    out = migration(wire, max_rounds=0).run()

    assert not out.moved and out.record["outcome"] == "failed"
    assert out.final is not None and out.final["tokens"] == wire.tokens and wire.paused


def test_meet_comes_before_the_pause_and_is_not_counted_in_the_switch() -> None:
    """The choices of one generation meet before their final rounds (controller/_live.py);
    S still decodes while one waits there, so the wait is no part of the switch."""
    wire = FakeWire([20, 1])
    clock = Clock()
    met: list[list[str]] = []

    def meet() -> None:
        met.append(list(wire.calls))
        clock.now += 5.0  # waited for the other choices

    out = replace(migration(wire), meet=meet, clock=clock).run()
    assert out.moved and met == [["state", "hold", "prefill", "state", "prefill", "state"]]
    assert out.record["switch_ms"] < 1000 < out.record["total_ms"]
