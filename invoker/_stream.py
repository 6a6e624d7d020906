"""The event stream of one invocation: its n generations multiplexed into one NDJSON stream.

Events (see interfaces.md, "Invoker wire events"):

    {"event": "start", "load", "prompt_tokens", "generation", "instance", "n"[, "resumed"]
                       [, "held"][, "states"]}
    {"event": "token", "choice", "index", "token", "text"[, "logprob", "top_logprobs"]
                       [, "text_state"]}
    {"event": "paused", "choice", "state"}            the choice was paused: its final state
    {"event": "finish", "choice", "finish_reason", "stop_reason"}   one per choice, at its end
    {"event": "done", "finish_reason", "stop_reason", "usage", "timing", "choices"}

`index` is the 1-based position of the token in its choice's output, counted
from the generation's start: a resumed generation continues from the number of
tokens its state had generated. A paused choice sends "paused" then its
"finish" with finish_reason "paused"; a cancelled one (DELETE, or the client
went away) a "finish" with finish_reason "cancelled". `usage` counts the whole
generations (resumed tokens included); `timing` this stream.

A held generation (a migration target, see _holds) sends its start event with
"held": true at once, then nothing until it is continued: then token events from
the final state's count + 1 on, as a resumed one. Cancelled or expired while held,
it sends its "cancelled" finish and done.

A `resumable` request (the controller's relay asks for it) gets what a resume needs
without asking the invoker again, which may be gone by then: "states" in the start
event (each choice's state at its start: prompt or resumed tokens, params, seed), and
"text_state" in each token event (the text stream after it). The state at token k is the
start state with the tokens relayed up to k appended and the k-th event's text_state as
its "text" (see runtime/_sequence.py, start_state).

The n generations are stepped round-robin from the stream's own thread: with
the serial runtime a step is one forward pass, with the batching engine
`step()` only waits for an event the engine thread already computes, so
either way the choices advance together and no extra thread is needed.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass
from typing import Any

from sllm.core.errors import SllmError
from sllm.core.messages import LoadReport

from ._generations import Entry, Generations
from ._metrics import InvokerMetrics


@dataclass
class _Choice:
    entry: Entry
    produced: int = 0  # tokens this stream produced
    generated: int = 0  # tokens the generation has produced in all (its last index)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    ended: bool = False


def token_event(choice: int, ev: Any, resumable: bool = False) -> dict[str, Any]:
    """The wire form of a TokenEvent that carries a token or text."""
    out: dict[str, Any] = {
        "event": "token",
        "choice": choice,
        "index": ev.index,
        "token": ev.token,
        "text": ev.text,
    }
    logprob = getattr(ev, "logprob", None)
    if logprob is not None:
        out["logprob"] = logprob
    top = getattr(ev, "top_logprobs", None)
    if top is not None:  # [token, logprob, text]: the controller has no tokenizer
        out["top_logprobs"] = [[int(t), float(lp), *rest] for t, lp, *rest in top]
    if getattr(ev, "token_text", None) is not None:
        out["token_text"] = ev.token_text
    if resumable and getattr(ev, "text_state", None) is not None:
        out["text_state"] = ev.text_state
    return out


def events(
    registry: Generations,
    entries: list[Entry],
    *,
    report: LoadReport,
    metrics: InvokerMetrics,
    prompt_tokens: int,
    received: float,
    gen_id: str,
    resumed: int | None = None,
    resumable: bool = False,
    held: bool = False,
) -> Generator[dict[str, Any], None, None]:
    """The stream of `entries` (choice entry.choice is entries[i]); ends them in the registry."""
    choices = [_Choice(e, generated=len(e.generation.generated)) for e in entries]
    first: float | None = None
    failed = False
    try:
        start: dict[str, Any] = {
            "event": "start",
            "load": report.to_json(),
            "prompt_tokens": prompt_tokens,
            "generation": gen_id,
            "instance": entries[0].instance,
            "n": len(entries),
        }
        if resumed is not None:
            start["resumed"] = resumed
        if held:
            start["held"] = True
        if resumable:
            start["states"] = [e.generation.start_state() for e in entries]
        yield start
        while not all(c.ended for c in choices):
            for c in choices:
                if c.ended:
                    continue
                for out in _step(registry, c.entry.choice, c, resumable):
                    if out["event"] == "token" and out["token"] is not None and first is None:
                        first = time.perf_counter()
                        label = report.tier if report.cold else "warm"
                        metrics.ttft.labels(label).observe(first - received)
                    yield out
        end = time.perf_counter()
        produced = [c.produced for c in choices]
        metrics.tokens.inc(sum(produced))
        steps = max(produced)
        completion = sum(c.generated for c in choices)
        lead = choices[0]
        yield {
            "event": "done",
            "finish_reason": lead.finish_reason,
            "stop_reason": lead.stop_reason,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": prompt_tokens + completion,
            },
            "timing": {
                "load_s": report.load_seconds,
                "ttft_s": (first or end) - received,
                "tpot_s": (end - first) / (steps - 1) if first and steps > 1 else 0.0,
                "total_s": end - received,
            },
            "choices": [
                {
                    "index": c.entry.choice,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                for c in choices
            ],
        }
    except GeneratorExit:  # the client went away: its choices count as cancelled
        raise
    except BaseException:
        failed = True
        raise
    finally:
        for c in choices:
            gen = c.entry.generation
            if not c.ended:  # an error, or the client went away (GeneratorExit)
                registry.end(c.entry, "failed" if failed else "cancelled", _safe_state(gen))
            gen.close()


def _step(registry: Generations, i: int, c: _Choice, resumable: bool) -> list[dict[str, Any]]:
    """One step of choice `i`: its token event (if any), and its ending events."""
    entry, gen = c.entry, c.entry.generation
    native_pause = getattr(gen, "pause", None) is not None
    if entry.held:  # a migration target: nothing to read until it is continued
        registry.wait_released(entry)
    with entry.step_lock:
        if entry.cancelled:
            return _ended(c, i, "cancelled", None)
        if entry.paused and not native_pause:  # the pause exported the state under this lock
            return _paused(registry, c, i)
        try:
            ev = gen.step()
        except SllmError:
            if entry.cancelled:  # closed by a cancel while stepping
                return _ended(c, i, "cancelled", None)
            raise
    out: list[dict[str, Any]] = []
    if ev.token is not None or ev.text:
        out.append(token_event(i, ev, resumable))
        if ev.token is not None:
            c.produced += 1
    c.generated = max(c.generated, ev.index)
    if ev.finished:
        reason = ev.finish_reason
        if entry.cancelled:
            return out + _ended(c, i, "cancelled", None)
        if reason == "paused" or entry.paused:
            return out + _paused(registry, c, i)
        registry.end(entry, "finished", _safe_state(gen))
        out += _ended(c, i, reason, getattr(ev, "stop_reason", None))
    return out


def _paused(registry: Generations, c: _Choice, i: int) -> list[dict[str, Any]]:
    entry = c.entry
    state = entry.final if entry.final is not None else entry.generation.export_state()
    registry.end(entry, "paused", state)
    return [{"event": "paused", "choice": i, "state": state}, *_ended(c, i, "paused", None)]


def _ended(c: _Choice, i: int, reason: str | None, stop: str | int | None) -> list[dict[str, Any]]:
    c.ended, c.finish_reason, c.stop_reason = True, reason, stop
    return [{"event": "finish", "choice": i, "finish_reason": reason, "stop_reason": stop}]


def _safe_state(gen: Any) -> dict[str, Any] | None:
    """The generation's state, or None when it cannot say (closed, unloaded)."""
    try:
        state = gen.export_state()
    except SllmError:
        return None
    return state if isinstance(state, dict) else None


