"""The vLLM / OpenAI sampling parameters: parsing (every bad value a 400 naming it), what each
processor does to a logits row, logprobs, per-sequence independence and state round trips."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest
import torch

from sllm.core.errors import InvalidRequest
from sllm.runtime import GrammarSpec, Pick, Sampler, SamplingParams, choices_field
from sllm.runtime._logits import Processors, logprobs_of, min_p_filter

LIMIT = 256
EOS = 1


def parse(**body: Any) -> SamplingParams:
    return SamplingParams.from_request(body, max_tokens_limit=LIMIT)


# -- parsing --------------------------------------------------------------------------------------


def test_new_fields_default_to_off() -> None:
    params = parse()

    assert (params.min_p, params.presence_penalty, params.frequency_penalty) == (0.0, 0.0, 0.0)
    assert (params.repetition_penalty, params.logit_bias, params.logprobs) == (1.0, (), None)
    assert (params.ignore_eos, params.min_tokens, params.response_format) == (False, 0, None)
    assert not params.processed


def test_every_new_field_is_read() -> None:
    params = parse(
        min_p=0.1,
        presence_penalty=-2,
        frequency_penalty=1.5,
        repetition_penalty=1.3,
        logit_bias={"7": 5, "3": -100},
        logprobs=5,
        ignore_eos=True,
        min_tokens=4,
        response_format={"type": "json_object"},
        n=8,
    )

    assert params.min_p == 0.1
    assert (params.presence_penalty, params.frequency_penalty) == (-2.0, 1.5)
    assert params.repetition_penalty == 1.3
    assert params.logit_bias == ((3, -100.0), (7, 5.0))
    assert (params.logprobs, params.ignore_eos, params.min_tokens) == (5, True, 4)
    assert params.response_format == GrammarSpec("json_object")
    assert params.processed


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("min_p", -0.1, "[0.0, 1.0]"),
        ("min_p", 1.5, "[0.0, 1.0]"),
        ("min_p", math.nan, "[0.0, 1.0]"),
        ("presence_penalty", 2.5, "[-2.0, 2.0]"),
        ("frequency_penalty", -3, "[-2.0, 2.0]"),
        ("frequency_penalty", "1", "[-2.0, 2.0]"),
        ("repetition_penalty", 0, "(0.0, 2.0]"),
        ("repetition_penalty", 2.5, "(0.0, 2.0]"),
        ("logprobs", 21, "[0, 20]"),
        ("logprobs", True, "[0, 20]"),
        ("logprobs", -1, "[0, 20]"),
        ("ignore_eos", 1, "boolean"),
        ("min_tokens", -1, "[0, 256]"),
        ("min_tokens", 1.5, "[0, 256]"),
        ("n", 0, "[1, 8]"),
        ("n", 9, "[1, 8]"),
        ("logit_bias", [1], "token ids"),
        ("logit_bias", "x", "at most 300"),
        ("logit_bias", {"abc": 1}, "token ids"),
        ("logit_bias", {"-1": 1}, "token ids"),
        ("logit_bias", {"1" * 40: 1}, "token ids"),
        ("logit_bias", {"5": 101}, "[-100, 100]"),
        ("logit_bias", {"5": "1"}, "[-100, 100]"),
        ("logit_bias", {"5": math.inf}, "[-100, 100]"),
        ("response_format", {"type": "xml"}, "json_schema"),
        ("response_format", "json", "json_object"),
        ("guided_regex", 5, "string"),
        ("guided_regex", "", "empty"),
        ("guided_choice", [], "non-empty strings"),
        ("guided_choice", ["a", 1], "non-empty strings"),
        ("guided_json", "{not json", "not valid JSON"),
        ("guided_json", [1], "JSON schema"),
    ],
    ids=lambda v: repr(v)[:20],
)
def test_invalid_value_is_a_400_naming_the_field(field: str, value: Any, allowed: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(**{field: value})

    assert info.value.status == 400
    assert info.value.param == field
    assert allowed in info.value.message


def test_min_tokens_above_max_tokens_is_a_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(max_tokens=4, min_tokens=5)
    assert info.value.param == "min_tokens"


def test_json_schema_without_schema_names_the_nested_field() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(response_format={"type": "json_schema", "json_schema": {"name": "x"}})
    assert info.value.param == "response_format.json_schema"


def test_two_constraints_at_once_are_a_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(response_format={"type": "json_object"}, guided_regex="a+")
    assert info.value.param == "guided_regex"


@pytest.mark.parametrize(
    ("body", "spec"),
    [
        ({"response_format": {"type": "text"}}, None),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "x"}}}},
            GrammarSpec("json_schema", '{"type":"x"}'),
        ),
        ({"guided_json": '{"type": "integer"}'}, GrammarSpec("json_schema", '{"type":"integer"}')),
        ({"guided_regex": "[ab]+"}, GrammarSpec("regex", "[ab]+")),
        ({"guided_choice": ["yes", "no"]}, GrammarSpec("choice", '["yes", "no"]')),
        ({"guided_grammar": 'start: "a"'}, GrammarSpec("grammar", 'start: "a"')),
    ],
    ids=["text", "json-schema", "guided-json-text", "regex", "choice", "grammar"],
)
def test_constraints_are_normalized(body: dict[str, Any], spec: GrammarSpec | None) -> None:
    assert parse(**body).response_format == spec


def test_hostile_sizes_are_rejected_quickly() -> None:
    huge_bias = {str(i): 1 for i in range(10**6)}
    huge_schema = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string"} for i in range(10**5)},
    }
    started = time.perf_counter()
    for body in (
        {"logit_bias": huge_bias},
        {"guided_json": huge_schema},
        {"guided_regex": "a" * 10**6},
        {"guided_choice": ["a"] * 10**5},
    ):
        with pytest.raises(InvalidRequest):
            parse(**body)
    assert time.perf_counter() - started < 2.0


def test_choices_field() -> None:
    assert choices_field({}) == 1
    assert choices_field({"n": 8}) == 8


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(),
        SamplingParams(
            5,
            0.7,
            0.9,
            3,
            ("x",),
            7,
            min_p=0.05,
            presence_penalty=0.5,
            frequency_penalty=-0.5,
            repetition_penalty=1.2,
            logit_bias=((2, 1.5), (9, -100.0)),
            logprobs=0,
            ignore_eos=True,
            min_tokens=2,
            response_format=GrammarSpec("json_schema", '{"type":"object"}'),
        ),
        SamplingParams(response_format=GrammarSpec("json_object")),
        SamplingParams(response_format=GrammarSpec("choice", '["a", "b"]')),
    ],
    ids=["defaults", "everything", "json-object", "choice"],
)
def test_json_round_trip(params: SamplingParams) -> None:
    assert SamplingParams.from_json(params.to_json()) == params


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"logit_bias": [[-1, 2.0]]}, "logit_bias"),
        ({"logit_bias": [[1, 2.0]] * 301}, "logit_bias"),
        ({"response_format": {"kind": "python", "text": ""}}, "response_format"),
        ({"response_format": {"kind": "regex", "text": "a" * 40000}}, "response_format"),
        ({"response_format": {"kind": "json_schema", "text": "{oops"}}, "response_format"),
        ({"response_format": {"kind": "choice", "text": "[1]"}}, "response_format"),
        ({"min_p": 7}, "min_p"),
        ({"logprobs": 1000}, "logprobs"),
    ],
    ids=lambda v: repr(v)[:25],
)
def test_from_json_rejects_hostile_values(change: dict[str, Any], param: str) -> None:
    doc = {**SamplingParams().to_json(), **change}

    with pytest.raises(InvalidRequest) as info:
        SamplingParams.from_json(doc)
    assert info.value.param == param


def test_logit_bias_ids_are_checked_against_the_vocab() -> None:
    params = parse(logit_bias={"259": 1})

    params.check_vocab(260)
    with pytest.raises(InvalidRequest) as info:
        params.check_vocab(259)
    assert info.value.param == "logit_bias"


# -- processors -----------------------------------------------------------------------------------


def row(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def processed(params: SamplingParams, logits: torch.Tensor, tokens: list[int], prompt_len: int):
    procs = Processors(params, eos=[EOS])
    procs.sync(tokens, prompt_len)
    return procs.apply(logits)


def test_the_worked_example_of_the_module_docstring() -> None:
    params = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)

    out = processed(params, row(2.0, -1.0, 0.5), [0, 2, 2], 1)

    assert out.tolist() == pytest.approx([1.0, -1.0, -1.0])


def test_logit_bias_adds_to_the_named_tokens() -> None:
    out = processed(SamplingParams(logit_bias=((0, -100.0), (2, 3.0))), row(1, 1, 1), [5], 1)

    assert out.tolist() == [-99.0, 1.0, 4.0]


def test_repetition_penalty_covers_prompt_and_generated_tokens() -> None:
    out = processed(SamplingParams(repetition_penalty=2.0), row(4, 4, 4, -4), [0, 5, 3], 2)

    assert out.tolist() == [2.0, 4.0, 4.0, -8.0]


def test_presence_and_frequency_count_only_generated_tokens() -> None:
    params = SamplingParams(presence_penalty=1.0, frequency_penalty=0.5)

    out = processed(params, row(0, 0, 0, 0), [0, 1, 2, 2, 2], 2)

    assert out.tolist() == [0.0, 0.0, -2.5, 0.0]


def test_counts_are_kept_incrementally() -> None:
    procs = Processors(SamplingParams(frequency_penalty=1.0))
    procs.sync([3], 1)
    procs.apply(row(0, 0, 0, 0))
    for token in (2, 2, 0):
        procs.accept(token)
    procs.sync([3, 2, 2, 0], 1)  # the engine's tokens: nothing new to take in

    assert procs.apply(row(0, 0, 0, 0)).tolist() == [-1.0, 0.0, -2.0, 0.0]


def test_min_tokens_masks_eos_until_reached() -> None:
    params = SamplingParams(min_tokens=2)

    assert processed(params, row(0, 5), [0, 3], 1)[EOS] == -math.inf
    assert processed(params, row(0, 5), [0, 3, 3], 1)[EOS] == 5.0


def test_min_p_cuts_below_a_share_of_the_top_probability() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).log()

    out = min_p_filter(logits, 0.2)

    assert torch.isinf(out).tolist() == [False, False, False, True]


def test_logprobs_are_the_models_log_softmax_best_first() -> None:
    logits = row(1.0, 3.0, 2.0)
    expected = torch.log_softmax(logits, 0)

    logprob, top = logprobs_of(logits, 0, 2)

    assert logprob == pytest.approx(float(expected[0]))
    assert [t for t, _ in top] == [1, 2]
    assert top[0][1] == pytest.approx(float(expected[1]))


# -- the sampler ----------------------------------------------------------------------------------


def test_plain_greedy_only_without_processors_and_logprobs() -> None:
    assert Sampler(SamplingParams(temperature=0)).plain_greedy
    assert not Sampler(SamplingParams(temperature=0, logprobs=0)).plain_greedy
    assert not Sampler(SamplingParams(temperature=0, min_tokens=1)).plain_greedy
    assert not Sampler(SamplingParams()).plain_greedy


def test_pick_carries_logprobs_when_asked() -> None:
    logits = row(1.0, 3.0, 2.0)

    plain = Sampler(SamplingParams(temperature=0)).sample(logits, [0], 1)
    pick = Sampler(SamplingParams(temperature=0, logprobs=2)).sample(logits, [0], 1)

    assert plain == Pick(1)
    assert pick.token == 1
    assert pick.logprob == pytest.approx(float(torch.log_softmax(logits, 0)[1]))
    assert [t for t, _ in pick.top_logprobs or []] == [1, 2]


def test_logprobs_zero_still_gives_the_chosen_tokens_logprob() -> None:
    pick = Sampler(SamplingParams(temperature=0, logprobs=0)).sample(row(1.0, 3.0), [0], 1)

    assert pick.logprob is not None
    assert pick.top_logprobs == []


def test_two_sequences_with_different_params_on_the_same_logits() -> None:
    logits = row(0.0, 5.0, 4.0, 3.0)
    tokens = [1, 1]
    biased = Sampler(SamplingParams(temperature=0, logit_bias=((3, 10.0),)))
    penalized = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0))
    plain = Sampler(SamplingParams(temperature=0))

    picks = [s.sample(logits, tokens, 1).token for s in (biased, penalized, plain)]

    assert picks == [3, 2, 1]


def test_processors_leave_seeded_draws_unchanged_when_off() -> None:
    """Today's semantics: one float64 draw per sampled token; identical with new fields off."""
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    old = Sampler(SamplingParams(seed=5))
    new = Sampler(SamplingParams(seed=5, logprobs=3))
    tokens = [0]
    for _ in range(20):
        a, b = old.sample(logits, tokens, 1), new.sample(logits, tokens, 1)
        old.accept(a.token)
        new.accept(b.token)
        tokens.append(b.token)
        assert a.token == b.token
    assert old.draws == new.draws == 20


