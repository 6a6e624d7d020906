"""A generation stepped on its caller's thread with its own KV cache (`batching=False`).

This is the runtime before continuous batching, kept for models whose cache the batcher
cannot lay out in rows (sliding windows, non-standard caches) and as the benchmark's
baseline. Forward passes of concurrent generations take the engine's lock, so they
interleave token by token.

States / data / events:

    running  --step: eos, max_tokens or stop string-->  finished  --close-->  closed
    running  --prefill(tokens)-->  running (a migration round: the cache holds the tokens)
    running  --load_state(state)-->  running | finished
    running  --pause-->  paused (state exported)

data: tokens (prompt + generated), the KV cache of tokens[:cached], pending logits for the
next token (after a prefill), the sampler and the text stream. Everything but the cache is
exported by `export_state`; the cache is recomputed from the tokens (`prefill`).
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import torch
from transformers import Cache

from sllm.core.errors import Conflict

from ._engine import Engine, Slot
from ._generation import check_length, new_id, parse_state, restore
from ._params import SamplingParams
from ._sequence import STATE_VERSION, TokenEvent, next_event, start_state
from ._text import TextStream


class SerialGeneration:
    """A generation holding a concurrency slot and its own KV cache; close it when done."""

    def __init__(
        self,
        engine: Engine,
        slot: Slot | None,
        *,
        prompt_len: int,
        params: SamplingParams,
        gen_id: str | None = None,
    ) -> None:
        self._engine = engine
        self._slot = slot
        # A generation dropped without close() must not keep its slot forever.
        self._finalizer = weakref.finalize(self, slot.release) if slot is not None else None
        self._lock = threading.RLock()
        self.prompt_len = prompt_len
        self.params = params
        self.tokens: list[int] = []
        self.finished = False
        self.finish_reason: str | None = None
        self._closed = False
        self._sampler = engine.sampler(params)
        self._text = TextStream.after(params.stop, prompt_len, prompt_len)
        self._cache: Cache | None = None
        self._cached = 0  # tokens[:_cached] are in the cache
        self._logits: torch.Tensor | None = None  # next-token logits, when a prefill left them
        self.id = gen_id or new_id()
        self.stop_reason: str | int | None = None
        # start_state(): what the prefill or state before the first step left.
        self._stepped = False
        self._start_len = 0
        self._start_text = self._text.to_json()

    @property
    def generated(self) -> list[int]:
        """The generated tokens (everything after the prompt)."""
        return self.tokens[self.prompt_len :]

    @property
    def cached(self) -> int:
        """Tokens whose keys and values the cache holds."""
        return self._cached if self._cache is not None else 0

    def prefill(self, tokens: list[int]) -> int:
        """Make the KV cache hold exactly `tokens` (prompt + generated so far); continue from there.

        Tokens past the prompt count as generated and their text as released. When the cache
        already holds a prefix of `tokens` only the rest is computed (later migration rounds);
        returns how many tokens it held. Whether the tokens end the generation is not settled
        here: a migration target learns that from the final state (`load_state`).
        """
        with self._lock:
            self._check_open(running=True)
            tokens = self._engine.check_tokens(tokens)
            check_length(self._engine, len(tokens), self.prompt_len, self.params)
            reused = self._fill(tokens, settle=False)
            done = len(tokens) - self.prompt_len
            if not self.params.greedy and self._sampler.draws != done:
                self._sampler = self._engine.sampler(self.params, seed=self._sampler.seed)
                self._sampler.advance(done)
            self._text = TextStream.after(self.params.stop, len(tokens), self.prompt_len)
            self._mark_start()
            return reused

    def wait_prefilled(self, timeout: float | None) -> bool:
        """Always true: `prefill` computes on the caller's thread before it returns."""
        self._check_open()
        return True

    def _mark_start(self) -> None:
        if not self._stepped:
            self._start_len, self._start_text = len(self.tokens), self._text.to_json()

    def step(self, timeout: float | None = None) -> TokenEvent:
        """Sample and append the next token; after the end, a finished event with no token."""
        with self._lock:
            if self.finished:
                n = len(self.generated)
                return TokenEvent(None, "", n, True, self.finish_reason, self.stop_reason)
            self._check_open()
            self._stepped = True
            logits = self._logits if self._logits is not None else self._extend()
            pick = self._sampler.sample(logits, self.tokens, self.prompt_len)
            self._logits = None
            event = next_event(
                pick,
                self.tokens,
                self.prompt_len,
                self.params,
                self._sampler,
                self._text,
                self._engine.tokenizer,
                self._engine.eos,
            )
            if event.finish_reason is not None:
                self.stop_reason = event.stop_reason
                self._finish(event.finish_reason)
            return event

    @property
    def state(self) -> str:
        """running, finished, paused or cancelled."""
        if self.finish_reason == "paused":
            return "paused"
        if self.finished:
            return "finished"
        return "cancelled" if self._closed else "running"

    def pause(self) -> dict[str, Any]:
        """Stop; the final state. The next step reports the end with reason "paused"."""
        with self._lock:
            self._check_open(running=True)
            state = self.export_state()
            self._finish("paused")
            return state

    def start_state(self) -> dict[str, Any]:
        """The state it started from (the prompt, or the state it resumed)."""
        with self._lock:
            return start_state(
                self.id,
                self.tokens[: self._start_len],
                self.prompt_len,
                self.params,
                self._sampler.seed,
                self._start_text,
            )

    def export_state(self) -> dict[str, Any]:
        """Everything needed to resume elsewhere, as JSON: tokens, params, sampler, text stream."""
        with self._lock:
            return {
                "version": STATE_VERSION,
                "id": self.id,
                "tokens": list(self.tokens),
                "prompt_len": self.prompt_len,
                "params": self.params.to_json(),
                "sampler": self._sampler.to_json(),
                "text": self._text.to_json(),
                "finished": self.finished,
                "finish_reason": self.finish_reason,
                "remaining_tokens": 0
                if self.finished
                else self.params.max_tokens - len(self.generated),
            }

    def load_state(self, state: Mapping[str, Any]) -> int:
        """Continue exactly where `export_state` left off (the final round of a migration).

        Returns how many of the state's tokens the cache already held (not recomputed).
        """
        with self._lock:
            self._check_open(running=True)
            parsed = parse_state(state, self._engine)
            tokens, prompt_len, params = parsed.tokens, parsed.prompt_len, parsed.params
            check_length(self._engine, len(tokens), prompt_len, params)
            # Parse everything before computing anything: a bad state changes nothing.
            sampler, stream = restore(parsed, state, self._engine)
            self.prompt_len, self.params = prompt_len, params
            if parsed.finish_reason is None:
                reused = self._fill(tokens)
            else:
                self.tokens, reused = tokens, len(tokens)
                self._finish(parsed.finish_reason)
            self._sampler, self._text = sampler, stream
            self._mark_start()
            return reused

    def close(self) -> None:
        """Release the slot and the KV cache; calling it again does nothing."""
        with self._lock:
            self._closed = True
            self._cache = self._logits = None
            self._release_slot()

    def __enter__(self) -> SerialGeneration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -------------------------------------------------------------------------

    def _check_open(self, *, running: bool = False) -> None:
        if self._closed:
            raise Conflict("the generation was closed")
        if running and self.finished:
            raise Conflict(f"the generation already finished ({self.finish_reason})")

    def _fill(self, tokens: list[int], *, settle: bool = True) -> int:
        """Compute the cache for `tokens`, reusing a cached prefix; the tokens reused.

        With `settle`, whether the tokens end the generation is settled too (its finish
        state). Tokens the cache holds whole, with the next logits pending (a held target
        whose final state brought nothing new), are not computed again.
        """
        cached = self._cached if self._cache is not None else 0
        whole = cached == len(tokens) and self._logits is not None and tokens == self.tokens
        if not whole and not (0 < cached < len(tokens) and tokens[:cached] == self.tokens[:cached]):
            self._cache, cached = None, 0  # let go of the old cache before building a new one
        pending = self._logits if whole else None
        self.tokens, self._logits = tokens, None
        self.finished, self.finish_reason = False, None
        reason = self._end_reason() if settle else None
        if reason is not None:
            self._finish(reason)
            return cached
        self._logits = pending if pending is not None else self._extend()
        return cached

    def _extend(self) -> torch.Tensor:
        """Run the tokens the cache does not hold yet through the model; the next-token logits.

        A forward pass that fails may have grown the cache part way: it is dropped, so a
        later step recomputes it from the tokens instead of reading a torn cache.
        """
        cache, cached = self._cache, self._cached
        if cache is None or not cached:
            cache, cached = self._engine.new_cache(), 0
        self._cache, self._cached = None, 0
        logits, self._cache = self._engine.forward(self.tokens[cached:], cache)
        self._cached = len(self.tokens)
        return logits

    def _end_reason(self) -> str | None:
        generated = len(self.tokens) - self.prompt_len
        if generated > 0 and self.tokens[-1] in self._engine.eos and not self.params.ignore_eos:
            return "eos"
        if generated >= self.params.max_tokens:
            return "length"
        if generated > 0 and self._sampler.grammar_done:
            return "stop"
        return None

    def _finish(self, reason: str) -> None:
        self.finished, self.finish_reason = True, reason
        # A finished generation computes nothing more: free its memory and slot now.
        self._cache = self._logits = None
        self._cached = 0
        self._release_slot()

    def _release_slot(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # calls slot.release() once, then detaches
