"""Sampling parameters from request bodies (every bad value is a 400 naming it) and what the
sampler does with them: greedy, temperature, top-k, top-p, seeds."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from transformers import Cache, PretrainedConfig

from sllm import tiny_models
from sllm.core.errors import ContextLengthExceeded, InvalidRequest
from sllm.runtime import Runtime, SamplingParams

LIMIT = 256


# -- parsing requests ---------------------------------------------------------------------------


FILL = SamplingParams(max_tokens=LIMIT, fit_context=True)  # no max_tokens: fill the context


def test_missing_fields_take_the_defaults() -> None:
    assert SamplingParams.from_request({}, max_tokens_limit=LIMIT) == FILL
    assert SamplingParams() == SamplingParams(16, 1.0, 1.0, 0, (), None, False)


def test_null_fields_take_the_defaults() -> None:
    body = {k: None for k in ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed")}

    assert SamplingParams.from_request(body, max_tokens_limit=LIMIT) == FILL


@pytest.mark.parametrize(
    ("limit", "prompt_len", "expected"),
    [(512, 100, 28), (8, 100, 8), (512, 127, 1)],
    ids=["context-left", "limit-lower", "one-token-left"],
)
def test_without_max_tokens_a_generation_fills_the_context_up_to_the_limit(
    limit: int, prompt_len: int, expected: int
) -> None:
    params = SamplingParams.from_request({}, max_tokens_limit=limit).fitted(prompt_len, 128)

    assert params.max_tokens == expected
    assert not params.fit_context


def test_explicit_max_tokens_that_does_not_fit_is_a_context_length_error() -> None:
    params = SamplingParams.from_request({"max_tokens": 40}, max_tokens_limit=LIMIT)

    assert params.fitted(88, 128) == params
    with pytest.raises(ContextLengthExceeded) as info:
        params.fitted(89, 128)
    assert (info.value.status, info.value.code) == (400, "context_length_exceeded")
    assert info.value.param == "max_tokens"
    assert "maximum context length is 128 tokens" in info.value.message
    assert "129 tokens" in info.value.message


@pytest.mark.parametrize("body", [{}, {"max_tokens": 1}], ids=["default", "explicit"])
def test_a_prompt_that_fills_the_context_leaves_no_room(body: dict[str, Any]) -> None:
    params = SamplingParams.from_request(body, max_tokens_limit=LIMIT)

    with pytest.raises(ContextLengthExceeded) as info:
        params.fitted(128, 128, prompt_param="messages")
    assert info.value.param == "messages"


def test_every_field_is_read() -> None:
    body = {
        "max_tokens": 100,
        "temperature": 0,
        "top_p": 0.5,
        "top_k": 40,
        "stop": ["\n\n", "END"],
        "seed": 2**63 - 1,
        "model": "ignored",
    }

    params = SamplingParams.from_request(body, max_tokens_limit=LIMIT)

    assert params == SamplingParams(100, 0.0, 0.5, 40, ("\n\n", "END"), 2**63 - 1)
    assert params.greedy


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({"stop": "###"}, {"stop": ("###",)}),
        ({"stop": []}, {"stop": ()}),
        ({"max_completion_tokens": 7}, {"max_tokens": 7}),
        ({"max_tokens": 5, "max_completion_tokens": 7}, {"max_tokens": 7}),
        ({"temperature": 2}, {"temperature": 2.0}),
        ({"top_p": 1}, {"top_p": 1.0}),
        ({"max_tokens": LIMIT}, {"max_tokens": LIMIT}),
    ],
    ids=[
        "stop-str",
        "stop-empty-list",
        "max-completion-tokens",
        "max-completion-tokens-wins",
        "int-temperature",
        "int-top-p",
        "max-tokens-at-limit",
    ],
)
def test_accepted_forms(body: dict[str, Any], expected: dict[str, Any]) -> None:
    params = SamplingParams.from_request(body, max_tokens_limit=LIMIT)

    for name, value in expected.items():
        assert getattr(params, name) == value


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_tokens", 0, "[1, 256]"),
        ("max_tokens", LIMIT + 1, "[1, 256]"),
        ("max_tokens", 1.5, "[1, 256]"),
        ("max_tokens", "10", "[1, 256]"),
        ("max_tokens", True, "[1, 256]"),
        ("max_completion_tokens", -3, "[1, 256]"),
        ("temperature", -0.1, "[0.0, 2.0]"),
        ("temperature", 2.01, "[0.0, 2.0]"),
        ("temperature", "hot", "[0.0, 2.0]"),
        ("temperature", math.nan, "[0.0, 2.0]"),
        ("temperature", math.inf, "[0.0, 2.0]"),
        ("temperature", False, "[0.0, 2.0]"),
        ("top_p", 0, "(0.0, 1.0]"),
        ("top_p", 1.01, "(0.0, 1.0]"),
        ("top_p", [0.5], "(0.0, 1.0]"),
        ("top_k", -1, "[0, "),
        ("top_k", 2.0, "[0, "),
        ("top_k", True, "[0, "),
        ("seed", -1, "[0, 9223372036854775807]"),
        ("seed", 2**63, "[0, 9223372036854775807]"),
        ("seed", 1.0, "[0, 9223372036854775807]"),
        ("seed", True, "[0, 9223372036854775807]"),
        ("stop", 5, "up to 4 strings"),
        ("stop", ["a", "b", "c", "d", "e"], "up to 4 strings"),
        ("stop", [""], "1-64 characters"),
        ("stop", ["x" * 65], "1-64 characters"),
        ("stop", ["ok", 3], "1-64 characters"),
        ("stop", "", "1-64 characters"),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_invalid_value_is_rejected_naming_field_value_and_range(
    field: str, value: Any, allowed: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        SamplingParams.from_request({field: value}, max_tokens_limit=LIMIT)

    message = info.value.message
    assert f"'{field}'" in message
    assert allowed in message
    shown = repr(value[-1] if isinstance(value, list) and field == "stop" else value)
    assert shown[:20] in message
    assert info.value.status == 400
    assert info.value.param == field


NOT_AN_OBJECT: Any = ["max_tokens", 3]


def test_body_must_be_an_object() -> None:
    with pytest.raises(InvalidRequest, match="JSON object"):
        SamplingParams.from_request(NOT_AN_OBJECT, max_tokens_limit=LIMIT)


@pytest.mark.parametrize(
    "params",
    [SamplingParams(), SamplingParams(3, 0.0, 0.9, 5, ("a", "bc"), 42)],
    ids=["defaults", "everything-set"],
)
def test_json_round_trip(params: SamplingParams) -> None:
    assert SamplingParams.from_json(params.to_json()) == params


# -- what sampling does ---------------------------------------------------------------------------


class FixedLM(torch.nn.Module):
    """A stand-in causal LM whose next-token logits are always the same."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(len(logits), 1)
        self.logits = logits
        self.config = PretrainedConfig(
            max_position_embeddings=4096, eos_token_id=None, num_hidden_layers=1
        )
        self.generation_config = SimpleNamespace(eos_token_id=None)

    def get_input_embeddings(self) -> torch.nn.Embedding:
        return self.embed

    def forward(self, input_ids: torch.Tensor, cache: Cache, use_cache: bool = True) -> Any:
        return SimpleNamespace(logits=self.logits.view(1, 1, -1), cache=cache)


