"""The controller's pure decisions: reconciling instance rows with a heartbeat, prewarm backoff."""

from __future__ import annotations

from typing import Any

import pytest

from sllm.controller._prewarm import BACKOFF_CAP_S, backoff
from sllm.controller._reconcile import Row, held_instances, reconcile

NOW = 1000.0
STALE = NOW - 20.0


def _row(i: int, function: str, state: str = "ready", in_flight: int = 0, age: float = 1.0) -> Row:
    return Row(i, function, state, in_flight, NOW - age)


# rows, reported instances, expected (forget, unload)
RECONCILE: dict[
    str, tuple[list[Row], list[dict[str, Any]], tuple[tuple[int, ...], tuple[str, ...]]]
] = {
    "in step": ([_row(1, "a/f")], [{"function": "a/f", "active": 0}], ((), ())),
    "idle row not held: forgotten": ([_row(1, "a/f")], [], ((1,), ())),
    "busy row not held: kept": ([_row(1, "a/f", in_flight=1)], [], ((), ())),
    "young load not held: kept": ([_row(1, "a/f", "loading")], [], ((), ())),
    "old load not held: forgotten": ([_row(1, "a/f", "loading", age=60)], [], ((1,), ())),
    "held idle without a row: unloaded": ([], [{"function": "a/g", "active": 0}], ((), ("a/g",))),
    "held busy without a row: later": ([], [{"function": "a/g", "active": 2}], ((), ())),
    "loading without a row: later": ([], [{"function": "a/g", "loading": True}], ((), ())),
    "unloading row held: kept": (
        [_row(1, "a/f", "unloading")],
        [{"function": "a/f", "active": 0}],
        ((), ()),
    ),
    "held by id: in step": (
        [_row(1, "a/f")],
        [{"instance": "1", "function": "a/f", "active": 0}],
        ((), ()),
    ),
    "a second instance of a function without a row: unloaded by id": (
        [_row(1, "a/f")],
        [{"instance": "1", "function": "a/f"}, {"instance": "7", "function": "a/f"}],
        ((), ("7",)),
    ),
    "row not held under its id: forgotten": (
        [_row(1, "a/f")],
        [{"instance": "2", "function": "a/f", "active": 1}],
        ((1,), ()),
    ),
    "an id named like a function is still an id": (
        [_row(1, "a/f")],
        [{"instance": "1", "function": "a/f"}, {"instance": "a/f", "function": "a/f"}],
        ((), ("a/f",)),
    ),
    "both ways at once": (
        [_row(1, "a/f"), _row(2, "a/h")],
        [{"function": "a/h"}, {"function": "b/x", "active": 0}, {"function": "a/g"}],
        ((1,), ("a/g", "b/x")),
    ),
}


@pytest.mark.parametrize(("rows", "held", "expected"), RECONCILE.values(), ids=RECONCILE.keys())
def test_reconcile(
    rows: list[Row],
    held: list[dict[str, Any]],
    expected: tuple[tuple[int, ...], tuple[str, ...]],
) -> None:
    decision = reconcile(rows, held_instances({"instances": held}), stale_before=STALE)
    assert (decision.forget, decision.unload) == expected


def test_malformed_reports_are_skipped() -> None:
    held = held_instances(
        {"instances": [None, 3, {"function": 7}, {"function": "a/f", "active": "many"}]}
    )
    assert list(held) == ["a/f"] and held["a/f"].active == 0


@pytest.mark.parametrize(
    ("failures", "wait"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, BACKOFF_CAP_S), (10_000, BACKOFF_CAP_S)],
    ids=["first", "second", "third", "ninth", "capped", "huge"],
)
def test_backoff_doubles_up_to_the_cap(failures: int, wait: float) -> None:
    assert backoff(failures) == wait
