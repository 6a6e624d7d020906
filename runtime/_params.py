"""Sampling parameters of one generation, parsed from an OpenAI-style request body.

Besides temperature / top-p / top-k / stops / seed, the vLLM and OpenAI processors:
min-p, presence / frequency / repetition penalties, logit bias, min tokens, ignore eos,
logprobs, and a structured-output constraint (`GrammarSpec`, see _formats.py). `n` is read
and checked here too (`choices_field`), but is not a property of one sequence.

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

from ._formats import GrammarSpec, parse_format

MAX_SEED = 2**63 - 1
MAX_STOPS = 4
MAX_STOP_CHARS = 64
DEFAULT_MAX_TOKENS = 16
MAX_N = 8  # choices per request: each is a sequence in the batch
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
MAX_LOGIT_BIAS = 300  # entries, as OpenAI allows
MAX_TOKEN_ID = 2**31 - 1


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


def _bool_field(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise InvalidRequest(f"{name!r} must be a boolean, got {show_value(value)}", param=name)
    return bool(value)


def _logprobs_field(body: Mapping[str, Any]) -> int | None:
    value = body.get("logprobs")
    if value is None:
        return None
    if not is_int(value) or not 0 <= value <= MAX_LOGPROBS:
        raise InvalidRequest(
            f"'logprobs' must be null or an integer in [0, {MAX_LOGPROBS}] (how many top "
            f"alternatives per token), got {show_value(value)}",
            param="logprobs",
        )
    return int(value)


def _logit_bias_field(body: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    """OpenAI's `{"<token id>": bias}` (ids as strings; ints accepted too), sorted by id."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    rule = f"an object of at most {MAX_LOGIT_BIAS} token ids (as strings) to numbers in [-100, 100]"
    if isinstance(value, list):  # to_json's form: [[id, bias], ...]
        items: list[Any] = value
    elif isinstance(value, Mapping):
        items = list(value.items())
    else:
        raise InvalidRequest(
            f"'logit_bias' must be {rule}, got {show_value(value)}", param="logit_bias"
        )
    if len(items) > MAX_LOGIT_BIAS:
        raise InvalidRequest(
            f"'logit_bias' must be {rule}, got {len(items)} entries", param="logit_bias"
        )
    bias: dict[int, float] = {}
    for item in items:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise InvalidRequest(
                f"'logit_bias' must be {rule}, got {show_value(item)}", param="logit_bias"
            )
        key, amount = item
        token = int(key) if isinstance(key, str) and key.isascii() and key.isdigit() else key
        if isinstance(token, str) and len(token) > 10:
            token = None
        if not is_int(token) or not 0 <= token <= MAX_TOKEN_ID:
            raise InvalidRequest(
                f"'logit_bias' keys must be token ids (non-negative integers), got "
                f"{show_value(key)}",
                param="logit_bias",
            )
        if not is_number(amount) or not -100 <= amount <= 100:
            raise InvalidRequest(
                f"'logit_bias' values must be numbers in [-100, 100], got {show_value(amount)} "
                f"for token {token}",
                param="logit_bias",
            )
        bias[int(token)] = float(amount)
    return tuple(sorted(bias.items()))


def choices_field(body: Mapping[str, Any]) -> int:
    """The request's `n` (how many choices), in [1, MAX_N]; 1 when absent."""
    return _int_field(body, "n", 1, 1, MAX_N)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens: temperature (0 = greedy), top-k (0 = off), nucleus top-p, stops, seed,
    and the processors (all off by default; see runtime/_logits.py for what each does).

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
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    response_format: GrammarSpec | None = None

    @property
    def greedy(self) -> bool:
        """Whether tokens are picked by argmax (no randomness at all)."""
        return self.temperature == 0.0

    @property
    def processed(self) -> bool:
        """Whether any logits processor is on (bias, penalties, min tokens, min-p, grammar)."""
        return bool(
            self.min_p
            or self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.response_format is not None
        )

    def check_vocab(self, vocab: int) -> None:
        """InvalidRequest naming `logit_bias` when it names a token outside a `vocab`-token model."""
        for token, _ in self.logit_bias:
            if token >= vocab:
                raise InvalidRequest(
                    f"'logit_bias' names token {token}, but this model's token ids are "
                    f"0-{vocab - 1}",
                    param="logit_bias",
                )

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
        choices_field(body)  # checked with the rest; the caller reads it
        min_tokens = _int_field(body, "min_tokens", 0, 0, limit)
        if min_tokens > (max_tokens or limit):
            raise InvalidRequest(
                f"'min_tokens' ({min_tokens}) must not exceed max_tokens ({max_tokens or limit})",
                param="min_tokens",
            )
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
            min_p=_float_field(body, "min_p", 0.0, 0.0, 1.0, open_lo=False),
            presence_penalty=_penalty_field(body, "presence_penalty"),
            frequency_penalty=_penalty_field(body, "frequency_penalty"),
            repetition_penalty=_float_field(
                body, "repetition_penalty", 1.0, 0.0, 2.0, open_lo=True
            ),
            logit_bias=_logit_bias_field(body),
            logprobs=_logprobs_field(body),
            ignore_eos=_bool_field(body, "ignore_eos"),
            min_tokens=min_tokens,
            response_format=parse_format(body),
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
        """The JSON form of fitted params (what `from_json` reads back); processors only if on."""
        doc: dict[str, Any] = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "stop": list(self.stop),
            "seed": self.seed,
        }
        extra = {
            "min_p": self.min_p or None,
            "presence_penalty": self.presence_penalty or None,
            "frequency_penalty": self.frequency_penalty or None,
            "repetition_penalty": None
            if self.repetition_penalty == 1.0
            else self.repetition_penalty,
            "logit_bias": [list(item) for item in self.logit_bias] or None,
            "logprobs": self.logprobs,
            "ignore_eos": self.ignore_eos or None,
            "min_tokens": self.min_tokens or None,
            "response_format": None
            if self.response_format is None
            else self.response_format.to_json(),
        }
        doc.update((k, v) for k, v in extra.items() if v is not None)
        return doc

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> SamplingParams:
        """Parse `to_json`'s form, validating it like a request (it may travel between hosts)."""
        if not isinstance(doc, Mapping):
            raise InvalidRequest(f"'params' must be a JSON object, got {type(doc).__name__}")
        spec = doc.get("response_format")
        body = {k: v for k, v in doc.items() if k not in ("response_format", "n", *_GUIDED)}
        params = cls.from_request(body, max_tokens_limit=2**31 - 1)
        if spec is None:
            return params
        return replace(params, response_format=GrammarSpec.from_json(spec))


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def _penalty_field(body: Mapping[str, Any], name: str) -> float:
    return _float_field(body, name, 0.0, -2.0, 2.0, open_lo=False)
