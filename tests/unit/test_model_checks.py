"""A checkpoint that does not fit its config.json is a FormatError naming what is wrong."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from sllm import tiny_models
from sllm.native_loader import FormatError, convert, load, load_model, save_state_dict

Edit = Callable[[Path], None]
Q_PROJ = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("llama")
    convert(tiny_models.build_tiny_model("llama", root / "src"), root / "ckpt")
    return root / "ckpt"


def _config(change: Callable[[str], str]) -> Edit:
    def edit(folder: Path) -> None:
        path = folder / "config.json"
        path.write_text(change(path.read_text()))

    return edit


def _set(**fields: object) -> Edit:
    return _config(lambda text: json.dumps({**json.loads(text), **fields}))


def _raw(key: str, literal: str) -> Edit:
    """Set `key` to a JSON literal json.dumps would never write (1e400, NaN)."""
    return _config(lambda text: json.dumps({**json.loads(text), key: "@"}).replace('"@"', literal))


def _retype(name: str, dtype: torch.dtype) -> Edit:
    def edit(folder: Path) -> None:
        state = {k: v.clone() for k, v in load(folder).items()}
        state[name] = state[name].to(dtype)
        keep = folder.with_name(folder.name + "-files")
        shutil.copytree(folder, keep)
        shutil.rmtree(folder)
        files = {
            p.name: p for p in keep.iterdir() if p.suffix == ".json" and p.name != "manifest.json"
        }
        save_state_dict(state, folder, files=files)

    return edit


CASES: list[tuple[str, Edit, str]] = [
    (
        "shape",
        _set(intermediate_size=128),
        r"tensor 'model\.layers\.0\.mlp\.\w+_proj\.weight' has shape \[\d+, \d+\] in the "
        r"checkpoint, but config\.json makes it \[\d+, \d+\]",
    ),
    ("overflowing-number", _raw("hidden_size", "1e400"), r"'hidden_size' is inf, not a finite"),
    ("nan", _raw("rms_norm_eps", "NaN"), r"'rms_norm_eps' is nan, not a finite"),
    (
        "nested-infinity",
        _raw("rope_parameters", '{"rope_type": "default", "rope_theta": -Infinity}'),
        r"'rope_parameters\.rope_theta' is -inf",
    ),
    ("not-an-object", _config(lambda text: "[1, 2]"), r"must hold a JSON object"),
    ("not-json", _config(lambda text: text[:-5]), r"not readable as JSON"),
    (
        "wrong-field-type",
        _set(num_hidden_layers="two"),
        r"config\.json does not describe a buildable model",
    ),
    (
        "integer-weight",
        _retype(Q_PROJ, torch.int32),
        rf"tensor '{Q_PROJ}' is int32 in the checkpoint, but the model needs floating point",
    ),
    (
        "stray-float-dtype",
        _retype(Q_PROJ, torch.float16),
        rf"tensor '{Q_PROJ}' is float16 in the checkpoint, but the model's other weights are "
        r"float32 \(config\.json says float32\)",
    ),
]


@pytest.mark.parametrize(("edit", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_checkpoint_that_disagrees_with_its_config_is_a_format_error(
    good: Path, tmp_path: Path, edit: Edit, message: str
) -> None:
    folder = tmp_path / "ckpt"
    shutil.copytree(good, folder)
    edit(folder)
    with pytest.raises(FormatError, match=message):
        load_model(folder)


def test_a_consistent_checkpoint_in_another_dtype_than_its_config_loads(
    good: Path, tmp_path: Path
) -> None:
    """All weights bf16 under a config saying float32: one dtype, so the model computes in it."""
    folder = tmp_path / "ckpt"
    state = {k: v.to(torch.bfloat16) for k, v in load(good).items()}
    files = {p.name: p for p in good.iterdir() if p.suffix == ".json" and p.name != "manifest.json"}
    save_state_dict(state, folder, files=files)
    model = load_model(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[3, 4, 5]])).logits.float()).all()
