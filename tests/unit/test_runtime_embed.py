"""Embeddings: pooling is read from sentence-transformers files, vectors match a reference
computed text by text with plain transformers, and batching never changes a vector."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sllm import tiny_models
from sllm.core.errors import ContextLengthExceeded, InvalidRequest
from sllm.native_loader import convert, load_model
from sllm.runtime import (
    PoolingConfig,
    Runtime,
    SamplingParams,
    load_tokenizer,
    model_class_for,
    pooling_config,
)

TEXTS = [
    "Hello world!",
    "The quick brown fox jumps over the lazy dog.",
    "café ☕",
    "A checkpoint is a set of tensors stored on disk, read into pinned memory by the loader.",
]


def embedder(root: Path, pooling: str, normalize: bool, **kw: Any) -> Path:
    """A converted tiny sentence-transformers BERT (the folder an invoker would load)."""
    dst = root / f"{pooling}-{normalize}"
    if not dst.exists():
        src = tiny_models.build_tiny_embedder(
            root / f"{dst.name}-src", pooling=pooling, normalize=normalize, **kw
        )
        convert(src, dst)
    return dst


def runtime_for(folder: Path) -> Runtime:
    model = load_model(folder, cls=model_class_for(folder, "embed"))
    return Runtime(model, load_tokenizer(folder), folder, task="embed")


def reference(folder: Path, text: str, mode: str, normalize: bool) -> torch.Tensor:
    """The embedding of `text` alone (no padding), pooled by hand from transformers' states."""
    ids = load_tokenizer(folder)(text, return_tensors="pt").input_ids
    states = tiny_models.reference_logits(folder.with_name(folder.name + "-src"), ids)[0]
    pooled = {
        "cls": states[0],
        "mean": states.mean(dim=0),
        "max": states.max(dim=0).values,
        "lasttoken": states[-1],
    }[mode]
    return pooled / pooled.norm() if normalize else pooled


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedders")


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("mode", tiny_models.POOLING_MODES)
def test_pooling_is_read_from_sentence_transformers_files(
    root: Path, mode: str, normalize: bool
) -> None:
    folder = embedder(root, mode, normalize)

    assert pooling_config(folder) == PoolingConfig(mode, normalize, tiny_models.MAX_POSITIONS)


def test_folder_without_sentence_transformers_files_means_mean_pooling(tmp_path: Path) -> None:
    folder = tiny_models.build_tiny_model("bert", tmp_path / "bert")

    assert pooling_config(folder) == PoolingConfig(mode="mean", normalize=False)


@pytest.mark.parametrize("mode", tiny_models.POOLING_MODES)
def test_vectors_match_a_reference_pooled_by_hand(root: Path, mode: str) -> None:
    folder = embedder(root, mode, normalize=True)
    rt = runtime_for(folder)

    vectors, used = rt.embed(TEXTS)

    assert len(vectors) == len(TEXTS)
    tokenizer = load_tokenizer(folder)
    assert used == sum(len(tokenizer(t)["input_ids"]) for t in TEXTS)
    for text, vector in zip(TEXTS, vectors, strict=True):
        got = torch.tensor(vector)
        assert got.shape == (tiny_models.HIDDEN_SIZE,)
        assert torch.linalg.vector_norm(got).item() == pytest.approx(1.0, abs=1e-5)
        torch.testing.assert_close(got, reference(folder, text, mode, True), atol=1e-5, rtol=1e-4)


def test_without_normalize_module_vectors_keep_their_length(root: Path) -> None:
    folder = embedder(root, "mean", normalize=False)
    rt = runtime_for(folder)

    vectors, _ = rt.embed(TEXTS[:2])

    for text, vector in zip(TEXTS[:2], vectors, strict=True):
        expected = reference(folder, text, "mean", False)
        torch.testing.assert_close(torch.tensor(vector), expected, atol=1e-5, rtol=1e-4)
    assert torch.linalg.vector_norm(torch.tensor(vectors[0])).item() != pytest.approx(1.0)


@pytest.mark.parametrize("mode", tiny_models.POOLING_MODES)
def test_a_text_embeds_the_same_alone_and_in_a_padded_batch(root: Path, mode: str) -> None:
    rt = runtime_for(embedder(root, mode, normalize=False))

    batch, _ = rt.embed(TEXTS)

    for text, vector in zip(TEXTS, batch, strict=True):
        alone, _ = rt.embed([text])
        torch.testing.assert_close(torch.tensor(alone[0]), torch.tensor(vector), atol=1e-5, rtol=0)


