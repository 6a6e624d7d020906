"""Sampling parameters of one generation, parsed from an OpenAI-style request body.

A request without `max_tokens` gets what the context leaves after its prompt, at most
the limit (vLLM's default): `from_request` marks it `fit_context`, and `fitted` settles
the number once the prompt's length is known. A request whose prompt leaves no room, or
whose explicit `max_tokens` does not fit, is a ContextLengthExceeded.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from sllm.core.errors import ContextLengthExceeded, InvalidRequest
from sllm.core.messages import show_value
from sllm.core.numbers import is_int, is_number

MAX_SEED = 2**63 - 1
MAX_STOPS = 4
MAX_STOP_CHARS = 64
DEFAULT_MAX_TOKENS = 16


def _int_field(body: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or not lo <= value <= hi:
        raise InvalidRequest(
            f"{name!r} must be an integer in [{lo}, {hi}], got {show_value(value)}", param=name
        )
    return int(value)


def _float_field(
    body: Mapping[str, Any], name: str, default: float, lo: float, hi: float, *, open_lo: bool
) -> float:
    value = body.get(name)
    if value is None:
        return default
    low_ok = is_number(value) and (value > lo if open_lo else value >= lo)
    if not low_ok or value > hi:
        bracket = "(" if open_lo else "["
        raise InvalidRequest(
            f"{name!r} must be a number in {bracket}{lo}, {hi}], got {show_value(value)}",
            param=name,
        )
    return float(value)


def _stop_field(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    rule = f"a string or a list of up to {MAX_STOPS} strings, each 1-{MAX_STOP_CHARS} characters"
    if not isinstance(stops, list) or len(stops) > MAX_STOPS:
        raise InvalidRequest(f"'stop' must be {rule}, got {show_value(value)}", param="stop")
    for stop in stops:
        if not isinstance(stop, str) or not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise InvalidRequest(
                f"'stop' must be {rule}, got {show_value(stop)} in {show_value(value)}",
                param="stop",
            )
    return tuple(stops)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: temperature (0 = greedy), top-k (0 = off), nucleus top-p, stops, seed.

    With `fit_context`, `max_tokens` is a ceiling that `fitted` lowers to what the context
    leaves after the prompt; a generation only ever runs with fitted params.
    """

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    fit_context: bool = False

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax (no randomness at all)."""
        return self.temperature == 0.0

    @classmethod
    def from_request(cls, body: Mapping[str, Any], *, max_tokens_limit: int) -> SamplingParams:
        """Read the sampling fields of a request body; a bad field is an InvalidRequest naming it.

        A missing or null field takes its default; without `max_tokens` the generation may
        fill the context, up to `max_tokens_limit`. `max_completion_tokens` (OpenAI's newer
        name) wins over `max_tokens` when both are given, as with OpenAI and vLLM.
        """
        if not isinstance(body, Mapping):
            raise InvalidRequest(f"request body must be a JSON object, got {type(body).__name__}")
        limit = max(1, max_tokens_limit)
        given = [
            _int_field(body, key, 0, 1, limit) for key in ("max_completion_tokens", "max_tokens")
        ]
        max_tokens = next((n for n in given if n), 0)
        seed = body.get("seed")
        if seed is not None and (not is_int(seed) or not 0 <= seed <= MAX_SEED):
            raise InvalidRequest(
                f"'seed' must be an integer in [0, {MAX_SEED}], got {show_value(seed)}",
                param="seed",
            )
        return cls(
            max_tokens=max_tokens or limit,
            fit_context=not max_tokens,
            temperature=_float_field(body, "temperature", 1.0, 0.0, 2.0, open_lo=False),
            top_p=_float_field(body, "top_p", 1.0, 0.0, 1.0, open_lo=True),
            top_k=_int_field(body, "top_k", 0, 0, 2**31 - 1),
            stop=_stop_field(body),
            seed=None if seed is None else int(seed),
        )

    def fitted(
        self, prompt_len: int, context: int, *, prompt_param: str = "prompt"
    ) -> SamplingParams:
        """These params for a prompt of `prompt_len` tokens in a context of `context` tokens.

        E.g. context 128, prompt 100: no max_tokens gives 28 (or the limit if lower); an
        explicit max_tokens 40 is a ContextLengthExceeded naming `max_tokens`; a prompt of
        128 is one naming `prompt_param`, since no completion fits.
        """
        room = context - prompt_len
        asked = f"{prompt_len} in the prompt, {self.max_tokens} for the completion"
        if room < 1:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens; the prompt has "
                f"{prompt_len} tokens, which leaves no room for the completion. Please "
                "shorten the prompt.",
                param=prompt_param,
            )
        if self.fit_context:
            return replace(self, max_tokens=min(self.max_tokens, room), fit_context=False)
        if self.max_tokens > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {prompt_len + self.max_tokens} tokens ({asked}). Please reduce "
                "the length of the prompt or of the completion (max_tokens).",
                param="max_tokens",
            )
        return self

    def to_json(self) -> dict[str, Any]:
        """The JSON form of fitted params (what `from_json` reads back)."""
        return {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": list(self.stop),
            "seed": self.seed,
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SamplingParams:
        """Parse `to_json`'s form, validating it like a request (it may travel between hosts)."""
        if not isinstance(doc, Mapping):
            raise InvalidRequest(f"'params' must be a JSON object, got {type(doc).__name__}")
        return cls.from_request(doc, max_tokens_limit=2**31 - 1)
