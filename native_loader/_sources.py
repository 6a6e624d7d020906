"""Conversion sources: safetensors files, sharded folders, HF model folders, state dicts.

Each source becomes a list of `SourceTensor` (name, dtype, shape and where
its bytes come from) plus the extra files to keep (config, tokenizer, ...).
safetensors headers are parsed here directly, so conversion copies bytes
without decoding them and is lossless for every dtype by construction.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from . import _dtypes
from ._errors import ConversionError, UnsupportedDtypeError
from ._format import MANIFEST

MAX_HEADER = 100 * 1024 * 1024
COPY_BLOCK = 16 * 1024 * 1024
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".onnx",
    ".gguf",
    ".tflite",
)
WEIGHT_INDEXES = (".safetensors.index.json", ".bin.index.json")


@dataclass
class SourceTensor:
    """One tensor to write: its bytes come from a file range or a torch tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    file: Path | None = None
    offset: int = 0
    tensor: torch.Tensor | None = None
    alias_of: str | None = None  # stored once, under the name it aliases

    def blocks(self, handles: dict[Path, BinaryIO]) -> Iterator[memoryview]:
        """The tensor's bytes in blocks of at most COPY_BLOCK."""
        if self.tensor is not None:
            flat = self.tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            view = flat.numpy().data.cast("B")
            for start in range(0, self.nbytes, COPY_BLOCK):
                yield view[start : start + COPY_BLOCK]
            return
        assert self.file is not None
        f = handles.get(self.file)
        if f is None:
            f = handles[self.file] = open(self.file, "rb")  # noqa: SIM115 - closed by the caller
        f.seek(self.offset)
        left = self.nbytes
        while left:
            data = f.read(min(left, COPY_BLOCK))
            if not data:
                raise ConversionError(f"{self.file}: ends inside tensor {self.name!r}")
            left -= len(data)
            yield memoryview(data)


@dataclass
class Source:
    """Everything a conversion writes: tensors, extra files and metadata."""

    tensors: list[SourceTensor]
    files: dict[str, Path]
    metadata: dict[str, str]


