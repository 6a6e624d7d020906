"""Sentence embeddings: pooling configured from a model folder the way sentence-transformers does.

A sentence-transformers folder lists its modules in `modules.json`, e.g.

    [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
     {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
     {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]

and the Pooling module's `config.json` sets one of `pooling_mode_cls_token`,
`pooling_mode_mean_tokens`, `pooling_mode_max_tokens`, `pooling_mode_lasttoken`. A folder
without these files gets mean pooling and no normalisation. Modules we cannot reproduce
(Dense layers, several pooling modes at once) are refused rather than silently ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sllm.core.errors import InvalidRequest

MODES = ("cls", "mean", "max", "lasttoken")
_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_lasttoken": "lasttoken",
}
_ST = "sentence_transformers.models."
_KNOWN_MODULES = {_ST + "Transformer", _ST + "Pooling", _ST + "Normalize"}


@dataclass(frozen=True)
class PoolingConfig:
    """How token states become one vector: mode (cls/mean/max/lasttoken), L2 normalisation."""

    mode: str = "mean"
    normalize: bool = False
    max_seq_length: int | None = None  # sentence-transformers' truncation length, if set


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"{path}: cannot read sentence-transformers config: {exc}") from exc


def pooling_config(folder: Path) -> PoolingConfig:
    """The pooling a model folder asks for in its sentence-transformers files (default: mean)."""
    folder = Path(folder)
    max_len = _max_seq_length(folder)
    if not (folder / "modules.json").is_file():
        return PoolingConfig(max_seq_length=max_len)
    modules = _read_json(folder / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise InvalidRequest(f"{folder}/modules.json must be a list of module objects")
    mode, normalize = "mean", False
    for module in modules:
        kind = module.get("type")
        if kind not in _KNOWN_MODULES:
            raise InvalidRequest(
                f"{folder}: sentence-transformers module {kind!r} is not supported"
            )
        if kind == _ST + "Normalize":
            normalize = True
        elif kind == _ST + "Pooling":
            mode = _pooling_mode(folder / str(module.get("path", "")) / "config.json")
    return PoolingConfig(mode=mode, normalize=normalize, max_seq_length=max_len)


def _pooling_mode(path: Path) -> str:
    config = _read_json(path)
    if not isinstance(config, dict):
        raise InvalidRequest(f"{path} must be a JSON object")
    modes = [mode for flag, mode in _FLAGS.items() if config.get(flag)]
    others = [
        k for k, v in config.items() if k.startswith("pooling_mode_") and v and k not in _FLAGS
    ]
    if len(modes) != 1 or others:
        raise InvalidRequest(
            f"{path}: exactly one of {sorted(_FLAGS)} must be set, got {modes + others}"
        )
    return modes[0]


def _max_seq_length(folder: Path) -> int | None:
    path = folder / "sentence_bert_config.json"
    if not path.is_file():
        return None
    value = _read_json(path)
    value = value.get("max_seq_length") if isinstance(value, dict) else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def pool(hidden: torch.Tensor, mask: torch.Tensor, config: PoolingConfig) -> torch.Tensor:
    """One vector per row of `hidden` (batch, seq, dim), over positions where `mask` is 1."""
    hidden = hidden.to(torch.float32)
    keep = mask.to(torch.bool).unsqueeze(-1)
    if config.mode == "cls":
        out = hidden[:, 0]
    elif config.mode == "mean":
        summed = (hidden * keep).sum(dim=1)
        out = summed / keep.sum(dim=1).clamp(min=1)
    elif config.mode == "max":
        out = hidden.masked_fill(~keep, -torch.inf).max(dim=1).values
    elif config.mode == "lasttoken":
        # The last kept position, whichever side the padding is on.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask.to(torch.long)).max(dim=1).values
        out = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        raise InvalidRequest(f"pooling mode must be one of {list(MODES)}, got {config.mode!r}")
    if config.normalize:
        out = torch.nn.functional.normalize(out, p=2.0, dim=-1)
    return out
