"""Tiny, offline, deterministic Hugging Face models and tokenizers for tests.

Nothing here touches the network or a model hub: the tokenizer is a byte-level BPE trained
in-process on a small built-in corpus, and the models are random-weight transformers models
(2 layers, hidden size 32) built from their config classes and saved as safetensors.

Typical use::

    folder = build_tiny_model("llama", tmp_path / "llama")
    ids = AutoTokenizer.from_pretrained(folder)("hello world", return_tensors="pt").input_ids
    expected = reference_logits(folder, ids)
"""

from __future__ import annotations

import functools
import json
import pathlib
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

__all__ = [
    "ARCHITECTURES",
    "CHAT_TEMPLATE",
    "POOLING_MODES",
    "SPECIAL_TOKENS",
    "build_sharded_model",
    "build_tiny_embedder",
    "build_tiny_model",
    "build_tokenizer",
    "reference_logits",
]

ARCHITECTURES: tuple[str, ...] = ("opt", "llama", "gpt2", "qwen2", "bert")

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, UNK, PAD)  # ids 0, 1, 2, 3

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

HIDDEN_SIZE = 32
NUM_LAYERS = 2
NUM_HEADS = 4
NUM_KV_HEADS = 2
INTERMEDIATE_SIZE = 64
MAX_POSITIONS = 128

_CORPUS: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! This is a tiny corpus for a tiny tokenizer.",
    "Serverless inference loads model checkpoints on demand.",
    "A checkpoint is a set of tensors stored on disk.",
    "The loader reads safetensors shards into pinned memory.",
    "Large language models predict the next token in a sequence.",
    "Each request carries a prompt and a limit on new tokens.",
    "The scheduler places models on servers with free GPUs.",
    "Cold starts are slow when weights come from remote storage.",
    "Local SSDs and DRAM make loading much faster.",
    "What is the capital of France? The capital of France is Paris.",
    "Once upon a time there was a little robot who loved to read.",
    "She sells sea shells by the sea shore.",
    "How are you today? I am fine, thank you for asking.",
    "Numbers like 1, 2, 3, 42 and 2024 appear in text too.",
    "The user asked a question and the assistant gave an answer.",
    "system: You are a helpful assistant.",
    "user: Tell me a short story about a cat.",
    "assistant: The cat sat on the mat and watched the rain.",
    "Python is a programming language that is easy to read.",
    "Tests should be fast, deterministic and independent.",
    "Attention lets every token look at the tokens before it.",
    "The key value cache stores past attention states.",
    "Batching many requests together improves throughput.",
    "Latency is the time between a request and its first token.",
    "Migration moves a running inference to another server.",
    "The weather is nice today, so we went for a walk in the park.",
    "Good morning, good afternoon, and good night.",
    "Machines learn patterns from data, one step at a time.",
    "Please summarize the following paragraph in one sentence.",
    "Translate the sentence into French: I like apples.",
    "The end of the story is near, but not yet here.",
)


