"""A running generation as its callers see it: read its events, export, pause, resume, cancel.

    gen = runtime.start(tokens, params)      # admitted into the instance's batch
    while not gen.finished:
        event = gen.step()                   # the next token event (blocks until ready)
    state = gen.export_state()               # JSON: tokens, params, sampler, held-back text
    other = runtime.resume(state)            # on any instance of the same model

The batched generation decodes in the instance's batcher thread whether or not anyone
reads; `step` only takes the next queued event. Commands that read or change its state
(export, pause, prefill, load_state) run on the batcher thread between two steps, so the
state they see is whole. `state` is one of queued, running, held, preempted, finished,
paused, cancelled, failed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Protocol

from sllm.core.errors import Conflict, InvalidRequest, SllmError

from ._batch import Batcher
from ._engine import Engine, Slot
from ._params import SamplingParams
from ._sampling import Sampler
from ._sequence import FINISH_REASONS, STATE_VERSION, Sequence, TokenEvent
from ._text import TextStream

_PUBLIC_STATE = {
    "waiting": "queued",
    "prefilling": "running",
    "decoding": "running",
    "held": "held",
}


class Generation(Protocol):
    """What the invoker needs of a generation, batched or serial."""

    @property
    def id(self) -> str: ...
    @property
    def prompt_len(self) -> int: ...
    @property
    def params(self) -> SamplingParams: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def generated(self) -> list[int]: ...
    @property
    def finished(self) -> bool: ...
    @property
    def finish_reason(self) -> str | None: ...
    @property
    def state(self) -> str: ...
    @property
    def cached(self) -> int: ...
    def step(self, timeout: float | None = None) -> TokenEvent: ...
    def export_state(self) -> dict[str, Any]: ...
    def start_state(self) -> dict[str, Any]: ...
    def pause(self) -> dict[str, Any]: ...
    def prefill(self, tokens: list[int]) -> int: ...
    def wait_prefilled(self, timeout: float | None) -> bool: ...
    def load_state(self, state: Mapping[str, Any]) -> int: ...
    def close(self) -> None: ...
    def __enter__(self) -> Generation: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


def new_id() -> str:
    """A fresh generation id."""
    return uuid.uuid4().hex


class BatchedGeneration:
    """A handle on one sequence of an instance's batch."""

    def __init__(self, batcher: Batcher, seq: Sequence, slot: Slot | None) -> None:
        self._batcher = batcher
        self._seq = seq
        self._slot = slot
        self._last: TokenEvent | None = None  # the final event, once read
        self._closed = False
        self.id = seq.id

    @property
    def prompt_len(self) -> int:
        return self._seq.prompt_len

    @property
    def params(self) -> SamplingParams:
        return self._seq.params

    @property
    def tokens(self) -> list[int]:
        """Prompt and generated tokens so far (a copy)."""
        return list(self._seq.tokens)

    @property
    def generated(self) -> list[int]:
        """The generated tokens so far (a copy)."""
        return list(self._seq.generated)

    @property
    def finished(self) -> bool:
        """Whether the reader has taken the final event."""
        return self._last is not None

    @property
    def finish_reason(self) -> str | None:
        return self._seq.finish_reason

    @property
    def state(self) -> str:
        seq = self._seq
        if seq.phase == "waiting" and seq.preemptions:
            return "preempted"
        return _PUBLIC_STATE.get(seq.phase, seq.phase)

    def step(self, timeout: float | None = None) -> TokenEvent:
        """The next event; after the end, a finished event without a token.

        Raises the error that ended the generation (the model failed, the instance was
        unloaded), or TimeoutError when no event came within `timeout` seconds.
        """
        if self._closed and self._last is None:
            raise Conflict("the generation was closed")
        if self._last is not None:
            last = self._last
            return TokenEvent(None, "", last.index, True, last.finish_reason, last.stop_reason)
        item = self._seq.take(timeout)
        if item is None:
            raise TimeoutError(f"no token within {timeout} s")
        if isinstance(item, SllmError):
            self._release()
            raise item
        if item.finished:
            self._last = item
            self._release()
        return item

    def start_state(self) -> dict[str, Any]:
        """The state it started from (the prompt, or the state it resumed), at once."""
        return self._seq.start_state()

    def export_state(self) -> dict[str, Any]:
        """The state to resume from, as of the last completed step."""
        if self._seq.live:
            return self._batcher.call(self._seq.export_state)
        return self._seq.export_state()

    def pause(self) -> dict[str, Any]:
        """Stop decoding; the final state. The stream ends with a "paused" event."""
        return self._batcher.call(self._pause)

    def _pause(self) -> dict[str, Any]:
        seq = self._seq
        if not seq.live:
            raise Conflict(f"generation {seq.id} is {self.state}, not running")
        self._batcher.leave(seq, "paused")
        seq.finish_reason = "paused"
        seq.push(TokenEvent(None, "", len(seq.generated), True, "paused"))
        return seq.export_state()

    @property
    def cached(self) -> int:
        """Tokens whose keys and values the cache holds (a held one: all but its last token,
        which goes through the first decode pass)."""
        return self._seq.cached

    def prefill(self, tokens: list[int]) -> int:
        """Make the KV cache hold `tokens` (prompt + generated so far) without decoding.

        For a migration target created with `hold=True`: later rounds send the tokens
        generated meanwhile, and only those are computed. Returns how many of `tokens` the
        cache already held (not computed again) once the prefill is scheduled; the batcher
        computes the rest in its next steps (`wait_prefilled` waits for it).
        """
        engine = self._batcher.engine
        tokens = engine.check_tokens(tokens)
        check_length(engine, len(tokens), self.prompt_len, self.params)
        return self._batcher.call(lambda: self._restage(tokens))

    def wait_prefilled(self, timeout: float | None) -> bool:
        """Wait until the prefill is computed (held, or decoding); False after `timeout` s.

        Raises the error that ended the generation meanwhile, or Conflict when it was
        cancelled or paused.
        """
        seq = self._seq
        done = seq.wait_for(lambda: seq.phase not in ("waiting", "prefilling"), timeout)
        if not seq.live and seq.phase != "finished":
            if seq.error is not None:
                raise seq.error
            raise Conflict(f"generation {seq.id} is {self.state}")
        return done

    def load_state(self, state: Mapping[str, Any]) -> int:
        """Continue exactly where `state` left off (the final round of a migration).

        Returns how many of the state's tokens the cache already held: the others are
        recomputed (a batched generation's last token by its first decode pass).
        """
        engine = self._batcher.engine
        parsed = parse_state(state, engine)
        check_length(engine, len(parsed.tokens), parsed.prompt_len, parsed.params)
        sampler, text = restore(parsed, state, engine)

        def apply() -> int:
            seq = self._seq
            if not seq.live:
                raise Conflict(f"generation {seq.id} is {self.state}")
            seq.prompt_len, seq.params, seq.sampler, seq.text = (
                parsed.prompt_len,
                parsed.params,
                sampler,
                text,
            )
            seq.hold = False
            if parsed.finish_reason is not None:
                seq.tokens = parsed.tokens
                seq.mark_start()
                self._batcher.leave(seq, "finished")
                seq.finish_reason = parsed.finish_reason
                seq.push(TokenEvent(None, "", len(seq.generated), True, parsed.finish_reason))
                return len(parsed.tokens)
            reused = self._restage(parsed.tokens)
            seq.first_from_prefill = True  # the switch's pause: one pass (see the batcher)
            seq.mark_start()  # start_state(): the state it continued from
            return reused

        return self._batcher.call(apply)

    def _restage(self, tokens: list[int]) -> int:
        """Give `seq` these tokens, keeping the cached prefix they share; the tokens kept."""
        seq = self._seq
        if not seq.live:
            raise Conflict(f"generation {seq.id} is {self.state}")
        common = 0
        for a, b in zip(seq.tokens[: seq.cached], tokens, strict=False):
            if a != b:
                break
            common += 1
        seq.cached = min(seq.cached, common, len(tokens) - 1)
        seq.tokens = list(tokens)
        if seq.phase in ("decoding", "held"):
            self._batcher.restage(seq)
        return seq.cached

    def close(self) -> None:
        """Cancel (if still running) and free the slot; calling it again does nothing."""
        self._release()
        self._closed = True
        seq = self._seq
        if seq.live:
            self._batcher.post(lambda: self._cancel(seq))

    def _cancel(self, seq: Sequence) -> None:
        if seq.live:
            self._batcher.leave(seq, "cancelled")

    def _release(self) -> None:
        slot, self._slot = self._slot, None
        if slot is not None:
            slot.release()

    def __enter__(self) -> BatchedGeneration:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# -- states --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedState:
    """A validated exported state."""

    tokens: list[int]
    prompt_len: int
    params: SamplingParams
    finish_reason: str | None


