"""Bad input to the converter and the loader: every failure is a specific, named error.

A failed load must raise before handing out a tensor, and a failed conversion
must leave nothing behind that could pass for a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import sllm.native_loader._convert as convert_mod
from sllm.native_loader import (
    ChecksumError,
    ConversionError,
    FormatError,
    MissingPartitionError,
    ReadError,
    UnsupportedDtypeError,
    convert,
    load,
    save_state_dict,
)

CHUNK = 4096  # the smallest chunk size, so a small checkpoint has many chunks


# ------------------------------------------------------------------ helpers
def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a.weight": torch.randn(64, 64, generator=g),  # 16 KiB: chunks 0..3 of data.0
        "b.bias": torch.randn(10, generator=g),
        "c.index": torch.arange(5000, dtype=torch.int32),
    }


def _edit_manifest(folder: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    path = folder / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


def _write_safetensors(
    path: Path, header: dict[str, Any] | bytes, data: bytes = b"", header_len: int | None = None
) -> Path:
    """A safetensors file by hand: 8-byte little-endian header length, JSON header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    size = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", size) + raw + data)
    return path


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder` with its bytes and mtime."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def state_dict() -> dict[str, torch.Tensor]:
    return _state_dict()


@pytest.fixture
def ckpt(tmp_path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    """A checkpoint converted from a safetensors file, with 4 KiB chunks."""
    src = tmp_path / "model.safetensors"
    save_file(state_dict, src)
    dst = tmp_path / "ckpt"
    convert(src, dst, chunk_size=CHUNK)
    return dst


# ------------------------------------------------------------ (a) checksums
def test_corrupted_byte_raises_checksum_error_naming_file_and_chunk(ckpt: Path) -> None:
    data = ckpt / "data.0"
    _flip_byte(data, CHUNK + 100)  # inside chunk 1, inside a.weight

    with pytest.raises(ChecksumError, match=r"chunk 1\b") as info:
        load(ckpt)

    assert str(data) in str(info.value)
    assert info.value.path == str(data)
    assert info.value.chunk == 1
    assert info.value.offset == CHUNK


def test_verify_never_loads_corrupted_bytes_unchecked(
    ckpt: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    _flip_byte(ckpt / "data.0", CHUNK + 100)

    tensors = load(ckpt, verify="never")

    assert not torch.equal(tensors["a.weight"], state_dict["a.weight"])
    assert torch.equal(tensors["b.bias"], state_dict["b.bias"])
    assert torch.equal(tensors["c.index"], state_dict["c.index"])


def test_verify_first_detects_corruption_on_the_first_load(ckpt: Path) -> None:
    _flip_byte(ckpt / "data.0", CHUNK + 100)

    with pytest.raises(ChecksumError, match="chunk 1"):
        load(ckpt, verify="first")
    with pytest.raises(ChecksumError):  # a failed verification is not remembered as a pass
        load(ckpt, verify="first")


def test_verify_first_rechecks_a_partition_rewritten_after_verification(ckpt: Path) -> None:
    data = ckpt / "data.0"
    load(ckpt, verify="first")  # verifies and remembers this file version
    before = data.stat()
    _flip_byte(data, CHUNK + 100)
    # Make sure the rewrite is a new file version even on a coarse timestamp clock.
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))

    with pytest.raises(ChecksumError, match="chunk 1"):
        load(ckpt, verify="first")


def test_verify_first_trusts_an_unchanged_file_version(
    ckpt: Path, state_dict: dict[str, torch.Tensor]
) -> None:
    """Documented trade-off: "first" checks once per (inode, size, mtime), later loads skip it."""
    data = ckpt / "data.0"
    load(ckpt, verify="first")
    before = data.stat()
    _flip_byte(data, CHUNK + 100)
    os.utime(data, ns=(before.st_atime_ns, before.st_mtime_ns))  # same identity as verified

    tensors = load(ckpt, verify="first")

    assert not torch.equal(tensors["a.weight"], state_dict["a.weight"])
    with pytest.raises(ChecksumError):
        load(ckpt, verify="always")


def test_unknown_verify_mode_is_rejected(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="verify"):
        load(ckpt, verify="sometimes")


# ------------------------------------------------- (b)-(d) files on disk
def test_truncated_partition_raises_read_error_naming_the_file(ckpt: Path) -> None:
    data = ckpt / "data.0"
    os.truncate(data, 2 * CHUNK)

    with pytest.raises(ReadError, match="truncated") as info:
        load(ckpt)

    assert not isinstance(info.value, MissingPartitionError)
    assert str(data) in str(info.value)
    assert info.value.path == str(data)


def test_missing_partition_raises_missing_partition_error(ckpt: Path) -> None:
    data = ckpt / "data.0"
    data.unlink()

    with pytest.raises(MissingPartitionError, match="missing") as info:
        load(ckpt)

    assert isinstance(info.value, ReadError)
    assert info.value.path == str(data)


def test_missing_manifest_raises_format_error(ckpt: Path) -> None:
    (ckpt / "manifest.json").unlink()

    with pytest.raises(FormatError, match=r"manifest\.json"):
        load(ckpt)


def test_plain_folder_is_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(FormatError, match="not a converted sllm checkpoint"):
        load(tmp_path)


# ------------------------------------------------------ (e)-(f) manifests
def _set(*keys: Any, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        for k in keys[:-1]:
            doc = doc[k]
        doc[keys[-1]] = value

    return edit


MANIFEST_CORRUPTIONS = [
    pytest.param(_set("version", value=99), r"version 99\b", id="version-99"),
    pytest.param(_set("format", value="pickle"), "not an sllm checkpoint", id="wrong-format-name"),
    pytest.param(_set("checksum", value="md5"), "checksum algorithm", id="unknown-checksum"),
    pytest.param(_set("chunk_size", value=1000), "chunk_size", id="chunk-size-not-page-multiple"),
    pytest.param(
        _set("partitions", 0, "file", value="../evil"), r"'\.\./evil'", id="partition-parent-dir"
    ),
    pytest.param(
        _set("partitions", 0, "file", value="/etc/passwd"), "/etc/passwd", id="partition-absolute"
    ),
    pytest.param(
        _set("partitions", 0, "checksums", value=[0]), "one checksum per", id="too-few-checksums"
    ),
    pytest.param(_set("partitions", value=[]), "no partitions", id="no-partitions"),
    pytest.param(
        _set("tensors", "c.index", "offset", value=10**6), "outside partition", id="offset-past-end"
    ),
    pytest.param(
        _set("tensors", "c.index", "offset", value=-64), "outside partition", id="negative-offset"
    ),
    pytest.param(
        _set("tensors", "c.index", "partition", value=3), "partition 3", id="unknown-partition"
    ),
    pytest.param(
        _set("tensors", "b.bias", "nbytes", value=44), "does not match", id="nbytes-vs-shape"
    ),
    pytest.param(
        _set("tensors", "b.bias", "shape", value=[-1]), "invalid shape", id="negative-shape"
    ),
    pytest.param(_set("files", value=["../x"]), "outside the checkpoint", id="file-parent-dir"),
    pytest.param(
        _set("files", value=["/etc/passwd"]), "outside the checkpoint", id="file-absolute"
    ),
    pytest.param(_set("total_bytes", value=1), "total_bytes", id="total-bytes-mismatch"),
]


@pytest.mark.parametrize(("edit", "match"), MANIFEST_CORRUPTIONS)
def test_corrupted_manifest_raises_format_error(
    ckpt: Path, edit: Callable[[dict[str, Any]], None], match: str
) -> None:
    # A readable decoy outside the folder: a loader that followed "../evil" would succeed.
    shutil.copyfile(ckpt / "data.0", ckpt.parent / "evil")
    _edit_manifest(ckpt, edit)

    with pytest.raises(FormatError, match=match) as info:
        load(ckpt)

    assert "manifest.json" in str(info.value)


def test_manifest_that_is_not_json_raises_format_error(ckpt: Path) -> None:
    (ckpt / "manifest.json").write_text("{not json")

    with pytest.raises(FormatError, match="invalid JSON"):
        load(ckpt)


# -------------------------------------------------------- (g) dtypes
@pytest.mark.parametrize("dtype", ["F6_E2M3", "X9"])
def test_convert_rejects_unsupported_dtype_naming_the_tensor(tmp_path: Path, dtype: str) -> None:
    src = _write_safetensors(
        tmp_path / "odd.safetensors",
        {
            "ok": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
            "weird.weight": {"dtype": dtype, "shape": [4], "data_offsets": [4, 8]},
        },
        bytes(8),
    )
    dst = tmp_path / "ckpt"

    with pytest.raises(UnsupportedDtypeError, match=rf"'weird\.weight'.*{dtype}"):
        convert(src, dst)

    assert not dst.exists()


def test_manifest_with_unknown_dtype_raises_unsupported_dtype_error(ckpt: Path) -> None:
    _edit_manifest(ckpt, _set("tensors", "c.index", "dtype", value="X9"))

    with pytest.raises(UnsupportedDtypeError, match="X9"):
        load(ckpt)


def test_manifest_with_unknown_dtype_names_the_tensor(ckpt: Path) -> None:
    _edit_manifest(ckpt, _set("tensors", "c.index", "dtype", value="X9"))

    with pytest.raises(FormatError, match=r"'c\.index'"):
        load(ckpt)


def test_save_state_dict_names_a_tensor_with_an_unsupported_dtype(tmp_path: Path) -> None:
    sd = {"fine": torch.zeros(3), "phase.weight": torch.zeros(3, dtype=torch.complex128)}

    with pytest.raises(UnsupportedDtypeError, match=r"'phase\.weight'"):
        save_state_dict(sd, tmp_path / "ckpt")


# ----------------------------------------------- (h) malformed safetensors
F32_X4 = {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}

MALFORMED_SAFETENSORS = [
    pytest.param(
        json.dumps(F32_X4).encode(), bytes(16), 10**6, "header length", id="header-longer-than-file"
    ),
    pytest.param(b'{"w": {"dtype": F32', bytes(16), None, "not valid JSON", id="header-not-json"),
    pytest.param(b"[1, 2, 3]", b"", None, "not an object", id="header-not-object"),
    pytest.param(
        json.dumps(F32_X4).encode(), bytes(8), None, "invalid data_offsets", id="offsets-past-end"
    ),
    pytest.param(
        json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}).encode(),
        bytes(8),
        None,
        "invalid data_offsets",
        id="offsets-reversed",
    ),
    pytest.param(
        json.dumps({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}).encode(),
        bytes(16),
        None,
        r"holds 16 bytes, but F32\[3\] needs 12",
        id="nbytes-vs-shape",
    ),
    pytest.param(
        json.dumps({"w": {"dtype": "F32", "shape": "4", "data_offsets": [0, 16]}}).encode(),
        bytes(16),
        None,
        "invalid shape",
        id="shape-not-list",
    ),
    pytest.param(
        json.dumps({"w": {"shape": [4], "data_offsets": [0, 16]}}).encode(),
        bytes(16),
        None,
        "no dtype",
        id="no-dtype",
    ),
]


@pytest.mark.parametrize(("header", "data", "header_len", "match"), MALFORMED_SAFETENSORS)
def test_malformed_safetensors_raises_conversion_error(
    tmp_path: Path, header: bytes, data: bytes, header_len: int | None, match: str
) -> None:
    src = _write_safetensors(tmp_path / "bad.safetensors", header, data, header_len)
    dst = tmp_path / "ckpt"

    with pytest.raises(ConversionError, match=match) as info:
        convert(src, dst)

    assert str(src) in str(info.value)
    assert not dst.exists()


def test_file_too_short_for_a_header_raises_conversion_error(tmp_path: Path) -> None:
    src = tmp_path / "stub.safetensors"
    src.write_bytes(b"abc")

    with pytest.raises(ConversionError, match="too short"):
        convert(src, tmp_path / "ckpt")


# ------------------------------------------------- (i) sources and targets
def test_convert_folder_without_weights_raises_conversion_error(tmp_path: Path) -> None:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")

    with pytest.raises(ConversionError, match=r"no .*weights"):
        convert(src, tmp_path / "ckpt")

    assert not (tmp_path / "ckpt").exists()


def test_convert_missing_source_raises_conversion_error(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no such file"):
        convert(tmp_path / "absent", tmp_path / "ckpt")


def test_convert_onto_existing_checkpoint_without_overwrite_leaves_it_untouched(
    tmp_path: Path, ckpt: Path
) -> None:
    before = _snapshot(ckpt)

    with pytest.raises(ConversionError, match="already exists"):
        convert(tmp_path / "model.safetensors", ckpt)

    assert _snapshot(ckpt) == before


# ----------------------------------------------------------- (j) atomicity
def _fail_after(monkeypatch: pytest.MonkeyPatch, calls: int, exc: BaseException) -> list[int]:
    """Make _PartitionWriter.write raise `exc` on its (calls+1)-th call."""
    real = convert_mod._PartitionWriter.write
    seen = [0]

    def write(self: Any, data: memoryview) -> None:
        seen[0] += 1
        if seen[0] > calls:
            raise exc
        real(self, data)

    monkeypatch.setattr(convert_mod._PartitionWriter, "write", write)
    return seen


@pytest.mark.parametrize(
    "exc", [OSError(28, "No space left on device"), KeyboardInterrupt()], ids=["enospc", "ctrl-c"]
)
def test_failed_conversion_leaves_nothing_behind(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    state_dict: dict[str, torch.Tensor],
    exc: BaseException,
) -> None:
    src = tmp_path / "src" / "model.safetensors"
    src.parent.mkdir()
    save_file(state_dict, src)
    out = tmp_path / "out"
    out.mkdir()
    seen = _fail_after(monkeypatch, 2, exc)

    with pytest.raises(type(exc)):
        convert(src, out / "ckpt", chunk_size=CHUNK)

    assert seen[0] == 3  # it did fail midway, after writing some bytes
    assert list(out.iterdir()) == []


def test_failed_overwrite_keeps_the_old_checkpoint(
    tmp_path: Path,
    ckpt: Path,
    monkeypatch: pytest.MonkeyPatch,
    state_dict: dict[str, torch.Tensor],
) -> None:
    before = _snapshot(ckpt)
    _fail_after(monkeypatch, 1, OSError(5, "Input/output error"))

    with pytest.raises(OSError, match="Input/output"):
        save_state_dict(_state_dict(seed=1), ckpt, overwrite=True, chunk_size=CHUNK)

    assert _snapshot(ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "model.safetensors"]
    assert torch.equal(load(ckpt)["a.weight"], state_dict["a.weight"])


def test_overwrite_replaces_the_checkpoint_completely(tmp_path: Path) -> None:
    dst = tmp_path / "ckpt"
    old = {"model.layers.0.w": torch.ones(64, 64), "model.layers.1.w": torch.ones(64, 64)}
    readme = tmp_path / "README.md"
    readme.write_text("old model")
    save_state_dict(old, dst, device_map=2, files={"README.md": readme})
    assert (dst / "data.1").exists()

    new = {"x": torch.arange(10, dtype=torch.float32)}
    save_state_dict(new, dst, overwrite=True)

    assert sorted(p.name for p in dst.iterdir()) == ["data.0", "manifest.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "ckpt"]
    tensors = load(dst)
    assert list(tensors) == ["x"]
    assert torch.equal(tensors["x"], new["x"])