# Token probabilities 0.4, 0.3, 0.2, 0.1 on ids 10..13; every other token is impossible.
PROBS = {10: 0.4, 11: 0.3, 12: 0.2, 13: 0.1}
DRAWS = 1000


@pytest.fixture(scope="module")
def fixed(tmp_path_factory: pytest.TempPathFactory) -> Runtime:
    tokenizer = tiny_models.build_tokenizer(tmp_path_factory.mktemp("tok"))
    logits = torch.full((len(tokenizer),), -torch.inf)
    for token, p in PROBS.items():
        logits[token] = math.log(p)
    return Runtime(FixedLM(logits), tokenizer, Path("unused"))


def counts(rt: Runtime, draws: int = DRAWS, **params: Any) -> Counter[int | None]:
    events = rt.generate([5], SamplingParams(max_tokens=draws, seed=3, **params))
    return Counter(e.token for e in events)


def test_temperature_one_samples_the_model_distribution(fixed: Runtime) -> None:
    seen = counts(fixed)

    assert set(seen) == set(PROBS)
    for token, p in PROBS.items():
        assert seen[token] / DRAWS == pytest.approx(p, abs=0.05)


@pytest.mark.parametrize(
    ("params", "allowed"),
    [
        ({"temperature": 0.0}, {10}),
        ({"top_k": 1}, {10}),
        ({"top_k": 2}, {10, 11}),
        ({"top_p": 0.35}, {10}),
        ({"top_p": 0.65}, {10, 11}),
        ({"top_p": 0.75}, {10, 11, 12}),
        ({"top_k": 3, "top_p": 0.95}, {10, 11, 12}),
    ],
    ids=["greedy", "top-k-1", "top-k-2", "top-p-head", "top-p-two", "top-p-three", "both"],
)
def test_filters_limit_which_tokens_can_appear(
    fixed: Runtime, params: dict[str, Any], allowed: set[int]
) -> None:
    assert set(counts(fixed, 200, **params)) == allowed


def test_low_temperature_sharpens_and_high_temperature_flattens(fixed: Runtime) -> None:
    cold, hot = counts(fixed, temperature=0.3), counts(fixed, temperature=2.0)

    assert cold[10] > 0.6 * DRAWS
    assert hot[13] > 0.13 * DRAWS > cold[13]


def test_top_k_renormalises_over_the_kept_tokens(fixed: Runtime) -> None:
    seen = counts(fixed, top_k=2)

    assert seen[10] / DRAWS == pytest.approx(0.4 / 0.7, abs=0.05)
