"""Tiny Hugging Face models survive convert -> load_model with identical outputs, tokenizers and
tied weights, and their parameters are the loader's memory (no copy)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from sllm import tiny_models
from sllm.native_loader import HostPool, convert, load_model, save_state_dict

PROMPT = "Hello world! The quick brown fox jumps over the lazy dog."
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
OPTIONAL_FILES = ("chat_template.jinja",)


@pytest.fixture(autouse=True)
def _quiet_transformers() -> None:
    transformers.utils.logging.disable_progress_bar()


def input_ids(folder: Path) -> torch.Tensor:
    return AutoTokenizer.from_pretrained(folder)(PROMPT, return_tensors="pt").input_ids


def model_output(model: Any, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def assert_same_outputs(src: Path, converted: Path, **load_kw: Any) -> Any:
    ids = input_ids(src)
    expected = tiny_models.reference_logits(src, ids)
    model = load_model(converted, **load_kw)
    got = model_output(model, ids)
    assert got.dtype == expected.dtype
    assert torch.equal(got, expected)
    return model


@pytest.mark.parametrize("arch", tiny_models.ARCHITECTURES)
def test_converted_model_gives_identical_outputs(tmp_path: Path, arch: str) -> None:
    src = tiny_models.build_tiny_model(arch, tmp_path / "src")
    convert(src, tmp_path / "dst")

    model = assert_same_outputs(src, tmp_path / "dst")

    assert not model.training


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_sharded_model_converts_to_identical_outputs(tmp_path: Path, arch: str) -> None:
    src = tiny_models.build_sharded_model(arch, tmp_path / "src")
    assert len(list(src.glob("*.safetensors"))) > 1, "fixture should be sharded"

    manifest = convert(src, tmp_path / "dst")

    assert not any(f.endswith(".index.json") for f in manifest.files)
    assert_same_outputs(src, tmp_path / "dst")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_bf16_model_stays_bf16_with_identical_outputs(tmp_path: Path, arch: str) -> None:
    src = tiny_models.build_tiny_model(arch, tmp_path / "src", dtype=torch.bfloat16)
    convert(src, tmp_path / "dst")

    model = assert_same_outputs(src, tmp_path / "dst")

    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_llama_tie_word_embeddings(tmp_path: Path, tie: bool) -> None:
    src = tiny_models.build_tiny_model("llama", tmp_path / "src", tie_word_embeddings=tie)
    convert(src, tmp_path / "dst")

    model = assert_same_outputs(src, tmp_path / "dst")

    embed, head = model.model.embed_tokens.weight, model.lm_head.weight
    assert (head.data_ptr() == embed.data_ptr()) is tie
    assert torch.equal(head, embed) is tie


def test_tied_state_dict_saved_directly_is_stored_once(tmp_path: Path) -> None:
    src = tiny_models.build_tiny_model("llama", tmp_path / "src", tie_word_embeddings=True)
    reference = transformers.AutoModelForCausalLM.from_pretrained(src)
    state = reference.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    files = {
        name: src / name for name in ("config.json", "tokenizer.json", "tokenizer_config.json")
    }

    manifest = save_state_dict(state, tmp_path / "dst", files=files)

    head, embed = manifest.tensors["lm_head.weight"], manifest.tensors["model.embed_tokens.weight"]
    assert (head.partition, head.offset) == (embed.partition, embed.offset)
    model = assert_same_outputs(src, tmp_path / "dst")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_converted_folder_keeps_config_and_tokenizer(tmp_path: Path, arch: str) -> None:
    src = tiny_models.build_tiny_model(arch, tmp_path / "src")
    dst = tmp_path / "dst"

    manifest = convert(src, dst)

    kept = [*REQUIRED_FILES, *(n for n in OPTIONAL_FILES if (src / n).exists())]
    for name in kept:
        assert name in manifest.files
        assert (dst / name).read_bytes() == (src / name).read_bytes(), name
    assert not list(dst.glob("*.safetensors"))
    source_tok, converted_tok = (
        AutoTokenizer.from_pretrained(src),
        AutoTokenizer.from_pretrained(dst),
    )
    assert converted_tok(PROMPT).input_ids == source_tok(PROMPT).input_ids
    messages = [{"role": "user", "content": "hi"}]
    assert converted_tok.apply_chat_template(messages, tokenize=False) == (
        source_tok.apply_chat_template(messages, tokenize=False)
    )


def test_cpu_parameters_are_views_of_one_loaded_buffer(tmp_path: Path) -> None:
    src = tiny_models.build_tiny_model("llama", tmp_path / "src")
    manifest = convert(src, tmp_path / "dst")

    state = load_model(tmp_path / "dst").state_dict()

    # Zero copy: every parameter sits exactly at its manifest offset from the buffer start.
    base = next(
        t.data_ptr() - manifest.tensors[n].offset for n, t in state.items() if n in manifest.tensors
    )
    for name, entry in manifest.tensors.items():
        assert state[name].data_ptr() - base == entry.offset, name


def pool_ranges(pool: HostPool, folder: Path) -> list[tuple[int, int]]:
    with pool.checkout(folder) as ckpt:
        assert ckpt.hit, "the checkpoint should already be resident"
        return [(b.address, b.address + b.nbytes) for b in ckpt.buffers]


def test_load_model_through_a_pool_uses_the_pool_memory(tmp_path: Path) -> None:
    src = tiny_models.build_tiny_model("qwen2", tmp_path / "src")
    convert(src, tmp_path / "dst")
    pool = HostPool(64 * 1024 * 1024, pin=False)

    model = assert_same_outputs(src, tmp_path / "dst", pool=pool)

    assert tmp_path / "dst" in pool
    ranges = pool_ranges(pool, tmp_path / "dst")
    for name, param in model.named_parameters():
        assert any(lo <= param.data_ptr() < hi for lo, hi in ranges), name
    hits = pool.hits
    again = load_model(tmp_path / "dst", pool=pool)
    assert pool.hits == hits + 1
    assert again.lm_head.weight.data_ptr() == model.lm_head.weight.data_ptr()


def test_pool_never_reuses_memory_a_loaded_model_still_uses(tmp_path: Path) -> None:
    first = tiny_models.build_tiny_model("llama", tmp_path / "first", seed=1)
    second = tiny_models.build_tiny_model("llama", tmp_path / "second", seed=2)
    convert(first, tmp_path / "a")
    convert(second, tmp_path / "b")
    # Roomy capacity: a wrongly freed buffer goes to the free list and is reused, never unmapped.
    pool = HostPool(64 * 1024 * 1024, pin=False)
    ids = input_ids(first)
    model = load_model(tmp_path / "a", pool=pool)
    before = model_output(model, ids)

    pool.evict(tmp_path / "a")  # must refuse: the model's weights live in this memory
    load_model(tmp_path / "b", pool=pool)

    assert torch.equal(model_output(model, ids), before)
    assert tmp_path / "a" in pool