def collect(stream: Generator[dict[str, Any], None, None]) -> dict[str, Any]:
    """A whole invocation as one JSON document (the non-stream answer of /v1/invoke).

    Top-level text / tokens / finish_reason are choice 0's, as before n existed.
    """
    out: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}

    def choice(i: int) -> dict[str, Any]:
        return choices.setdefault(
            i, {"index": i, "text": "", "tokens": [], "finish_reason": None, "stop_reason": None}
        )

    for ev in stream:
        kind = ev["event"]
        if kind == "start":
            out.update(load=ev["load"], generation=ev["generation"], instance=ev["instance"])
        elif kind == "token":
            c = choice(ev.get("choice", 0))
            c["text"] += ev["text"]
            if ev["token"] is not None:
                c["tokens"].append(ev["token"])
                if "logprob" in ev:
                    c.setdefault("logprobs", []).append(
                        {
                            "token": ev["token"],
                            "logprob": ev["logprob"],
                            "top_logprobs": ev.get("top_logprobs"),
                        }
                    )
        elif kind == "paused":
            choice(ev["choice"])["state"] = ev["state"]
        elif kind == "finish":
            choice(ev["choice"]).update(
                finish_reason=ev["finish_reason"], stop_reason=ev["stop_reason"]
            )
        elif kind == "done":
            out.update(
                finish_reason=ev["finish_reason"],
                stop_reason=ev["stop_reason"],
                usage=ev["usage"],
                timing=ev["timing"],
            )
    ordered = [choices[i] for i in sorted(choices)] or [choice(0)]
    out.update(text=ordered[0]["text"], tokens=ordered[0]["tokens"], choices=ordered)
    return out
