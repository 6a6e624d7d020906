"""The cold-start benchmark's model: a random-weight Llama in float32, built in seconds.

The model is sized to `size_bytes` by its layer count (hidden 1024, MLP 2816,
16 heads, vocab 32000 for models of 0.25 GB and more; a narrower shape for
smoke-test sizes). Parameters are created on the meta device, materialised
with `to_empty` and filled in chunks with N(0, 0.02) (norms with ones), so
no time goes into transformers' default initialisation. float32 keeps the
prefill cheap on a CPU (bf16 matmuls are slow there), so loading dominates.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

MB = 1024 * 1024
FILL_CHUNK = 16 * MB  # elements per randn call: bounded scratch memory
DEFAULT_CONTEXT = 2048  # tokens (max_position_embeddings)


@dataclass(frozen=True)
class Shape:
    """Llama dimensions of the benchmark model."""

    hidden: int
    intermediate: int
    heads: int
    vocab: int
    layers: int

    @property
    def params(self) -> int:
        """Parameter count (untied embeddings and head, no biases)."""
        per_layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate + 2 * self.hidden
        return 2 * self.vocab * self.hidden + self.hidden + self.layers * per_layer


def shape_for(size_bytes: int) -> Shape:
    """Dimensions whose float32 weights come to about `size_bytes` (at least one layer).

    Example: 1.2e9 bytes -> hidden 1024, intermediate 2816, vocab 32000,
    18 layers (1.19e9 bytes).
    """
    if size_bytes >= 250_000_000:
        hidden, inter, heads, vocab = 1024, 2816, 16, 32000
    else:
        hidden, inter, heads, vocab = 256, 704, 4, 4096
    base = Shape(hidden, inter, heads, vocab, 0)
    per_layer = (Shape(hidden, inter, heads, vocab, 1).params - base.params) * 4
    layers = max(1, round((size_bytes - base.params * 4) / per_layer))
    return Shape(hidden, inter, heads, vocab, layers)


def stamp_path(folder: Path) -> Path:
    """The file that marks `folder` as completely built (beside it: files inside it would
    travel into the converted checkpoint)."""
    return folder.with_name(folder.name + ".complete")


def build_model(
    folder: Path,
    size_bytes: int,
    echo: Callable[[str], None],
    *,
    eos: bool = True,
    context: int = DEFAULT_CONTEXT,
) -> Path:
    """The model folder (safetensors, config, tokenizer) in `folder`, built unless already there.

    `eos=False` leaves the end-of-sequence token out of the tokenizer and the model's
    config (so of its generation config too): every generation then runs to its length.
    `context` is its max_position_embeddings (prompt + output tokens it can take).
    """
    stamp = stamp_path(folder)
    if stamp.exists():
        echo(f"reusing the model in {folder}")
        return folder
    from transformers import LlamaConfig, LlamaForCausalLM

    from sllm.tiny_models import build_tokenizer

    shutil.rmtree(folder, ignore_errors=True)
    stamp.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    shape = shape_for(size_bytes)
    echo(
        f"building a {shape.params * 4 / 1e9:.2f} GB float32 Llama ({shape.layers} layers, "
        f"hidden {shape.hidden}) in {folder} ..."
    )
    tokenizer = build_tokenizer(folder)
    if not eos:
        tokenizer.eos_token = None
        tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        max_position_embeddings=context,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id if eos else None,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for at in range(0, flat.numel(), FILL_CHUNK):
                part = flat[at : at + FILL_CHUNK]
                part.copy_(torch.randn(part.numel(), generator=gen).mul_(0.02))
    model.save_pretrained(folder, max_shard_size="100GB")
    del model
    _check_saved(folder, shape)
    stamp.write_text(json.dumps(shape.__dict__) + "\n")
    return folder


def _check_saved(folder: Path, shape: Shape) -> None:
    files = sorted(folder.glob("*.safetensors"))
    nbytes = sum(p.stat().st_size for p in files)
    if not files or not math.isclose(nbytes, shape.params * 4, rel_tol=0.01):
        raise RuntimeError(
            f"{folder}: expected about {shape.params * 4} bytes of safetensors, found {nbytes}"
        )
