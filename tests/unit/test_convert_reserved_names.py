"""Extra files named like the checkpoint's own files (manifest.json, data.<k>).

A source folder holding a stray `data.0` once had it copied over the real
partition: the checkpoint was written, and pushed, broken.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sllm.native_loader import (
    ConversionError,
    FormatError,
    convert,
    load,
    read_manifest,
    save_state_dict,
)


def _source(folder: Path, *extras: str) -> Path:
    folder.mkdir()
    save_file({"w": torch.arange(4096, dtype=torch.float32)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    for rel in extras:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(b"not the partition" * 300)
    return folder


@pytest.mark.parametrize(
    "extra", ["data.0", "data.1", "data.17"], ids=["data.0", "data.1", "data.17"]
)
def test_a_source_file_named_like_a_partition_is_refused(tmp_path: Path, extra: str) -> None:
    src = _source(tmp_path / "src", extra)

    with pytest.raises(ConversionError, match=rf"named '{extra}'.*partition file.*rename"):
        convert(src, tmp_path / "out")

    assert not (tmp_path / "out").exists()


def test_save_state_dict_refuses_an_extra_file_named_like_a_partition(tmp_path: Path) -> None:
    stray = tmp_path / "stray"
    stray.write_bytes(b"x" * 100)

    with pytest.raises(ConversionError, match=r"'data\.0'"):
        save_state_dict({"w": torch.ones(8)}, tmp_path / "out", files={"data.0": stray})


def test_nested_files_with_such_names_are_kept(tmp_path: Path) -> None:
    src = _source(tmp_path / "src", "extra/data.0")

    manifest = convert(src, tmp_path / "out")

    assert "extra/data.0" in manifest.files
    assert torch.equal(load(tmp_path / "out")["w"], torch.arange(4096, dtype=torch.float32))


def test_a_manifest_listing_a_partition_as_an_extra_file_is_invalid(tmp_path: Path) -> None:
    """A checkpoint written by an older converter with the clash is caught when read."""
    dst = tmp_path / "out"
    convert(_source(tmp_path / "src"), dst)
    doc = json.loads((dst / "manifest.json").read_text())
    doc["files"].append("data.0")
    (dst / "manifest.json").write_text(json.dumps(doc))

    with pytest.raises(
        FormatError, match=r"'data\.0' has the name of the manifest or of a partition"
    ):
        read_manifest(dst)
