"""Structured output through llguidance: a tiny random model, forced by the grammar, writes
JSON matching the schema (or the regex, choice, grammar); specs that do not compile are a 400;
a matcher rebuilt by replaying tokens gives the same mask."""

from __future__ import annotations

import contextlib
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from sllm import tiny_models
from sllm.core.errors import InvalidRequest
from sllm.runtime import Grammars, GrammarSpec, Sampler, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
PAD = 12  # the model's vocabulary is larger than the tokenizer's, as with padded embeddings


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Grammars]:
    folder = tiny_models.build_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=1)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = tiny_models.build_tokenizer(Path(tmp_path_factory.mktemp("tok")))
    vocab = model.config.vocab_size + PAD
    return model, tokenizer, Grammars(tokenizer, vocab, [tokenizer.eos_token_id])


def logits_of(model: Any, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        row = model(torch.tensor([tokens])).logits[0, -1].float()
    # The padded ids get the highest logits: only the mask keeps them out.
    return torch.cat([row, torch.full((PAD,), 50.0)])


def generate(
    setup: tuple[Any, Any, Grammars], params: SamplingParams, max_new: int = 60
) -> tuple[str, Sampler]:
    model, tokenizer, grammars = setup
    assert params.response_format is not None
    sampler = Sampler(
        params, grammar=grammars.factory(params.response_format), eos=[tokenizer.eos_token_id]
    )
    tokens = tokenizer("Once upon a time")["input_ids"]
    prompt_len = len(tokens)
    for _ in range(max_new):
        token = sampler.sample(logits_of(model, tokens), tokens, prompt_len).token
        sampler.accept(token)
        tokens.append(token)
        if sampler.grammar_done or token == tokenizer.eos_token_id:
            break
    out = [t for t in tokens[prompt_len:] if t != tokenizer.eos_token_id]
    return tokenizer.decode(out), sampler


def spec_params(body: dict[str, Any], **kw: Any) -> SamplingParams:
    return SamplingParams.from_request({**body, **kw}, max_tokens_limit=100)


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_json_schema_output_parses_and_matches_the_schema(
    setup: tuple[Any, Any, Grammars], temperature: float
) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    params = spec_params({"response_format": fmt}, temperature=temperature, seed=7)

    text, sampler = generate(setup, params, max_new=100)

    doc = json.loads(text)
    assert set(doc) == {"name", "age", "ok"}
    assert isinstance(doc["name"], str) and len(doc["name"]) <= 8
    assert isinstance(doc["age"], int) and 0 <= doc["age"] <= 150
    assert isinstance(doc["ok"], bool)
    assert sampler.grammar_done


def test_json_object_output_is_an_object(setup: tuple[Any, Any, Grammars]) -> None:
    params = spec_params({"response_format": {"type": "json_object"}}, temperature=0)

    text, _ = generate(setup, params, max_new=100)

    # A random model may not close the object within the budget; what it wrote is a prefix.
    assert text.lstrip().startswith("{")


@pytest.mark.parametrize(
    ("body", "pattern"),
    [
        ({"guided_regex": "(cat|dog)s? [0-9]{2}"}, r"(cat|dog)s? [0-9]{2}"),
        ({"guided_choice": ["alpha", "beta", "gamma"]}, r"alpha|beta|gamma"),
        # Unbounded repetitions: a random model may still be inside one when the budget ends.
        ({"guided_grammar": 'start: "x" ("y" | "z")+ "!"'}, r"x[yz]*!?"),
        ({"guided_grammar": 'root ::= "a" "b"+ "c"'}, r"ab*c?"),
    ],
    ids=["regex", "choice", "lark", "gbnf"],
)
def test_guided_forms_constrain_the_output(
    setup: tuple[Any, Any, Grammars], body: dict[str, Any], pattern: str
) -> None:
    text, _ = generate(setup, spec_params(body, seed=3), max_new=30)

    assert re.fullmatch(pattern, text), text


@pytest.mark.parametrize(
    "body",
    [
        {"guided_json": {"type": "no-such-type"}},
        {"guided_regex": "(["},
        {"guided_grammar": "start: undefined_rule"},
    ],
    ids=["bad-schema", "bad-regex", "bad-grammar"],
)
def test_a_spec_that_does_not_compile_is_a_400(
    setup: tuple[Any, Any, Grammars], body: dict[str, Any]
) -> None:
    spec = spec_params(body).response_format
    assert spec is not None

    with pytest.raises(InvalidRequest) as info:
        setup[2].factory(spec)
    assert info.value.status == 400
    assert info.value.param == "response_format"


def test_a_large_schema_compiles_in_bounded_time(setup: tuple[Any, Any, Grammars]) -> None:
    props = {f"field_{i}": {"type": "string", "pattern": "[a-z]{1,20}"} for i in range(300)}
    schema = {"type": "object", "properties": props, "required": list(props)}
    spec = spec_params({"guided_json": schema}).response_format
    assert spec is not None

    started = time.perf_counter()
    # Refusing it is as good as compiling it, as long as it is quick.
    with contextlib.suppress(InvalidRequest):
        setup[2].factory(spec)
    assert time.perf_counter() - started < 5.0


def test_compiled_specs_are_cached(setup: tuple[Any, Any, Grammars]) -> None:
    spec = GrammarSpec("regex", "[0-9]+")

    assert setup[2].factory(spec) is setup[2].factory(spec)


def test_replayed_grammar_state_gives_the_same_mask(setup: tuple[Any, Any, Grammars]) -> None:
    model, tokenizer, grammars = setup
    params = spec_params({"guided_json": SCHEMA}, seed=11)
    spec = params.response_format
    assert spec is not None
    sampler = Sampler(params, grammar=grammars.factory(spec), eos=[tokenizer.eos_token_id])
    tokens = tokenizer("Hi")["input_ids"]
    prompt_len = len(tokens)
    for _ in range(6):
        token = sampler.sample(logits_of(model, tokens), tokens, prompt_len).token
        sampler.accept(token)
        tokens.append(token)

    restored = Sampler.from_json(
        params, sampler.to_json(), tokens, prompt_len, grammar=grammars.factory(spec)
    )

    assert restored._grammar is not None and sampler._grammar is not None
    assert torch.equal(restored._grammar.allowed(), sampler._grammar.allowed())
    logits = logits_of(model, tokens)
    assert restored.sample(logits, tokens, prompt_len) == sampler.sample(logits, tokens, prompt_len)


def test_tokens_the_grammar_rejects_are_a_400_on_resume(setup: tuple[Any, Any, Grammars]) -> None:
    _, tokenizer, grammars = setup
    params = spec_params({"guided_regex": "[0-9]+"})
    assert params.response_format is not None
    prompt = tokenizer("Hi")["input_ids"]
    letters = tokenizer("abc")["input_ids"]

    with pytest.raises(InvalidRequest) as info:
        Sampler.from_json(
            params,
            {},
            prompt + letters,
            len(prompt),
            grammar=grammars.factory(params.response_format),
        )
    assert info.value.param == "response_format"
