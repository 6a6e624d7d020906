"""The serial decode loop's KV cache (`batching=False`): transformers' current Cache API,
passed and returned explicitly. The batched slot cache is tested in test_runtime_batching."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import Cache
from transformers.utils.generic import ModelOutput

from sllm import tiny_models
from sllm.core.errors import FunctionError
from sllm.native_loader import convert, load_model
from sllm.runtime import Runtime, SamplingParams, load_tokenizer, model_class_for

PROMPT = "Hello world! The quick brown fox"
ARCHS = ("llama", "opt", "gpt2", "qwen2")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    out = {}
    for arch in ARCHS:
        out[arch] = root / arch
        convert(tiny_models.build_tiny_model(arch, root / f"{arch}-src"), out[arch])
    return out


def runtime_for(folder: Path) -> Runtime:
    model = load_model(folder, cls=model_class_for(folder, "generate"))
    return Runtime(model, load_tokenizer(folder), folder, batching=False)


def _removed(self: Any) -> Any:
    raise AttributeError("past_key_values was removed from model outputs")


@pytest.mark.parametrize("arch", ARCHS)
def test_decoding_survives_the_removal_of_past_key_values(
    folders: dict[str, Path], arch: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Neither the deprecated argument (a FutureWarning) nor the output attribute is used."""
    monkeypatch.setattr(ModelOutput, "past_key_values", property(_removed))
    rt = runtime_for(folders[arch])
    prompt = rt.encode(prompt=PROMPT)
    params = SamplingParams(max_tokens=16, temperature=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        events = list(rt.generate(prompt, params))
    monkeypatch.undo()
    hf = rt._engine.model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)
    assert [e.token for e in events] == hf[0, len(prompt) :].tolist()


def test_a_generation_keeps_one_cache_object_across_steps(folders: dict[str, Path]) -> None:
    rt = runtime_for(folders["llama"])
    with rt.start(rt.encode(prompt=PROMPT), SamplingParams(max_tokens=4, temperature=0.0)) as g:
        g.step()
        first = g._cache
        g.step()
        assert isinstance(first, Cache)
        assert g._cache is first
        assert first.get_seq_length() == len(g.tokens) - 1  # the newest token is not run yet


def test_a_failed_forward_pass_leaves_no_torn_cache(
    folders: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass that fails after growing the cache is recomputed from the tokens next time."""
    rt = runtime_for(folders["llama"])
    prompt = rt.encode(prompt=PROMPT)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    expected = [e.token for e in rt.generate(prompt, params)]
    engine = rt._engine
    real = engine.forward
    calls = 0

    def fail_third(tokens: list[int], cache: Cache) -> tuple[torch.Tensor, Cache]:
        nonlocal calls
        calls += 1
        if calls == 3:
            real(tokens, cache)  # the cache grows, then the pass "fails"
            raise FunctionError("simulated failure in the forward pass")
        return real(tokens, cache)

    monkeypatch.setattr(engine, "forward", fail_third)
    got = []
    with rt.start(prompt, params) as g:
        for _ in range(2 * params.max_tokens):  # bounded: one failure, then to the end
            if g.finished:
                break
            try:
                event = g.step()
            except FunctionError:
                continue
            got.append(event.token)
            if not event.finished:  # the cache holds every token but the newest, once each
                assert g._cache is not None
                assert g._cache.get_seq_length() == len(g.tokens) - 1
    assert calls > 3
    assert got == expected