def test_decoder_embedder_with_last_token_pooling_is_batch_invariant(tmp_path: Path) -> None:
    src = tiny_models.build_tiny_model("qwen2", tmp_path / "src")
    pooling = {"idx": 1, "name": "1", "path": "p", "type": "sentence_transformers.models.Pooling"}
    (src / "modules.json").write_text(json.dumps([pooling]))
    (src / "p").mkdir()
    (src / "p" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    convert(src, tmp_path / "dst")
    rt = runtime_for(tmp_path / "dst")

    batch, _ = rt.embed(TEXTS)

    assert rt.pooling == PoolingConfig("lasttoken", False)
    for text, vector in zip(TEXTS, batch, strict=True):
        alone, _ = rt.embed([text])
        torch.testing.assert_close(torch.tensor(alone[0]), torch.tensor(vector), atol=1e-5, rtol=0)


def test_input_longer_than_the_model_takes_is_a_context_length_error(root: Path) -> None:
    rt = runtime_for(embedder(root, "mean", normalize=True))
    long = " ".join(["The quick brown fox jumps over the lazy dog."] * 40)
    fits = rt.tokenizer(long)["input_ids"][: tiny_models.MAX_POSITIONS]

    with pytest.raises(ContextLengthExceeded) as info:
        rt.embed(["hi", long])

    assert (info.value.status, info.value.param) == (400, "input")
    assert f"maximum context length is {tiny_models.MAX_POSITIONS} tokens" in info.value.message
    assert "'input[1]'" in info.value.message
    with pytest.raises(ContextLengthExceeded):
        rt.embed([[*fits, 5]])
    assert rt.embed([fits])[1] == tiny_models.MAX_POSITIONS  # exactly the limit is fine
    assert rt.active() == 0


def test_sentence_transformers_max_seq_length_is_the_limit(tmp_path: Path) -> None:
    rt = runtime_for(embedder(tmp_path, "cls", normalize=True, max_seq_length=8))

    with pytest.raises(ContextLengthExceeded, match="maximum context length is 8 tokens"):
        rt.embed(["The quick brown fox jumps over the lazy dog."])
    assert rt.embed(["Hi"])[1] == len(rt.tokenizer("Hi")["input_ids"])


@pytest.mark.parametrize("mode", tiny_models.POOLING_MODES)
def test_token_ids_embed_like_the_text_they_encode(root: Path, mode: str) -> None:
    rt = runtime_for(embedder(root, mode, normalize=True))
    ids = [rt.tokenizer(text)["input_ids"] for text in TEXTS]

    by_text, used_text = rt.embed(TEXTS)
    by_ids, used_ids = rt.embed(ids)
    mixed, _ = rt.embed([ids[0], TEXTS[1]])

    assert used_ids == used_text
    torch.testing.assert_close(torch.tensor(by_ids), torch.tensor(by_text), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(mixed), torch.tensor(by_text[:2]), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "texts",
    [[], ["hello"] * 257, [""], ["ok", ""], ["ok", 5], None, [["nested"]], [[]], [[1, -1]]],
    ids=[
        "empty-list",
        "too-many",
        "empty-text",
        "one-empty",
        "not-a-string",
        "none",
        "nested-list",
        "empty-token-list",
        "negative-token",
    ],
)
def test_bad_input_is_rejected(root: Path, texts: Any) -> None:
    rt = runtime_for(embedder(root, "mean", normalize=True))

    with pytest.raises(InvalidRequest, match="input") as info:
        rt.embed(texts)
    assert info.value.param == "input"
    assert rt.active() == 0


def test_token_id_outside_the_vocabulary_is_rejected(root: Path) -> None:
    rt = runtime_for(embedder(root, "mean", normalize=True))

    with pytest.raises(InvalidRequest, match="token ids in") as info:
        rt.embed([[1, 10**6]])
    assert info.value.param == "input"


@pytest.mark.parametrize(
    ("modules", "pooling", "match"),
    [
        ([{"type": "sentence_transformers.models.Dense", "path": "2_Dense"}], None, "Dense"),
        (
            [{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}],
            {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True},
            "exactly one",
        ),
        (
            [{"type": "sentence_transformers.models.Pooling", "path": "1_Pooling"}],
            {"pooling_mode_weightedmean_tokens": True},
            "exactly one",
        ),
        ({"not": "a list"}, None, "list of module objects"),
    ],
    ids=["dense-layer", "two-modes", "weighted-mean", "modules-not-a-list"],
)
def test_pooling_we_cannot_reproduce_is_refused(
    tmp_path: Path, modules: Any, pooling: dict[str, bool] | None, match: str
) -> None:
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))

    with pytest.raises(InvalidRequest, match=match):
        pooling_config(tmp_path)


def test_generation_on_an_embedder_is_rejected(root: Path) -> None:
    rt = runtime_for(embedder(root, "mean", normalize=True))

    with pytest.raises(InvalidRequest, match="task is 'embed'"):
        rt.start([5, 6], SamplingParams())