@functools.cache
def _trained_tokenizer_json(vocab_size: int) -> str:
    """Train the byte-level BPE once per process and per size; return it serialized."""
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(_CORPUS), trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(
    folder: pathlib.Path, vocab_size: int = 256, *, chat_template: bool = True
) -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer, save it to ``folder`` and return it.

    The full 256-byte alphabet plus the 4 special tokens is always kept, so the real
    vocabulary is ``max(vocab_size, 260)``; use ``len(tokenizer)`` rather than ``vocab_size``.
    Special tokens: ``<s>`` (0), ``</s>`` (1), ``<unk>`` (2), ``<pad>`` (3).
    ``chat_template=False`` saves it without :data:`CHAT_TEMPLATE`.
    """
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    backend = Tokenizer.from_str(_trained_tokenizer_json(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        model_max_length=MAX_POSITIONS,
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return tokenizer


class _Ids(NamedTuple):
    """Special token ids handed to the model configs."""

    pad: int
    bos: int
    eos: int


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> _Ids:
    pad, bos, eos = tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id
    if pad is None or bos is None or eos is None:
        raise RuntimeError(f"tokenizer lacks a special token: pad={pad} bos={bos} eos={eos}")
    return _Ids(pad=int(pad), bos=int(bos), eos=int(eos))


def _opt(vocab: int, ids: _Ids, tie: bool | None) -> PreTrainedModel:
    config = OPTConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        word_embed_proj_dim=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        ffn_dim=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=True if tie is None else tie,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )
    return OPTForCausalLM(config)


def _llama(vocab: int, ids: _Ids, tie: bool | None) -> PreTrainedModel:
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False if tie is None else tie,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )
    return LlamaForCausalLM(config)


def _gpt2(vocab: int, ids: _Ids, tie: bool | None) -> PreTrainedModel:
    config = GPT2Config(
        vocab_size=vocab,
        n_embd=HIDDEN_SIZE,
        n_layer=NUM_LAYERS,
        n_head=NUM_HEADS,
        n_inner=INTERMEDIATE_SIZE,
        n_positions=MAX_POSITIONS,
        tie_word_embeddings=True if tie is None else tie,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )
    return GPT2LMHeadModel(config)


def _qwen2(vocab: int, ids: _Ids, tie: bool | None) -> PreTrainedModel:
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        intermediate_size=INTERMEDIATE_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        num_key_value_heads=NUM_KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        # Qwen2Config itself defaults to False; the small real checkpoints (0.5B/1.5B) tie.
        tie_word_embeddings=True if tie is None else tie,
        pad_token_id=ids.pad,
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
    )
    return Qwen2ForCausalLM(config)


def _bert(vocab: int, ids: _Ids, tie: bool | None) -> PreTrainedModel:
    del tie  # BertModel has no LM head, so there is nothing to tie.
    config = BertConfig(
        vocab_size=vocab,
        hidden_size=HIDDEN_SIZE,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=NUM_HEADS,
        intermediate_size=INTERMEDIATE_SIZE,
        max_position_embeddings=MAX_POSITIONS,
        type_vocab_size=2,
        pad_token_id=ids.pad,
    )
    return BertModel(config)


_BUILDERS: dict[str, Callable[[int, _Ids, bool | None], PreTrainedModel]] = {
    "opt": _opt,
    "llama": _llama,
    "gpt2": _gpt2,
    "qwen2": _qwen2,
    "bert": _bert,
}


def _build_and_save(
    arch: str,
    folder: pathlib.Path,
    *,
    seed: int,
    dtype: torch.dtype,
    tie_word_embeddings: bool | None,
    save_kwargs: dict[str, Any],
    chat_template: bool = True,
    init_std: float | None = None,
) -> pathlib.Path:
    if arch not in _BUILDERS:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
    folder = pathlib.Path(folder)
    tokenizer = build_tokenizer(folder, chat_template=chat_template)
    torch.manual_seed(seed)
    model = _BUILDERS[arch](len(tokenizer), _token_ids(tokenizer), tie_word_embeddings)
    if init_std is not None:
        # Wider weights than the default 0.02 give logits with clear winners: outputs
        # vary and never hinge on a near-tie that batched matmuls could round apart.
        with torch.no_grad():
            for param in model.parameters():
                if param.dim() >= 2:
                    param.normal_(0.0, init_std)
    # The cast only placates mypy (transformers' decorated ``to`` is mistyped); same call.
    cast(torch.nn.Module, model).to(dtype=dtype)
    model.eval()
    model.save_pretrained(folder, safe_serialization=True, **save_kwargs)
    return folder


def build_tiny_model(
    arch: str,
    folder: pathlib.Path,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    tie_word_embeddings: bool | None = None,
    chat_template: bool = True,
    init_std: float | None = None,
) -> pathlib.Path:
    """Build a tiny random ``arch`` model plus tokenizer in ``folder`` (one safetensors file).

    ``tie_word_embeddings=None`` means: False for llama, True for opt/gpt2/qwen2 (ignored for
    bert, which has no LM head). ``chat_template=False`` leaves the tokenizer without a chat
    template. ``init_std`` redraws every weight matrix from N(0, init_std). Returns ``folder``.
    """
    return _build_and_save(
        arch,
        folder,
        seed=seed,
        dtype=dtype,
        tie_word_embeddings=tie_word_embeddings,
        save_kwargs={},
        chat_template=chat_template,
        init_std=init_std,
    )


def build_sharded_model(
    arch: str,
    folder: pathlib.Path,
    max_shard_size: str = "20KB",
    **kw: Any,
) -> pathlib.Path:
    """Like :func:`build_tiny_model` but saved as several safetensors shards plus an index.

    ``kw`` accepts ``seed``, ``dtype`` and ``tie_word_embeddings``. Returns ``folder``.
    """
    return _build_and_save(
        arch,
        folder,
        seed=kw.pop("seed", 0),
        dtype=kw.pop("dtype", torch.float32),
        tie_word_embeddings=kw.pop("tie_word_embeddings", None),
        save_kwargs={"max_shard_size": max_shard_size, **kw},
    )


POOLING_MODES: tuple[str, ...] = ("cls", "mean", "max", "lasttoken")
_ST = "sentence_transformers.models."


def build_tiny_embedder(
    folder: pathlib.Path,
    seed: int = 0,
    pooling: str = "mean",
    normalize: bool = True,
    max_seq_length: int | None = None,
) -> pathlib.Path:
    """Build a tiny random BERT saved as a sentence-transformers model in ``folder``.

    Writes ``modules.json`` (Transformer, Pooling and, with ``normalize``, Normalize),
    ``1_Pooling/config.json`` with ``pooling`` (one of :data:`POOLING_MODES`) switched on, and
    ``sentence_bert_config.json`` (``max_seq_length`` defaults to the model's 128 positions).
    Returns ``folder``.
    """
    if pooling not in POOLING_MODES:
        raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLING_MODES}")
    folder = build_tiny_model("bert", folder, seed=seed)
    modules: list[dict[str, Any]] = [
        {"idx": 0, "name": "0", "path": "", "type": _ST + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST + "Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST + "Normalize"})
    (folder / "modules.json").write_text(json.dumps(modules, indent=2))
    flags = {
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": pooling == "max",
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": pooling == "lasttoken",
    }
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": HIDDEN_SIZE, **flags, "include_prompt": True})
    )
    bert_config = {"max_seq_length": max_seq_length or MAX_POSITIONS, "do_lower_case": False}
    (folder / "sentence_bert_config.json").write_text(json.dumps(bert_config))
    return folder


def reference_logits(
    folder: pathlib.Path,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``folder``'s model with plain transformers and return its output for ``input_ids``.

    Decoders give ``logits`` (batch, seq, vocab); bert gives ``last_hidden_state``
    (batch, seq, hidden). A 1-D ``input_ids`` is treated as a batch of one. The model is
    loaded in its saved dtype.
    """
    folder = pathlib.Path(folder)
    architectures = json.loads((folder / "config.json").read_text()).get("architectures") or []
    causal = any(name.endswith(("ForCausalLM", "LMHeadModel")) for name in architectures)
    auto_cls = AutoModelForCausalLM if causal else AutoModel
    model = auto_cls.from_pretrained(folder, dtype="auto").eval()
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits if causal else out.last_hidden_state
