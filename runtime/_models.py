"""What the runtime reads from a model folder and a loaded model: classes, tokenizer, limits."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllm.core.errors import FunctionError, InvalidRequest

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TASKS = ("generate", "embed")
DEFAULT_CONTEXT = 2048
# transformers fills model_max_length with a huge sentinel (int(1e30)) when a tokenizer has none.
_SANE_TOKENIZER_LIMIT = 10_000_000


def load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a (converted) model folder, via AutoTokenizer."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(Path(folder))
    except (OSError, ValueError, KeyError) as exc:
        raise FunctionError(f"{folder}: cannot load the tokenizer: {exc}") from exc


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise FunctionError(f"{folder}: cannot read config.json: {exc}") from exc
    if not isinstance(config, dict):
        raise FunctionError(f"{folder}: config.json is not a JSON object")
    return config


def model_class_for(folder: Path, task: str) -> type:
    """The transformers class for `task`: causal LM for "generate", base model for "embed"."""
    import transformers
    from transformers.models.auto import modeling_auto

    if task not in TASKS:
        raise InvalidRequest(f"'task' must be one of {list(TASKS)}, got {task!r}")
    config = _read_config(folder)
    model_type = config.get("model_type")
    mapping: Mapping[str, Any]
    if task == "generate":
        for name in config.get("architectures") or []:
            if isinstance(name, str) and name.endswith(("ForCausalLM", "LMHeadModel")):
                cls = getattr(transformers, name, None)
                if isinstance(cls, type):
                    return cls
        mapping = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    else:
        mapping = modeling_auto.MODEL_MAPPING_NAMES
    name = mapping.get(model_type) if isinstance(model_type, str) else None
    cls = getattr(transformers, name, None) if isinstance(name, str) else None
    if not isinstance(cls, type):
        what = "generate text" if task == "generate" else "compute embeddings"
        raise InvalidRequest(f"{folder}: model type {model_type!r} cannot {what}")
    return cls


def context_length(config: Any, tokenizer: Any) -> int:
    """Longest sequence the model takes: its position limit, else the tokenizer's, else 2048."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(text_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    value = getattr(tokenizer, "model_max_length", None)
    if isinstance(value, int) and 0 < value <= _SANE_TOKENIZER_LIMIT:
        return value
    return DEFAULT_CONTEXT


def eos_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Token ids that end a generation, taken where `model.generate` takes them."""
    for source in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        ids = getattr(source, "eos_token_id", None)
        if ids is not None:
            return frozenset([ids] if isinstance(ids, int) else [int(i) for i in ids])
    ids = getattr(tokenizer, "eos_token_id", None)
    return frozenset() if ids is None else frozenset([int(ids)])


def vocab_size(model: Any) -> int:
    """Number of rows of the input embedding: token ids must be below it."""
    embeddings = model.get_input_embeddings()
    return int(embeddings.num_embeddings)
