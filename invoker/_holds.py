"""Migration targets: a held generation is prefilled in rounds, then continued from a final state.

Issue 12's token-based migration moves a running generation r from invoker S to invoker D
(the controller drives it; S keeps decoding until the last round):

    D  POST /v1/generations {state: S's state now, hold: true}   stream: start {"held": true}
    D  POST /v1/generations/{id}/prefill {tokens: S's tokens now}   repeated while S runs ahead
    S  POST /v1/generations/{id}/pause                               S's final state
    D  POST /v1/generations/{id}/continue {state: that final state}  D's stream: tokens, finish

Each round computes only what the target's KV cache does not hold yet, so the final round,
the one the client waits for, recomputes a few tokens however long the prompt is.

Worked example (prompt 100 tokens, batching instance): the hold comes with S's state at 20
generated tokens, 120 in all: D computes 119 (a batched prefill leaves the last token to the
first decode pass). Round 2 sends S's 135 tokens: 119 are reused, 15 computed (`cached` 134).
S is paused at 138: `continue` reuses 134 and reports `recomputed` 4, the 3 new tokens and
the one held back. A serial instance (`--no-batching`) caches every token it is sent, so
there the rounds compute 120, 15, then 3.

Answers (the HTTP layer maps the exceptions): 404 unknown id; 409 not held (running,
continued already, ended) or a concurrent call still under way; 400 for a bad body (naming
the field); a prefill not computed within its `wait` is a 202 with "pending": true: it goes
on, and a later round or the continue reuses whatever it computed by then.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping
from typing import Any

from sllm.core.errors import Conflict, InvalidRequest
from sllm.core.messages import require_object, show_value

from ._generations import Entry, Generations
from ._metrics import InvokerMetrics
from ._states import check_state

PREFILL_WAIT_S = 30.0  # default bound on a prefill call (a 4096-token round takes ~1 s on a GPU)
MAX_WAIT_S = 300.0
# A second call on one entry waits for the one under way (at most a prefill's wait).
CLAIM_WAIT_S = MAX_WAIT_S + 10.0


class Holds:
    """The prefill and continue calls on held generations."""

    def __init__(
        self, generations: Generations, metrics: InvokerMetrics, hold_timeout: float
    ) -> None:
        self._generations = generations
        self._metrics = metrics
        self._hold_timeout = hold_timeout

    def prefill(self, gen_id: str, body: Any) -> tuple[bool, dict[str, Any]]:
        """One round: the held generation's cache holds `tokens`; (computed in time, answer).

        Answer: {"id", "tokens": len(tokens), "cached": tokens the cache holds, "computed":
        tokens this round computed, "pending": whether it is still computing}.
        """
        doc = require_object(body)
        entry = self._generations.get(gen_id)
        tokens = _field_tokens(doc)
        wait = _field_wait(doc)
        began = time.perf_counter()
        with self._claim(entry):
            self._generations.check_held(entry, "prefill")
            _check_prompt(entry, tokens, "tokens")
            self._generations.touch(entry, self._hold_timeout)
            gen = entry.generation
            reused = gen.prefill(tokens)
            done = gen.wait_prefilled(wait)
            cached = gen.cached
            self._generations.touch(entry, self._hold_timeout)
        computed = max(0, cached - reused)
        self._metrics.migration_prefill_tokens.inc(computed)
        self._metrics.migration_prefill_seconds.observe(time.perf_counter() - began)
        return done, {
            "id": entry.id,
            "tokens": len(tokens),
            "cached": cached,
            "computed": computed,
            "pending": not done,
        }

    def continue_(self, gen_id: str, body: Any) -> dict[str, Any]:
        """The final round: load the final state and start decoding.

        Answer: {"id", "tokens": the state's token count, "recomputed": tokens not in the
        cache, computed now (the figure a migration records)}.
        """
        doc = require_object(body)
        entry = self._generations.get(gen_id)
        state = check_state(doc.get("state"))
        with self._claim(entry):
            self._generations.check_held(entry, "continue")
            _check_prompt(entry, state["tokens"], "state.tokens", state["prompt_len"])
            reused = entry.generation.load_state(state)
            if not self._generations.release(entry):
                raise Conflict(f"generation {entry.id!r} was cancelled while it was continued")
        recomputed = len(state["tokens"]) - reused
        self._metrics.migration_recomputed.observe(recomputed)
        return {"id": entry.id, "tokens": len(state["tokens"]), "recomputed": recomputed}

    @contextlib.contextmanager
    def _claim(self, entry: Entry) -> Iterator[None]:
        if not entry.hold_lock.acquire(timeout=CLAIM_WAIT_S):
            raise Conflict(f"another prefill or continue of generation {entry.id!r} is under way")
        try:
            yield
        finally:
            entry.hold_lock.release()


def held_prompt(state: Mapping[str, Any]) -> list[int]:
    """The prompt tokens of a (checked) state: what every later round must begin with."""
    return list(state["tokens"][: state["prompt_len"]])


def _check_prompt(
    entry: Entry, tokens: list[int], param: str, prompt_len: int | None = None
) -> None:
    """InvalidRequest unless `tokens` begin with the held generation's prompt."""
    prompt = entry.prompt
    same_len = prompt_len is None or prompt_len == len(prompt)
    if not same_len or tokens[: len(prompt)] != prompt:
        raise InvalidRequest(
            f"'{param}' must begin with the held generation's prompt (its {len(prompt)} tokens"
            + ("" if prompt_len is None else f", and 'state.prompt_len' {len(prompt)}")
            + "): a migration round carries the same generation's tokens",
            param=param,
        )


def _field_tokens(doc: Mapping[str, Any]) -> list[int]:
    """The body's "tokens": a non-empty list of token ids (the runtime checks the vocabulary)."""
    tokens = doc.get("tokens")
    if (
        not isinstance(tokens, list)
        or not tokens
        or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in tokens)
    ):
        raise InvalidRequest(
            "'tokens' must be a non-empty list of token ids (the prompt and the tokens "
            "generated so far)",
            param="tokens",
        )
    return tokens


def _field_wait(doc: Mapping[str, Any]) -> float:
    """How long a prefill call waits for its computation, in seconds (default PREFILL_WAIT_S)."""
    value = doc.get("wait", PREFILL_WAIT_S)
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0 <= value <= MAX_WAIT_S
    ):
        raise InvalidRequest(
            f"'wait' must be a number of seconds in [0, {MAX_WAIT_S:g}], got {show_value(value)}",
            param="wait",
        )
    return float(value)
