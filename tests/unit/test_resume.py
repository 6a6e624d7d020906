"""GenerationStream's decisions with scripted invoker streams and a fake dispatcher: what is
resumed where, what a loss does to the slot, and where resuming stops (attempts, opt-out)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sllm.controller._activations import Run
from sllm.controller._choices import Choices
from sllm.controller._config import ControllerConfig
from sllm.controller._dispatch import Slot
from sllm.controller._invokers import InvokerLost
from sllm.controller._metrics import ControllerMetrics
from sllm.controller._resume import GenerationStream, TimedOut
from sllm.core.errors import Overloaded
from sllm.db import Function

PROMPT = [1, 2, 3]
Script = Callable[[dict[str, Any]], Iterator[dict[str, Any]]]


def state(generated: list[int]) -> dict[str, Any]:
    return {
        "tokens": PROMPT + generated,
        "prompt_len": len(PROMPT),
        "params": {},
        "sampler": {"seed": 7},
        "text": {},
    }


def generation(
    upto: int, *, lose_after: int | None = None, error: Exception | None = None
) -> Script:
    """A stream of one choice from where the request's state stands up to token `upto`
    (token k has id 10 + k); InvokerLost after `lose_after`, or `error` before the start."""

    def script(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        if error is not None:
            raise error
        done = len(body["state"]["tokens"]) - len(PROMPT) if "state" in body else 0
        yield {"event": "start", "load": {"cold": False}, "prompt_tokens": 3, "n": 1,
               "states": [body.get("state") or state([])]}  # fmt: skip
        for k in range(done + 1, upto + 1):
            if lose_after is not None and k > lose_after:
                raise InvokerLost("invoker broke the stream: reset", reason=body["_reason"])
            yield {"event": "token", "choice": 0, "index": k, "token": 10 + k, "text": f"{k} ",
                   "text_state": {"sent": k}}  # fmt: skip
        yield {"event": "finish", "choice": 0, "finish_reason": "length", "stop_reason": None}
        yield {"event": "done", "finish_reason": "length", "stop_reason": None,
               "usage": {"prompt_tokens": 3, "completion_tokens": upto}, "timing": {}}  # fmt: skip

    return script


class Invokers:
    """Scripted streams, one per call in order; every call and cancel recorded."""

    def __init__(self, scripts: list[Script], reason: str = "broken") -> None:
        self.scripts = scripts
        self.calls: list[tuple[str, str, dict[str, Any]]] = []
        self.cancelled: list[tuple[str, str]] = []
        self.reason = reason

    def stream(
        self, url: str, body: dict[str, Any], timeout: float, *, path: str = "/v1/invoke",
        stall: float | None = None,
    ) -> Iterator[dict[str, Any]]:  # fmt: skip
        self.calls.append((url, path, body))
        script = self.scripts.pop(0)
        return script({**body, "_reason": self.reason})

    def cancel(self, url: str, generation: str, timeout: float) -> None:
        self.cancelled.append((url, generation))


class Dispatcher:
    """Slots on invokers b, c, d ... in turn; what was dropped, freed and avoided."""

    def __init__(self) -> None:
        self.acquired: list[list[int]] = []
        self.dropped: list[str] = []
        self.freed: list[str] = []
        self._next = 1

    def acquire(self, fn: Any, until: float, avoid: list[int], *, bounded: bool) -> Slot:
        self.acquired.append(list(avoid))
        self._next += 1
        name = "abcdefgh"[self._next - 1]
        return Slot(self._next, self._next, name, f"http://{name}", cold=False, loading=False)

    def heard_from(self, invoker_id: int, since: float) -> bool:
        return False

    def loaded(self, slot: Slot, tier: Any, load_ms: Any) -> None:
        pass

    def drop(self, slot: Slot) -> None:
        self.dropped.append(slot.invoker)

    def free(self, slot: Slot) -> None:
        self.freed.append(slot.invoker)


FIRST = Slot(1, 1, "a", "http://a", cold=False, loading=False)


def run_stream(
    scripts: list[Script],
    *,
    attempts: int = 3,
    on_loss: str = "resume",
    reason: str = "broken",
    limit_s: float = 60.0,
) -> tuple[list[dict[str, Any]], GenerationStream, Invokers, Dispatcher, Exception | None]:
    invokers, dispatcher = Invokers(scripts, reason), Dispatcher()
    run = Run(
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
    )
    fn = Function(
        id=1, namespace_id=1, name="f", model="m", task="generate", timeout_s=60.0,
        concurrency=4, version=1, on_invoker_loss=on_loss,
    )  # fmt: skip
    gen = GenerationStream(
        config=ControllerConfig(internal_token="t", resume_attempts=attempts),
        invokers=invokers,  # type: ignore[arg-type]
        dispatcher=dispatcher,  # type: ignore[arg-type]
        metrics=ControllerMetrics(),
        run=run,
        fn=fn,
        text=Choices(),
        refresh=lambda: fn,
    )
    events: list[dict[str, Any]] = []
    error: Exception | None = None
    deadline = time.monotonic() + limit_s
    try:
        for ev in gen.events(FIRST, {"prompt": "x", "activation": "act1"}, deadline):
            events.append(ev)
    except (InvokerLost, TimedOut) as exc:
        error = exc
    return events, gen, invokers, dispatcher, error


def tokens(events: list[dict[str, Any]]) -> list[int]:
    return [e["index"] for e in events if e["event"] == "token"]


def resumes(gen: GenerationStream, outcome: str) -> float:
    value = gen.metrics.registry.get_sample_value("sllm_resumes_total", {"outcome": outcome})
    return value or 0.0


def test_a_broken_stream_resumes_elsewhere_from_the_relayed_state() -> None:
    events, gen, invokers, dispatcher, error = run_stream(
        [generation(6, lose_after=3), generation(6)]
    )

    assert error is None and tokens(events) == [1, 2, 3, 4, 5, 6]
    assert events[-1]["event"] == "done" and gen.run.status == "success"
    (_, first_path, first), (url, path, body) = invokers.calls
    assert first_path == "/v1/invoke" and first["resumable"] is True
    assert (url, path) == ("http://b", "/v1/generations")
    assert body["state"]["tokens"] == [*PROMPT, 11, 12, 13] and body["choice"] == 0
    assert body["activation"] == "act1" and body["resumable"] is True
    assert body["instance"] == "2" and body["function"] == "ns/f"
    assert dispatcher.dropped == ["a"] and dispatcher.acquired == [[1]]  # avoiding a
    [move] = gen.run.moves
    assert (move["from"], move["to"], move["tokens"], move["reason"]) == ("a", "b", 3, "broken")
    assert gen.run.attempts == 1 and gen.run.invoker == "b" and gen.slot == dispatcher_slot("b")
    assert gen.run.columns()["migrations"] == 1
    assert resumes(gen, "resumed") == 1


def dispatcher_slot(name: str) -> Slot:
    n = "abcdefgh".index(name) + 1
    return Slot(n, n, name, f"http://{name}", cold=False, loading=False)


def test_resumes_stop_after_the_attempts_per_choice() -> None:
    dead = generation(6, error=InvokerLost("refused", reason="unreachable"))
    events, gen, _invokers, dispatcher, error = run_stream(
        [generation(6, lose_after=2), dead, dead], attempts=2
    )

    assert isinstance(error, InvokerLost)
    assert "invoker c was lost at token 2 (unreachable); resumed 2 time(s), the limit" in str(error)
    assert tokens(events) == [1, 2]
    assert [m["to"] for m in gen.run.moves] == ["b", "c"]
    assert all(m["pause_ms"] is None for m in gen.run.moves)  # the client saw nothing after
    assert dispatcher.dropped == ["a", "b", "c"] and gen.slot is None
    assert resumes(gen, "failed") == 2 and resumes(gen, "exhausted") == 1
    assert dispatcher.acquired == [[1], [1, 2]]  # each lost invoker avoided in turn


def test_a_function_that_opts_out_is_not_resumed() -> None:
    events, gen, _invokers, dispatcher, error = run_stream(
        [generation(6, lose_after=4)], on_loss="fail"
    )

    assert isinstance(error, InvokerLost) and "does not resume" in str(error)
    assert tokens(events) == [1, 2, 3, 4]
    assert dispatcher.acquired == [] and gen.run.moves == []
    assert resumes(gen, "refused") == 1


def test_a_full_destination_costs_no_attempt() -> None:
    full = generation(6, error=Overloaded("full"))
    events, gen, _invokers, dispatcher, error = run_stream(
        [generation(6, lose_after=1), full, full, generation(6)], attempts=1
    )

    assert error is None and tokens(events) == [1, 2, 3, 4, 5, 6]
    assert dispatcher.freed == ["b", "c"]  # answered: their instances stay
    assert [m["to"] for m in gen.run.moves] == ["b", "c", "d"]


def test_a_stalled_source_is_cancelled_and_forgotten() -> None:
    events, gen, invokers, dispatcher, error = run_stream(
        [generation(5, lose_after=2), generation(5)], reason="stalled"
    )

    assert error is None and tokens(events) == [1, 2, 3, 4, 5]
    assert dispatcher.dropped == ["a"]
    deadline = time.monotonic() + 5
    while not invokers.cancelled and time.monotonic() < deadline:  # a background thread
        time.sleep(0.01)
    assert invokers.cancelled == [("http://a", "act1")]
    assert gen.run.moves[0]["reason"] == "stalled"


def test_a_loss_before_the_start_is_left_to_the_dispatch_retry() -> None:
    lost = generation(6, error=InvokerLost("refused", reason="unreachable"))
    events, gen, _invokers, dispatcher, error = run_stream([lost])

    assert isinstance(error, InvokerLost) and not gen.started
    assert events == [] and dispatcher.acquired == [] and dispatcher.dropped == []


@pytest.mark.parametrize("upto", [0, 3], ids=["at-the-start", "mid-way"])
def test_a_stream_that_ends_without_its_end_is_a_loss(upto: int) -> None:
    def cut(body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for ev in generation(6)(body):
            if ev["event"] == "token" and ev["index"] > upto:
                return
            yield ev

    events, gen, _invokers, _dispatcher, error = run_stream([cut, generation(6)])

    assert error is None and tokens(events) == [1, 2, 3, 4, 5, 6]
    assert gen.run.moves[0]["tokens"] == upto


def test_a_stream_ended_by_its_time_limit_is_cancelled_on_its_invoker() -> None:
    """Only a client that goes away leaves a generation running (for a reconnect): the
    controller ending the stream itself stops it where it runs."""
    _, _, invokers, _, error = run_stream([generation(50)], limit_s=0.0)

    assert isinstance(error, TimedOut)
    deadline = time.monotonic() + 5
    while not invokers.cancelled and time.monotonic() < deadline:  # a background thread
        time.sleep(0.01)
    assert invokers.cancelled == [("http://a", "act1")]