def natural_key(name: str) -> list[Any]:
    """Sort key that orders 'layers.2' before 'layers.10'."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def read_safetensors_header(path: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    """Parse one safetensors file's header into SourceTensors (no data read)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ConversionError(f"{path}: too short to be a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or 8 + n > size:
                raise ConversionError(f"{path}: invalid safetensors header length {n}")
            raw = f.read(n)
    except OSError as exc:
        raise ConversionError(f"{path}: cannot read: {exc}") from exc
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConversionError(f"{path}: safetensors header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise ConversionError(f"{path}: safetensors header is not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise ConversionError(f"{path}: __metadata__ must be an object")
    data_start, data_len = 8 + n, size - 8 - n
    tensors = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise ConversionError(f"{path}: entry {name!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str):
            raise ConversionError(f"{path}: tensor {name!r} has no dtype")
        try:
            item = _dtypes.itemsize(dtype)
        except UnsupportedDtypeError as exc:
            raise UnsupportedDtypeError(f"{path}: tensor {name!r}: {exc}") from None
        if not isinstance(shape, list) or any(not isinstance(d, int) or d < 0 for d in shape):
            raise ConversionError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise ConversionError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        nbytes = offsets[1] - offsets[0]
        if nbytes != math.prod(shape) * item:
            raise ConversionError(
                f"{path}: tensor {name!r} holds {nbytes} bytes, but {dtype}{shape} needs "
                f"{math.prod(shape) * item}"
            )
        tensors.append(
            SourceTensor(
                name, dtype, tuple(shape), nbytes, file=path, offset=data_start + offsets[0]
            )
        )
    return tensors, {str(k): str(v) for k, v in metadata.items()}


def from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> list[SourceTensor]:
    """SourceTensors for in-memory tensors; exact aliases (tied weights) are kept once."""
    out: list[SourceTensor] = []
    seen: dict[tuple[Any, ...], str] = {}
    for name, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise ConversionError(f"state dict entry {name!r} is not a tensor")
        if t.device.type == "meta":
            raise ConversionError(f"tensor {name!r} is on the meta device and has no data")
        try:
            dtype = _dtypes.from_torch(t.dtype)
        except UnsupportedDtypeError as exc:
            raise UnsupportedDtypeError(f"tensor {name!r}: {exc}") from None
        t = t.detach().cpu()
        src = SourceTensor(name, dtype, tuple(t.shape), t.numel() * t.element_size(), tensor=t)
        if t.numel() and t.is_contiguous():
            key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.dtype, tuple(t.shape))
            if key in seen:
                src.alias_of = seen[key]
            else:
                seen[key] = name
        out.append(src)
    return out


def open_source(src: Path) -> Source:
    """Read a conversion source: a .safetensors file, a folder of them, or an HF folder."""
    if not src.exists():
        raise ConversionError(f"{src}: no such file or folder")
    if src.is_file():
        if src.suffix == ".safetensors":
            tensors, metadata = read_safetensors_header(src)
            return Source(_sorted(tensors), {}, metadata)
        if src.suffix in (".bin", ".pt", ".pth"):
            return Source(_sorted(_torch_file(src)), {}, {})
        raise ConversionError(f"{src}: expected a .safetensors file or a model folder")
    if (src / MANIFEST).exists():
        raise ConversionError(f"{src}: already a converted sllm checkpoint")
    tensors, metadata = _folder_tensors(src)
    return Source(_sorted(tensors), _extra_files(src), metadata)


def _folder_tensors(src: Path) -> tuple[list[SourceTensor], dict[str, str]]:
    indexes = sorted(src.glob("*.safetensors.index.json"))
    shards = sorted(src.glob("*.safetensors"))
    if indexes or shards:
        files = _index_files(src, indexes[0]) if indexes else shards
        tensors: list[SourceTensor] = []
        metadata: dict[str, str] = {}
        for f in files:
            t, m = read_safetensors_header(f)
            tensors += t
            metadata.update(m)
        if indexes:
            _check_index(src, indexes[0], tensors)
        return tensors, metadata
    bin_indexes = sorted(src.glob("*.bin.index.json"))
    bins = (
        _index_files(src, bin_indexes[0]) if bin_indexes else sorted(src.glob("pytorch_model*.bin"))
    )
    if bins:
        return [t for f in bins for t in _torch_file(f)], {}
    raise ConversionError(f"{src}: no *.safetensors or pytorch_model*.bin weights found")


def _index_files(src: Path, index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        assert isinstance(weight_map, dict)
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as exc:
        raise ConversionError(f"{index}: not a valid shard index ({exc})") from exc
    files = []
    for name in dict.fromkeys(weight_map.values()):
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ConversionError(f"{index}: shard {name!r} points outside the folder")
        path = src / name
        if not path.is_file():
            raise ConversionError(f"{index}: shard {name!r} is missing")
        files.append(path)
    return files


def _check_index(src: Path, index: Path, tensors: list[SourceTensor]) -> None:
    weight_map = json.loads(index.read_text())["weight_map"]
    found = {t.name for t in tensors}
    missing = sorted(set(weight_map) - found)
    if missing:
        raise ConversionError(f"{index}: tensors listed but absent from the shards: {missing[:5]}")


def _torch_file(path: Path) -> list[SourceTensor]:
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for a bad pickle
        raise ConversionError(f"{path}: cannot load as a torch state dict: {exc}") from exc
    if not isinstance(sd, Mapping):
        raise ConversionError(f"{path}: does not hold a state dict")
    return from_state_dict(sd)


def _extra_files(src: Path) -> dict[str, Path]:
    """Config, tokenizer and other small files to keep: everything but weights."""
    out = {}
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        name = path.name
        if name.endswith(WEIGHT_INDEXES) or name.endswith(WEIGHT_SUFFIXES) or name == MANIFEST:
            continue
        out[rel.as_posix()] = path
    return out


def _sorted(tensors: list[SourceTensor]) -> list[SourceTensor]:
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConversionError(f"tensor names appear more than once: {dup[:5]}")
    return sorted(tensors, key=lambda t: natural_key(t.name))