def test_min_p_changes_what_can_be_sampled() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    sampler = Sampler(SamplingParams(seed=1, min_p=0.5))

    seen = {sampler.sample(logits, [0], 1).token for _ in range(200)}

    assert seen == {0, 1}


def test_state_round_trip_replays_the_counts() -> None:
    params = SamplingParams(seed=3, frequency_penalty=2.0, temperature=0.8)
    logits = torch.zeros(6)
    sampler, tokens = Sampler(params), [0]
    for _ in range(5):
        token = sampler.sample(logits, tokens, 1).token
        sampler.accept(token)
        tokens.append(token)

    restored = Sampler.from_json(params, sampler.to_json(), tokens, 1)

    assert [restored.sample(logits, tokens, 1) for _ in range(3)] == [
        sampler.sample(logits, tokens, 1) for _ in range(3)
    ]


@pytest.mark.parametrize(
    "doc",
    [{"draws": 10**15}, {"draws": 4}, {"draws": -1}, {"seed": "x"}, {"rng": 5}],
    ids=["huge-draws", "more-draws-than-tokens", "negative", "bad-seed", "bad-rng"],
)
def test_hostile_sampler_state_is_a_quick_400(doc: dict[str, Any]) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidRequest):
        Sampler.from_json(SamplingParams(seed=1), doc, [0, 1, 2, 3], 1)
    assert time.perf_counter() - started < 1.0


def test_response_format_without_a_compiler_is_not_silently_ignored() -> None:
    with pytest.raises(InvalidRequest) as info:
        Sampler(SamplingParams(response_format=GrammarSpec("json_object")))
    assert info.value.param == "response_format"
