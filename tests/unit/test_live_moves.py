"""Moving every choice of a generation together, and the drain's mover: the gate that pauses
the choices together, the destination's streams read as one source, and which activations a
drain asks to move (each once)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from sllm.controller._live import Gate, interleaved
from sllm.controller._moving import MigrateAway, activation_of
from sllm.core.errors import PlatformError

A, B = "a" * 32, "b" * 32


def _stream(*events: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from events


def _token(choice: int, index: int) -> dict[str, Any]:
    return {"event": "token", "choice": choice, "index": index}


def test_the_destinations_streams_are_read_in_turn_with_one_done() -> None:
    zero = _stream(_token(0, 5), _token(0, 6), {"event": "finish", "choice": 0}, {"event": "done"})
    one = _stream(_token(1, 3), {"event": "finish", "choice": 1}, {"event": "done"})
    out = list(interleaved([zero, one]))
    assert [(e["event"], e.get("choice"), e.get("index")) for e in out] == [
        ("token", 0, 5),
        ("token", 1, 3),
        ("token", 0, 6),
        ("finish", 1, None),
        ("finish", 0, None),
        ("done", None, None),
    ]


def test_a_destination_stream_cut_short_ends_the_source_without_its_done() -> None:
    zero = _stream(_token(0, 5), {"event": "done"})
    one = _stream(_token(1, 3))  # no done: the invoker went away
    out = list(interleaved([zero, one]))
    assert [e["event"] for e in out] == ["token", "token"]  # the relay's loss path takes over


def test_the_gate_pauses_the_choices_together_and_never_waits_for_one_that_left() -> None:
    gate = Gate([0, 1, 2], timeout=5.0)
    passed: list[tuple[int, float]] = []

    def pause(choice: int) -> None:
        gate.arrive(choice)
        passed.append((choice, time.monotonic()))

    t0 = threading.Thread(target=pause, args=(0,))
    t0.start()
    time.sleep(0.2)
    assert passed == []  # 1 and 2 are still in their rounds
    gate.leave(2)  # 2's migration aborted (it finished on its source)
    time.sleep(0.1)
    assert passed == []
    began = time.monotonic()
    pause(1)
    t0.join(5)
    assert sorted(c for c, _ in passed) == [0, 1]
    assert all(at - began < 1.0 for _, at in passed)


def test_the_gate_is_bounded() -> None:
    gate = Gate([0, 1], timeout=0.2)
    began = time.monotonic()
    gate.arrive(0)  # 1 never comes
    assert 0.15 < time.monotonic() - began < 2.0


@pytest.mark.parametrize(
    ("generation", "activation"),
    [(A, A), (f"{A}.0", A), (f"{A}.12", A), ("g1", None), (f"{A}.x", None), (A.upper(), None)],
    ids=["n1", "choice0", "choice12", "foreign", "bad-suffix", "not-hex"],
)
def test_a_generation_id_names_its_activation(generation: str, activation: str | None) -> None:
    assert activation_of(generation) == activation


class _Requests:
    def __init__(self) -> None:
        self.asked: list[tuple[str, list[str]]] = []
        self.fail = False

    def drain(self, invoker: str, activation_ids: Sequence[str]) -> list[str]:
        if self.fail:
            raise PlatformError("invoker a does not answer")
        self.asked.append((invoker, list(activation_ids)))
        return list(activation_ids)


def test_a_drain_asks_once_per_activation_every_choice_included() -> None:
    requests = _Requests()
    mover = MigrateAway(requests)  # type: ignore[arg-type]
    mover.move_away("a", [f"{A}.0", f"{A}.1", "g-not-ours"], 0.0)
    assert requests.asked == [("a", [A])]
    mover.move_away("a", [f"{A}.0", f"{A}.1", B], 0.0)  # A is being moved: only B is new
    assert requests.asked == [("a", [A]), ("a", [B])]
    mover.move_away("a", [A, B], 0.0)  # still there (it could not move): the drain waits
    assert len(requests.asked) == 2


def test_an_invoker_that_does_not_answer_is_asked_again_at_the_next_pass() -> None:
    requests = _Requests()
    mover = MigrateAway(requests)  # type: ignore[arg-type]
    requests.fail = True
    mover.move_away("a", [A], 0.0)
    requests.fail = False
    mover.move_away("a", [A], 0.0)
    assert requests.asked == [("a", [A])]


def test_a_new_drain_of_the_invoker_asks_again() -> None:
    requests = _Requests()
    mover = MigrateAway(requests)  # type: ignore[arg-type]
    mover.move_away("a", [A], 100.0)
    mover.move_away("a", [A], 100.0)
    mover.move_away("a", [A], 250.0)  # undrained and drained again (or a new grace)
    assert requests.asked == [("a", [A]), ("a", [A])]