def parse_state(state: Mapping[str, Any], engine: Engine) -> ParsedState:
    """Validate an exported state (it may come from another host); InvalidRequest if bad.

    A state without max_tokens runs to the end of the context, as at its start.
    """
    if not isinstance(state, Mapping):
        raise InvalidRequest(f"state must be a JSON object, got {type(state).__name__}")
    version = state.get("version", STATE_VERSION)
    if version != STATE_VERSION:
        raise InvalidRequest(f"state 'version' must be {STATE_VERSION}, got {version!r}")
    tokens = engine.check_tokens(state.get("tokens"))
    prompt_len = state.get("prompt_len")
    if isinstance(prompt_len, bool) or not isinstance(prompt_len, int):
        raise InvalidRequest(f"'prompt_len' must be an integer, got {prompt_len!r}")
    if not 1 <= prompt_len <= len(tokens):
        raise InvalidRequest(f"'prompt_len' must be in [1, {len(tokens)}], got {prompt_len}")
    params = SamplingParams.from_json(state.get("params", {}))
    params.check_vocab(engine.vocab)
    if params.fit_context:
        params = params.fitted(prompt_len, engine.max_context)
    if prompt_len + params.max_tokens > engine.max_context:
        raise InvalidRequest(
            f"prompt of {prompt_len} tokens plus max_tokens {params.max_tokens} "
            f"exceeds the context of {engine.max_context}"
        )
    reason = state.get("finish_reason")
    if reason is not None and reason not in FINISH_REASONS:
        raise InvalidRequest(f"'finish_reason' must be one of {list(FINISH_REASONS)} or null")
    if bool(state.get("finished", False)) != (reason is not None):
        raise InvalidRequest("'finished' must be true exactly when 'finish_reason' is set")
    return ParsedState(tokens, prompt_len, params, reason)


