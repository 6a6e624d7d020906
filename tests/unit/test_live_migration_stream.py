"""GenerationStream.migrate with n = 2 against a scripted pair of invokers: S decodes both
choices a token per step and pauses a choice when asked; D holds each choice and continues
it from S's final state. Every choice still running moves to D together, the client's
stream stays whole (no duplicate, no gap, one done), a choice that finished on S, before
or during the migration, stays finished, and S dying during the switch loses nothing."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sllm.controller._activations import Run
from sllm.controller._choices import Choices
from sllm.controller._config import ControllerConfig
from sllm.controller._dispatch import Slot
from sllm.controller._invokers import InvokerLost
from sllm.controller._metrics import ControllerMetrics
from sllm.controller._resume import GenerationStream
from sllm.core.errors import Conflict
from sllm.db import Function

PROMPT = [1, 2, 3]
STEP_S = 0.01
S = Slot(1, 1, "a", "http://a", cold=False, loading=False)
D = Slot(2, 2, "b", "http://b", cold=True, loading=True)


def _state(generated: list[int], finished: bool = False) -> dict[str, Any]:
    return {"tokens": PROMPT + generated, "prompt_len": len(PROMPT), "params": {},
            "sampler": {"seed": 7}, "text": {}, "finished": finished}  # fmt: skip


def _token(choice: int, k: int) -> dict[str, Any]:
    return {"event": "token", "choice": choice, "index": k, "token": 100 * choice + k,
            "text": f"{choice}:{k} ", "text_state": {}}  # fmt: skip


class Pair:
    """S and D as the controller's InvokerClient sees them. Choice c ends at index
    `ends[c]`; the migration is asked once choice 0 reached `move_at` on S."""

    def __init__(
        self, ends: list[int], move_at: int, prefill_s: float = 0.0, dies: str | None = None
    ) -> None:
        self.ends, self.move_at, self.prefill_s = ends, move_at, prefill_s
        # S dies (kill -9) "after-pause": once every choice paused, before its "done";
        # "in-pause": while pausing, with its last token made but never sent
        self.dies = dies
        self.resumed: list[dict[str, Any]] = []  # resume bodies (a third invoker, c)
        self.cond = threading.Condition()
        self.made: list[list[int]] = [[] for _ in ends]  # tokens generated on S
        self.ended: dict[int, str] = {}  # choice -> "length" | "paused" on S
        self.pausing: set[int] = set()
        self.finals: dict[int, dict[str, Any]] = {}  # continued on D
        self.paused_at: dict[int, float] = {}
        self.holds: list[int] = []
        self.cancelled: list[str] = []
        self.gen: GenerationStream | None = None
        self.mover: threading.Thread | None = None

    # -- the InvokerClient calls
    def stream(self, url: str, body: dict[str, Any], timeout: float, *, path: str = "/v1/invoke",
               stall: float | None = None) -> Iterator[dict[str, Any]]:  # fmt: skip
        if url == S.url:
            return self._source()
        if url == "http://c":
            self.resumed.append(body)
            return self._resumed(body)
        n = len(self.ends)
        assert body["activation"] == ("act1" if n == 1 else f"act1.{body['choice']}"), body
        assert body["hold"] is True, body
        self.holds.append(body["choice"])
        return self._held(body["choice"])

    def get(self, url: str, path: str, timeout: float) -> tuple[str, bytes]:
        assert url == S.url
        c = self._choice(path)
        with self.cond:
            state = _state(list(self.made[c]), finished=self.ended.get(c) == "length")
        return "application/json", json.dumps({"generation": state}).encode()

    def call(self, url: str, path: str, body: dict[str, Any], timeout: float) -> Any:
        c = self._choice(path)
        if path.endswith("/prefill"):
            time.sleep(self.prefill_s)
            return {"cached": len(body["tokens"])}
        if path.endswith("/pause"):
            with self.cond:
                if c in self.ended:
                    raise Conflict(f"generation act1.{c} has finished")
                self.pausing.add(c)
                self.paused_at[c] = time.monotonic()
                self.cond.wait_for(lambda: c in self.ended, 5)
                return {"generation": _state(list(self.made[c]))}
        assert path.endswith("/continue"), path
        with self.cond:
            self.finals[c] = body["state"]
            self.cond.notify_all()
        return {"recomputed": 1}

    def cancel(self, url: str, generation: str, timeout: float) -> None:
        self.cancelled.append(generation)

    # -- the invokers' streams
    def _source(self) -> Iterator[dict[str, Any]]:
        n = len(self.ends)
        yield {"event": "start", "load": {"cold": False}, "prompt_tokens": 3, "n": n,
               "states": [_state([]) for _ in range(n)]}  # fmt: skip
        while True:
            out: list[dict[str, Any]] = []
            with self.cond:
                for c in range(n):
                    if c in self.ended:
                        continue
                    if c in self.pausing:
                        if self.dies == "in-pause":
                            self.made[c].append(100 * c + len(self.made[c]) + 1)
                            self.ended[c] = "paused"
                            self.cond.notify_all()
                            raise InvokerLost("invoker a broke the stream", reason="broken")
                        self.ended[c] = "paused"
                        out.append({"event": "paused", "choice": c})
                        out.append({"event": "finish", "choice": c, "finish_reason": "paused"})
                        continue
                    k = len(self.made[c]) + 1
                    self.made[c].append(100 * c + k)
                    out.append(_token(c, k))
                    if k == self.ends[c]:
                        self.ended[c] = "length"
                        out.append({"event": "finish", "choice": c, "finish_reason": "length"})
                self.cond.notify_all()
                left = len(self.ended) < n
            yield from out
            if len(self.made[0]) == self.move_at and self.mover is None:
                assert self.gen is not None
                self.mover = threading.Thread(target=self.gen.migrate, args=(None, "api", 10))
                self.mover.start()
            if not left and self.dies == "after-pause":
                raise InvokerLost("invoker a broke the stream", reason="broken")
            if not left:
                yield {"event": "done", "usage": {"prompt_tokens": 3}, "timing": {}}
                return
            time.sleep(STEP_S)

    def _held(self, c: int) -> Iterator[dict[str, Any]]:
        yield {"event": "start", "held": True}
        with self.cond:
            assert self.cond.wait_for(lambda: c in self.finals, 10), f"choice {c} not continued"
            k = len(self.finals[c]["tokens"]) - len(PROMPT)
        for i in range(k + 1, self.ends[c] + 1):
            yield _token(c, i)
        yield {"event": "finish", "choice": c, "finish_reason": "length"}
        yield {"event": "done", "usage": {}, "timing": {}}

    def _resumed(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        c = body["choice"]
        k = len(body["state"]["tokens"]) - len(PROMPT)
        yield {"event": "start", "load": {"cold": False}, "n": 1, "states": [body["state"]]}
        for i in range(k + 1, self.ends[c] + 1):
            yield _token(c, i)
        yield {"event": "finish", "choice": c, "finish_reason": "length"}
        yield {"event": "done", "usage": {}, "timing": {}}

    @staticmethod
    def _choice(path: str) -> int:
        gen_id = path.split("/")[3]
        assert gen_id == "act1" or gen_id.startswith("act1."), path
        return int(gen_id.split(".")[1]) if "." in gen_id else 0


class Dispatcher:
    def __init__(self) -> None:
        self.freed: list[str] = []
        self.dropped: list[str] = []
        self.avoided: list[list[int]] = []

    def acquire(self, fn: Any, until: float, avoid: list[int], *, bounded: bool) -> Slot:
        self.avoided.append(list(avoid))
        return Slot(3, 3, "c", "http://c", cold=False, loading=False)

    def heard_from(self, invoker_id: int, since: float) -> bool:
        return False

    def migration_slot(self, fn: Any, source: int, to: int | None) -> Slot:
        return D

    def loaded(self, slot: Slot, tier: Any, load_ms: Any) -> None:
        pass

    def free(self, slot: Slot) -> None:
        self.freed.append(slot.invoker)

    def drop(self, slot: Slot) -> None:
        self.dropped.append(slot.invoker)


def run(pair: Pair) -> tuple[list[dict[str, Any]], GenerationStream, Dispatcher]:
    dispatcher = Dispatcher()
    fn = Function(
        id=1, namespace_id=1, name="f", model="m", task="generate", timeout_s=60.0,
        concurrency=4, version=1, on_invoker_loss="resume",
    )  # fmt: skip
    gen = GenerationStream(
        config=ControllerConfig(internal_token="t"),
        invokers=pair,  # type: ignore[arg-type]
        dispatcher=dispatcher,  # type: ignore[arg-type]
        metrics=ControllerMetrics(),
        run=Run(
            id="act1",
            namespace_id=1,
            namespace="ns",
            function="f",
            function_version=1,
            model="m",
            task="generate",
            request={},
            blocking=False,
            stream=True,
        ),
        fn=fn,
        text=Choices(),
        refresh=lambda: fn,
    )
    pair.gen = gen
    events = list(gen.events(S, {"prompt": "x"}, time.monotonic() + 30))
    if pair.mover is not None:
        pair.mover.join(10)
    return events, gen, dispatcher


def _whole(events: list[dict[str, Any]], ends: list[int]) -> None:
    kinds = [e["event"] for e in events]
    assert kinds.count("start") == 1 and kinds.count("done") == 1 and kinds[-1] == "done"
    for c, end in enumerate(ends):
        mine = [e for e in events if e["event"] == "token" and e["choice"] == c]
        assert [e["index"] for e in mine] == list(range(1, end + 1)), c
        assert [e["token"] for e in mine] == [100 * c + k for k in range(1, end + 1)], c
    finishes = [e for e in events if e["event"] == "finish"]
    assert sorted(e["choice"] for e in finishes) == list(range(len(ends)))
    assert all(e["finish_reason"] == "length" for e in finishes)
    assert events[-1]["usage"]["completion_tokens"] == sum(ends)


def test_both_choices_move_to_one_destination_paused_together() -> None:
    pair = Pair([40, 40], move_at=5)
    events, gen, dispatcher = run(pair)
    _whole(events, [40, 40])
    assert sorted(pair.holds) == [0, 1]
    moves = sorted(gen.relay.moves, key=lambda m: m["choice"])
    assert [(m["choice"], m["kind"], m["from"], m["to"], m["outcome"]) for m in moves] == [
        (0, "migrate", "a", "b", "moved"),
        (1, "migrate", "a", "b", "moved"),
    ]
    # The gate: the two pauses were asked together, so the choices stopped side by side.
    assert abs(pair.paused_at[0] - pair.paused_at[1]) < 0.5
    assert abs(len(pair.made[0]) - len(pair.made[1])) <= 1
    assert gen.slot == D and dispatcher.freed == ["a"] and dispatcher.dropped == []
    assert gen.run.moves is gen.relay.moves and pair.cancelled == []


def test_a_choice_that_finished_before_the_migration_stays_finished() -> None:
    pair = Pair([40, 3], move_at=5)
    events, gen, _ = run(pair)
    _whole(events, [40, 3])
    assert pair.holds == [0]  # choice 1 had ended: nothing of it moves
    assert [(m["choice"], m["outcome"]) for m in gen.relay.moves] == [(0, "moved")]


def test_a_choice_that_finishes_during_the_rounds_stays_finished_and_the_other_moves() -> None:
    # Each round takes 0.1 s (ten steps of S): choice 1 ends at 12, in the first round.
    pair = Pair([60, 12], move_at=5, prefill_s=0.1)
    events, gen, _ = run(pair)
    _whole(events, [60, 12])
    moves = {m["choice"]: m for m in gen.relay.moves}
    assert moves[0]["outcome"] == "moved" and moves[0]["to"] == "b"
    assert moves[1]["outcome"] == "aborted" and "finished" in moves[1]["error"]
    assert "act1.1" in pair.cancelled  # its held copy on D was dropped
    assert pair.ended[1] == "length"


@pytest.mark.parametrize("ends", [[40], [40, 40]], ids=["n1", "n2"])
def test_the_source_dying_after_the_pause_still_switches_to_the_destination(
    ends: list[int],
) -> None:
    """S paused every choice, then died before its "done" (the paused choices were owned
    by nobody, so the loss left nothing waiting and the stream failed with a ValueError)."""
    pair = Pair(ends, move_at=5, dies="after-pause")
    events, gen, dispatcher = run(pair)
    _whole(events, ends)
    moves = sorted(gen.relay.moves, key=lambda m: m["choice"])
    assert [(m["kind"], m["to"], m["outcome"]) for m in moves] == [("migrate", "b", "moved")] * len(
        ends
    )
    assert pair.resumed == [] and gen.slot == D
    assert dispatcher.dropped == ["a"]  # lost: its instance is forgotten


def test_the_source_dying_with_its_last_token_unsent_resumes_from_what_was_relayed() -> None:
    """S made a token after the last one relayed, then died: D's copy (which goes on
    after that token) is not joined, which would skip it; the choice resumes elsewhere."""
    pair = Pair([40], move_at=5, dies="in-pause")
    events, gen, dispatcher = run(pair)
    _whole(events, [40])
    assert [(m["kind"], m["from"], m["to"], m.get("outcome")) for m in gen.relay.moves] == [
        ("migrate", "a", "b", "failed"),
        ("resume", "a", "c", None),
    ]
    assert "act1" in pair.cancelled  # D's copy is dropped
    relayed = len(pair.made[0]) - 1
    assert len(pair.resumed[0]["state"]["tokens"]) == len(PROMPT) + relayed
    assert dispatcher.avoided == [[1]]
