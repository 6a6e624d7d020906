"""The invoker's generation registry without a model: ids, states, retention, pause and cancel."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from sllm.core.errors import Conflict, InvalidRequest, NotFound
from sllm.invoker._generations import Generations, generation_id


class FakeGeneration:
    """What the registry uses of a Generation (the serial runtime's: no pause())."""

    def __init__(self, generated: int = 3) -> None:
        self.generated = list(range(generated))
        self.finished = False
        self.closed = False

    def export_state(self) -> dict[str, Any]:
        return {"tokens": [9, *self.generated], "prompt_len": 1}

    def close(self) -> None:
        self.closed = True


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_ids_come_from_the_activation_else_the_state_else_fresh() -> None:
    assert generation_id({"activation": "abc123"}, "other") == "abc123"
    assert generation_id({}, "from-state") == "from-state"
    fresh = generation_id({}, None)
    assert len(fresh) == 32 and fresh != generation_id({}, None)
    with pytest.raises(InvalidRequest, match="activation"):
        generation_id({"activation": "../etc"})


def test_ended_generations_stay_readable_for_a_while() -> None:
    clock = Clock()
    reg = Generations(retain_s=60.0, clock=clock)
    entry = reg.register("g1", "i1", "a/f", FakeGeneration())
    assert reg.listing()[0] == {
        "id": "g1",
        "instance": "i1",
        "function": "a/f",
        "choice": 0,
        "tokens": 3,
        "state": "running",
    }
    reg.end(entry, "finished", {"tokens": [9, 1, 2], "prompt_len": 1})
    assert reg.get("g1").export()["state"] == "finished"
    assert reg.get("g1").tokens() == 2
    clock.now += 61.0
    with pytest.raises(NotFound):
        reg.get("g1")


def test_retention_is_bounded_in_count() -> None:
    reg = Generations(retain_count=2, clock=Clock())
    for i in range(4):
        reg.end(reg.register(f"g{i}", "i", "a/f", FakeGeneration()), "finished", None)
    assert [g["id"] for g in reg.listing()] == ["g2", "g3"]


def test_one_running_generation_per_id() -> None:
    reg = Generations(clock=Clock())
    entry = reg.register("g", "i", "a/f", FakeGeneration())
    with pytest.raises(Conflict):
        reg.register("g", "i", "a/f", FakeGeneration())
    reg.end(entry, "paused", None)
    assert reg.register("g", "i", "a/f", FakeGeneration()).state == "running"  # resumed here


def test_pause_and_cancel_once() -> None:
    reg = Generations(clock=Clock())
    gen = FakeGeneration()
    reg.register("p", "i", "a/f", gen)
    paused = reg.pause("p")
    assert paused.state == "paused" and paused.final == gen.export_state()
    with pytest.raises(Conflict, match="paused"):
        reg.pause("p")
    with pytest.raises(Conflict, match="paused"):
        reg.cancel("p")
    other = FakeGeneration()
    reg.register("c", "i", "a/f", other)
    assert reg.cancel("c").state == "cancelled" and other.closed
    with pytest.raises(Conflict, match="cancelled"):
        reg.cancel("c")
    with pytest.raises(NotFound):
        reg.pause("nope")


def test_a_generation_that_already_finished_cannot_be_paused() -> None:
    reg = Generations(clock=Clock())
    gen = FakeGeneration()
    reg.register("f", "i", "a/f", gen)
    gen.finished = True  # its last step ran; the stream has not ended it yet
    with pytest.raises(Conflict, match="finished"):
        reg.pause("f")


def test_a_runtime_pause_is_used_when_the_generation_has_one() -> None:
    class Pausable(FakeGeneration):
        def pause(self) -> dict[str, Any]:
            self.finished = True
            return {"tokens": [9, 0], "prompt_len": 1, "finish_reason": "paused"}

    reg = Generations(clock=Clock())
    reg.register("n", "i", "a/f", Pausable())
    assert reg.pause("n").final == {"tokens": [9, 0], "prompt_len": 1, "finish_reason": "paused"}


def wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return bool(predicate())


def test_a_held_generation_is_cancelled_when_its_hold_runs_out() -> None:
    clock = Clock()
    reg = Generations(clock=clock)
    expired: list[int] = []
    reg.on_expire = lambda: expired.append(1)
    gen = FakeGeneration()
    entry = reg.register("h", "i", "a/f", gen, held=([9], 0.05))
    assert entry.live_state() == "held" and reg.listing()[0]["state"] == "held"
    with pytest.raises(Conflict, match="held"):
        reg.pause("h")

    clock.now += 1.0  # past its deadline when the timer looks

    assert wait_for(lambda: entry.state == "cancelled")
    assert gen.closed and expired == [1]
    with pytest.raises(Conflict, match="cancelled"):
        reg.check_held(entry, "continue")


def test_a_migration_call_restarts_the_hold_and_a_continue_ends_it() -> None:
    clock = Clock()
    reg = Generations(clock=clock)
    entry = reg.register("h", "i", "a/f", FakeGeneration(), held=([9], 0.05))
    reg.touch(entry, 10.0)  # a prefill round: ten more (fake) seconds

    time.sleep(0.2)  # the timer looked, found time left, and looks again later

    assert entry.live_state() == "held" and entry.timer is not None
    reg.check_held(entry, "prefill")
    assert reg.release(entry) and entry.live_state() == "running" and entry.timer is None
    with pytest.raises(Conflict, match="continued already"):
        reg.check_held(entry, "continue")
    reg.register("r", "i", "a/f", FakeGeneration())
    with pytest.raises(Conflict, match="not held"):
        reg.check_held(reg.get("r"), "prefill")


def test_a_held_stream_waits_until_released_or_cancelled() -> None:
    reg = Generations(clock=Clock())
    entry = reg.register("h", "i", "a/f", FakeGeneration(), held=([9], 60.0))
    waiter = threading.Thread(target=reg.wait_released, args=(entry,))
    waiter.start()
    time.sleep(0.1)
    assert waiter.is_alive()

    reg.cancel("h")

    waiter.join(timeout=5)
    assert not waiter.is_alive() and entry.cancelled