def restore(
    parsed: ParsedState, state: Mapping[str, Any], engine: Engine
) -> tuple[Sampler, TextStream]:
    """The sampler and text stream of a parsed state (InvalidRequest if malformed)."""
    n = len(parsed.tokens)
    sampler = engine.restore_sampler(
        parsed.params, state.get("sampler") or {}, parsed.tokens, parsed.prompt_len
    )
    text = state.get("text")
    stream = (
        TextStream.after(parsed.params.stop, n, parsed.prompt_len)
        if text is None
        else TextStream.from_json(parsed.params.stop, text, n)
    )
    return sampler, stream


def check_length(
    engine: Engine, n: int, prompt_len: int, params: SamplingParams, what: str = "tokens"
) -> None:
    """InvalidRequest unless `n` tokens hold the prompt, at most max_tokens more, and fit."""
    generated = n - prompt_len
    if generated < 0:
        raise InvalidRequest(
            f"{what!r} must hold at least the prompt's {prompt_len} tokens, got {n}", param=what
        )
    if generated > params.max_tokens:
        raise InvalidRequest(
            f"{what!r} holds {generated} generated tokens, more than max_tokens "
            f"{params.max_tokens}",
            param=what,
        )
    if n > engine.max_context:
        raise InvalidRequest(
            f"{what!r} holds {n} tokens, more than the context of {engine.max_context}",
            param=what,
        )
