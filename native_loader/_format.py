"""The on-disk checkpoint format: a folder with manifest.json and data.<k> partitions.

    model/
      manifest.json   format + version, chunk size, per-partition CRC32C of
                      every chunk, tensor index, extra files kept (config,
                      tokenizer, ...), total bytes
      data.0          partition 0 (one per target device)
      data.1 ...
      config.json, tokenizer.json, ...   copied from the source

Layout inside a partition: tensors of at least LARGE_TENSOR bytes start on a
4 KiB boundary (so O_DIRECT reads land them page-aligned and views are
zero-copy); smaller tensors are packed at 64-byte alignment between them.
Every partition file is padded to a multiple of 4 KiB so O_DIRECT can read
its tail. Tied tensors are entries that share partition and offset.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import _dtypes
from ._errors import FormatError, UnsupportedDtypeError

FORMAT_NAME = "sllm-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PAGE = 4096
SMALL_ALIGN = 64
LARGE_TENSOR = 64 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
_PARTITION_NAME = re.compile(r"data\.([0-9]{1,5})")


def reserved_file(rel: str) -> bool:
    """Whether `rel` names a file the format itself writes (the manifest or a data.<k>).

    An extra file under such a name would overwrite (or be read as) the checkpoint's own.
    """
    return rel == MANIFEST or bool(re.match(r"^data\.\d+$", rel))


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: partition, byte offset, dtype and shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    partition: int
    offset: int
    nbytes: int


@dataclass(frozen=True)
class Partition:
    """One data file, the device it is meant for, and its chunk checksums."""

    file: str
    device: int
    nbytes: int
    checksums: tuple[int, ...]


@dataclass(frozen=True)
class Chunk:
    """A read unit: `length` bytes at `offset` of partition `partition`."""

    partition: int
    index: int
    offset: int
    length: int
    crc: int


@dataclass(frozen=True)
class Manifest:
    """The parsed, validated manifest.json of a converted checkpoint."""

    chunk_size: int
    partitions: tuple[Partition, ...]
    tensors: dict[str, TensorEntry]
    files: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    version: int = FORMAT_VERSION

    @property
    def total_bytes(self) -> int:
        """Bytes of all partitions together (what a load reads)."""
        return sum(p.nbytes for p in self.partitions)

    def chunks(self, partition: int) -> Iterator[Chunk]:
        """The chunks of one partition, in file order."""
        part = self.partitions[partition]
        for i, crc in enumerate(part.checksums):
            offset = i * self.chunk_size
            yield Chunk(partition, i, offset, min(self.chunk_size, part.nbytes - offset), crc)

    def to_json(self) -> dict[str, Any]:
        """The JSON document written as manifest.json."""
        return {
            "format": FORMAT_NAME,
            "version": self.version,
            "chunk_size": self.chunk_size,
            "checksum": "crc32c",
            "total_bytes": self.total_bytes,
            "partitions": [
                {
                    "file": p.file,
                    "device": p.device,
                    "nbytes": p.nbytes,
                    "checksums": list(p.checksums),
                }
                for p in self.partitions
            ],
            "tensors": {
                t.name: {
                    "dtype": t.dtype,
                    "shape": list(t.shape),
                    "partition": t.partition,
                    "offset": t.offset,
                    "nbytes": t.nbytes,
                }
                for t in self.tensors.values()
            },
            "files": list(self.files),
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, doc: Any) -> Manifest:
        """Validate a parsed manifest.json; raises FormatError naming the problem."""
        if not isinstance(doc, dict):
            raise FormatError("manifest.json is not a JSON object")
        if doc.get("format") != FORMAT_NAME:
            raise FormatError(f"not an sllm checkpoint (format={doc.get('format')!r})")
        version = doc.get("version")
        if version != FORMAT_VERSION:
            raise FormatError(
                f"checkpoint format version {version!r} is not supported "
                f"(this build reads version {FORMAT_VERSION})"
            )
        if doc.get("checksum", "crc32c") != "crc32c":
            raise FormatError(f"unknown checksum algorithm {doc.get('checksum')!r}")
        chunk_size = _int(doc.get("chunk_size"), "chunk_size")
        if chunk_size <= 0 or chunk_size % PAGE:
            raise FormatError(f"chunk_size must be a positive multiple of {PAGE}, got {chunk_size}")
        partitions = tuple(
            _partition(p, i, chunk_size) for i, p in enumerate(_list(doc, "partitions"))
        )
        if not partitions:
            raise FormatError("manifest lists no partitions")
        raw_tensors = doc.get("tensors")
        if not isinstance(raw_tensors, dict):
            raise FormatError("manifest 'tensors' must be an object")
        tensors = {name: _tensor(name, t, partitions) for name, t in raw_tensors.items()}
        files = tuple(_relative_file(f) for f in _list(doc, "files"))
        clashes = [f for f in files if reserved_file(f)]
        if clashes:
            raise FormatError(
                f"extra file {clashes[0]!r} has the name of the manifest or of a partition file"
            )
        metadata = doc.get("metadata", {})
        if not isinstance(metadata, dict):
            raise FormatError("manifest 'metadata' must be an object")
        total = doc.get("total_bytes")
        manifest = cls(
            chunk_size, partitions, tensors, files, {str(k): str(v) for k, v in metadata.items()}
        )
        if total is not None and total != manifest.total_bytes:
            raise FormatError(
                f"total_bytes {total} does not match partitions ({manifest.total_bytes})"
            )
        return manifest


def read_manifest(folder: str | os.PathLike[str]) -> Manifest:
    """Read and validate `folder/manifest.json`."""
    path = Path(folder) / MANIFEST
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FormatError(f"{folder}: no {MANIFEST}; not a converted sllm checkpoint") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FormatError(f"{path}: cannot read manifest: {exc}") from exc
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: invalid JSON: {exc}") from exc
    try:
        return Manifest.from_json(doc)
    except FormatError as exc:
        raise type(exc)(f"{path}: {exc}") from None


def align(offset: int, alignment: int) -> int:
    """`offset` rounded up to a multiple of `alignment`."""
    return -(-offset // alignment) * alignment


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise FormatError(f"{what} must be an integer, got {value!r}")
    return value


def _list(doc: dict[str, Any], key: str) -> list[Any]:
    value = doc.get(key, [])
    if not isinstance(value, list):
        raise FormatError(f"manifest '{key}' must be a list")
    return value


def _partition(doc: Any, index: int, chunk_size: int) -> Partition:
    if not isinstance(doc, dict):
        raise FormatError(f"partition {index} is not an object")
    name = doc.get("file")
    if not isinstance(name, str) or not _PARTITION_NAME.fullmatch(name):
        raise FormatError(
            f"partition {index} file {name!r} is not a data.<k> name inside the checkpoint folder"
        )
    nbytes = _int(doc.get("nbytes"), f"partition {index} nbytes")
    if nbytes < 0 or nbytes % PAGE:
        raise FormatError(f"partition {index} size {nbytes} is not a multiple of {PAGE}")
    device = _int(doc.get("device", 0), f"partition {index} device")
    checksums = doc.get("checksums")
    if not isinstance(checksums, list) or len(checksums) != math.ceil(nbytes / chunk_size):
        raise FormatError(f"partition {index} must list one checksum per {chunk_size}-byte chunk")
    for c in checksums:
        if not isinstance(c, int) or isinstance(c, bool) or not 0 <= c < 2**32:
            raise FormatError(f"partition {index} has an invalid checksum {c!r}")
    return Partition(name, device, nbytes, tuple(checksums))


def _tensor(name: Any, doc: Any, partitions: tuple[Partition, ...]) -> TensorEntry:
    if not isinstance(doc, dict):
        raise FormatError(f"tensor {name!r} is not an object")
    dtype = doc.get("dtype")
    if not isinstance(dtype, str):
        raise FormatError(f"tensor {name!r} has no dtype")
    try:
        size = _dtypes.itemsize(dtype)
    except UnsupportedDtypeError as exc:
        raise UnsupportedDtypeError(f"tensor {name!r}: {exc}") from None
    shape = doc.get("shape")
    if not isinstance(shape, list) or any(
        not isinstance(d, int) or isinstance(d, bool) or d < 0 for d in shape
    ):
        raise FormatError(f"tensor {name!r} has an invalid shape {shape!r}")
    part = _int(doc.get("partition"), f"tensor {name!r} partition")
    if not 0 <= part < len(partitions):
        raise FormatError(f"tensor {name!r} names partition {part}, which does not exist")
    offset = _int(doc.get("offset"), f"tensor {name!r} offset")
    nbytes = _int(doc.get("nbytes"), f"tensor {name!r} nbytes")
    if nbytes != math.prod(shape) * size:
        raise FormatError(f"tensor {name!r}: nbytes {nbytes} does not match {dtype}{shape}")
    if offset < 0 or offset + nbytes > partitions[part].nbytes:
        raise FormatError(
            f"tensor {name!r} at [{offset}, {offset + nbytes}) lies outside partition {part} "
            f"({partitions[part].nbytes} bytes)"
        )
    if offset % size:
        raise FormatError(f"tensor {name!r} offset {offset} is not aligned to its dtype")
    return TensorEntry(name, dtype, tuple(shape), part, offset, nbytes)


def _relative_file(name: Any) -> str:
    if not isinstance(name, str) or not name:
        raise FormatError(f"invalid file entry {name!r}")
    path = Path(name)
    if path.is_absolute() or ".." in path.parts or name.startswith(("/", "\\")):
        raise FormatError(f"file entry {name!r} points outside the checkpoint folder")
    return name
