"""One generation's data inside the batcher: tokens, sampler, text stream, KV row, events.

States / data / events (the batcher thread makes every transition):

    waiting --admit--> prefilling --cache holds tokens[:-1]--> decoding --end--> finished
    decoding --preempt (KV budget)--> waiting (cache dropped, recomputed from the tokens)
    prefilling | decoding --hold--> held (prefilled, not decoding: a migration target)
    any --pause--> paused (state exported) ; any --cancel--> cancelled ; any --fail--> failed

data: tokens (prompt + generated), `cached` (tokens[:cached] are in the KV row), the row,
the sampler (seed, draws, RNG, penalties, grammar) and the text stream (held-back text).
A decoding sequence always has cached == len(tokens) - 1: the step feeds its last token.
Events go to the handle's queue; the handle's reader takes them at its own pace.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from sllm.core.errors import SllmError

from ._params import SamplingParams
from ._sampling import Pick, Sampler
from ._text import TextStream

FINISH_REASONS = ("length", "stop", "eos")
STATE_VERSION = 1
LIVE = ("waiting", "prefilling", "decoding", "held")


@dataclass(frozen=True)
class TokenEvent:
    """What one step produced: the token, the text it releases, and whether that was the end.

    `index` counts the generated tokens so far; `stop_reason` is the stop string matched or
    the eos token id (vLLM's field); logprobs are set when the request asked for them.
    """

    token: int | None
    text: str
    index: int
    finished: bool
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float, str]] | None = None  # (token, logprob, its text)
    token_text: str | None = None  # the token decoded alone, when logprobs are asked for
    # The text stream's state after this token (see TextStream.to_json): with the tokens so
    # far and the start state, all a relay needs to resume the generation elsewhere.
    text_state: dict[str, Any] | None = None


def logprob_fields(
    tokenizer: Any, pick: Pick
) -> tuple[float | None, list[tuple[int, float, str]] | None, str | None]:
    """A pick's logprobs with the text of each token (the controller has no tokenizer)."""
    if pick.logprob is None:
        return None, None, None
    top = [(t, lp, _piece(tokenizer, t)) for t, lp in pick.top_logprobs or []]
    return pick.logprob, top, _piece(tokenizer, pick.token)


def _piece(tokenizer: Any, token: int) -> str:
    return str(tokenizer.decode([token], skip_special_tokens=False))


def next_event(
    pick: Pick,
    tokens: list[int],
    prompt_len: int,
    params: SamplingParams,
    sampler: Sampler,
    text: TextStream,
    tokenizer: Any,
    eos: frozenset[int],
) -> TokenEvent:
    """Append a sampled token to `tokens` (the sampler takes it too); the event it makes.

    The event says whether the token ends the generation: eos (unless `ignore_eos`),
    max_tokens, a finished grammar, or a stop string in the released text. Batched and
    serial generations both step through here.
    """
    token = pick.token
    tokens.append(token)
    sampler.accept(token)
    generated = len(tokens) - prompt_len
    reason: str | None = None
    stop_reason: str | int | None = None
    if token in eos and not params.ignore_eos:
        reason, stop_reason = "eos", token
    elif generated >= params.max_tokens:
        reason = "length"
    elif sampler.grammar_done:
        reason = "stop"
    # vLLM's min_tokens holds back stop strings as well as eos.
    text.stops = () if generated < params.min_tokens else params.stop
    # The eos token ends the text; it is never shown.
    text_tokens = tokens[:-1] if reason == "eos" else tokens
    released, stopped = text.push(tokenizer, text_tokens, final=reason is not None)
    if stopped:
        reason, stop_reason = "stop", text.matched
    return TokenEvent(
        token,
        released,
        generated,
        reason is not None,
        reason,
        stop_reason,
        *logprob_fields(tokenizer, pick),
        text_state=text.to_json(),
    )


def start_state(
    gen_id: str,
    tokens: list[int],
    prompt_len: int,
    params: SamplingParams,
    seed: int,
    text: dict[str, Any],
) -> dict[str, Any]:
    """A resumable state at a generation's start, without the generator's raw state.

    Every sampled token consumes one draw and a greedy one none, so the seed and the
    number of generated tokens imply the generator (`Sampler.from_json` replays it). A
    relay that has seen the token events since can resume the generation elsewhere: the
    start's tokens plus the relayed ones, and the last event's `text_state` as "text".
    """
    return {
        "version": STATE_VERSION,
        "id": gen_id,
        "tokens": list(tokens),
        "prompt_len": prompt_len,
        "params": params.to_json(),
        "sampler": {"seed": seed},
        "text": dict(text),
        "finished": False,
        "finish_reason": None,
    }


class Sequence:
    """A generation as the batcher sees it; only the batcher thread changes it once admitted."""

    def __init__(
        self,
        gen_id: str,
        tokens: list[int],
        prompt_len: int,
        params: SamplingParams,
        sampler: Sampler,
        text: TextStream,
        *,
        hold: bool = False,
    ) -> None:
        self.id = gen_id
        self.tokens = tokens
        self.prompt_len = prompt_len
        self.params = params
        self.sampler = sampler
        self.text = text
        self.hold = hold
        self.phase = "waiting"
        self.cached = 0
        self.row: int | None = None
        self.order = 0  # admission order: the youngest is preempted first
        self.share_from: Sequence | None = None  # n > 1: copy this sibling's prefilled row
        # A migration's continue: its first token comes from the pass that recomputes its
        # last few tokens (see Batcher._first_from_prefill).
        self.first_from_prefill = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.preemptions = 0
        self.admitted = threading.Event()
        self.error: SllmError | None = None  # why it could not be admitted or failed
        self._events: deque[TokenEvent | SllmError] = deque()
        self._ready = threading.Condition()
        # What start_state() describes; tokens only grow after this (a copy would cost more).
        self._start_len = len(tokens)
        self._start_text = text.to_json()

    @property
    def generated(self) -> list[int]:
        """The generated tokens (everything after the prompt)."""
        return self.tokens[self.prompt_len :]

    @property
    def live(self) -> bool:
        """Still in the batcher (not finished, paused, cancelled or failed)."""
        return self.phase in LIVE

    # -- events (batcher thread writes, handle reads) ------------------------------------------

    def push(self, item: TokenEvent | SllmError) -> None:
        """Queue an event (or the error that ends the stream) for the reader."""
        with self._ready:
            self._events.append(item)
            self._ready.notify_all()

    def take(self, timeout: float | None) -> TokenEvent | SllmError | None:
        """The next queued event, waiting up to `timeout` seconds (None: forever)."""
        with self._ready:
            if not self._events and not self._ready.wait_for(lambda: bool(self._events), timeout):
                return None
            return self._events.popleft()

    def notify(self) -> None:
        """Wake `wait_for` callers: the batcher changed this sequence's phase."""
        with self._ready:
            self._ready.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float | None) -> bool:
        """Wait until `predicate()` (checked at each event or `notify`); False on timeout."""
        with self._ready:
            return self._ready.wait_for(predicate, timeout)

    # -- one token -------------------------------------------------------------------------------

    def append(self, pick: Pick, tokenizer: Any, eos: frozenset[int]) -> TokenEvent:
        """Add a sampled token; settle whether it ends the generation; the event to send."""
        event = next_event(
            pick, self.tokens, self.prompt_len, self.params, self.sampler, self.text, tokenizer, eos
        )
        if event.finished:
            self.finish_reason, self.stop_reason = event.finish_reason, event.stop_reason
        return event

    def pick(self, logits: torch.Tensor) -> Pick:
        """Sample this sequence's next token from its logits row (1-D, float32, CPU)."""
        return self.sampler.sample(logits, self.tokens, self.prompt_len)

    @property
    def plain_greedy(self) -> bool:
        """Whether a batched argmax picks this sequence's token (no processors, no logprobs)."""
        return self.sampler.plain_greedy

    # -- state ------------------------------------------------------------------------------------

    def mark_start(self) -> None:
        """Make the current tokens and text the start state (a migration target continued)."""
        self._start_len, self._start_text = len(self.tokens), self.text.to_json()

    def start_state(self) -> dict[str, Any]:
        """The state this sequence started from, readable from any thread (see start_state)."""
        return start_state(
            self.id,
            self.tokens[: self._start_len],
            self.prompt_len,
            self.params,
            self.sampler.seed,
            self._start_text,
        )

    def export_state(self) -> dict[str, Any]:
        """Everything needed to resume elsewhere, as JSON: tokens, params, sampler, text stream."""
        finished = self.finish_reason in FINISH_REASONS
        return {
            "version": STATE_VERSION,
            "id": self.id,
            "tokens": list(self.tokens),
            "prompt_len": self.prompt_len,
            "params": self.params.to_json(),
            "sampler": self.sampler.to_json(),
            "text": self.text.to_json(),
            "finished": finished,
            "finish_reason": self.finish_reason if finished else None,
            # Informative (a resume recomputes it from params and tokens).
            "remaining_tokens": 0 if finished else self.params.max_tokens - len(self.generated),
        }
