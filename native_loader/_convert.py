"""Writing checkpoints: convert a safetensors/HF source, or save a state dict.

A write goes to a temporary folder beside the destination and is renamed
into place only when every byte, checksum and the manifest are on disk
(fsynced), so a partial checkpoint is never visible as a complete one.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from tqdm import tqdm

from sllm.core.files import escaping_link, fsync_dir

from ._engine import crc32c
from ._errors import ConversionError
from ._format import (
    DEFAULT_CHUNK_SIZE,
    MANIFEST,
    PAGE,
    Manifest,
    Partition,
    TensorEntry,
    reserved_file,
)
from ._layout import DeviceMap, Placement, assign_devices, plan
from ._sources import Source, SourceTensor, from_state_dict, open_source

PROGRESS_THRESHOLD = 256 * 1024 * 1024
_ZEROS = bytes(PAGE)


class _PartitionWriter:
    """Appends bytes to one partition file, checksumming every chunk on the way."""

    def __init__(self, path: Path, chunk_size: int) -> None:
        self.file = open(path, "wb", buffering=4 * 1024 * 1024)  # noqa: SIM115
        self.chunk_size = chunk_size
        self.pos = 0
        self.crc = 0
        self.fill = 0
        self.checksums: list[int] = []

    def write(self, data: memoryview) -> None:
        self.file.write(data)
        while len(data):
            take = min(len(data), self.chunk_size - self.fill)
            self.crc = crc32c(data[:take], self.crc)
            self.fill += take
            self.pos += take
            data = data[take:]
            if self.fill == self.chunk_size:
                self.checksums.append(self.crc)
                self.crc = self.fill = 0

    def pad_to(self, offset: int) -> None:
        while self.pos < offset:
            self.write(memoryview(_ZEROS)[: min(PAGE, offset - self.pos)])

    def close(self, size: int) -> tuple[int, ...]:
        self.pad_to(size)
        if self.fill:
            self.checksums.append(self.crc)
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        return tuple(self.checksums)


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    device_map: DeviceMap = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool | None = None,
    within: str | os.PathLike[str] | None = None,
) -> Manifest:
    """Convert a .safetensors file, a sharded folder or an HF model folder into `dst`.

    With `within`, every file read must lie inside that folder: a symlink that
    leads out of it is refused (what gets published must come from the folder).
    """
    source = open_source(Path(src))
    if within is not None:
        _check_within(Path(within), source)
    return write_checkpoint(
        source,
        dst,
        device_map=device_map,
        chunk_size=chunk_size,
        overwrite=overwrite,
        progress=progress,
    )


def _check_within(root: Path, source: Source) -> None:
    paths = {t.file for t in source.tensors if t.file is not None} | set(source.files.values())
    for path in sorted(paths):
        problem = escaping_link(root, path)
        if problem is not None:
            raise ConversionError(problem)


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    dst: str | os.PathLike[str],
    *,
    files: Mapping[str, str | os.PathLike[str]] | None = None,
    metadata: Mapping[str, str] | None = None,
    device_map: DeviceMap = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Manifest:
    """Write an in-memory state dict as a checkpoint; tied tensors are stored once."""
    source = Source(
        from_state_dict(state_dict),
        {name: Path(p) for name, p in (files or {}).items()},
        dict(metadata or {}),
    )
    return write_checkpoint(
        source,
        dst,
        device_map=device_map,
        chunk_size=chunk_size,
        overwrite=overwrite,
        progress=progress,
    )


def write_checkpoint(
    source: Source,
    dst: str | os.PathLike[str],
    *,
    device_map: DeviceMap = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    overwrite: bool = False,
    progress: bool | None = None,
) -> Manifest:
    """Lay out and write `source` into the folder `dst`, atomically."""
    if chunk_size <= 0 or chunk_size % PAGE:
        raise ConversionError(f"chunk_size must be a positive multiple of {PAGE}, got {chunk_size}")
    dst = Path(dst)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst}: already exists; choose to overwrite it to replace it")
    for rel in source.files:
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise ConversionError(f"extra file {rel!r} would land outside the checkpoint")
        if reserved_file(rel):
            raise ConversionError(
                f"the source has a file named {rel!r}, which is the name of the checkpoint's "
                f"own {'manifest' if rel == MANIFEST else 'partition file'}; "
                "rename or remove it, then convert again"
            )
    stored = [t for t in source.tensors if t.alias_of is None]
    devices = assign_devices([(t.name, t.nbytes) for t in stored], device_map)
    device_ids = sorted(set(devices)) or [0]
    part_of = {d: i for i, d in enumerate(device_ids)}
    placements, sizes = plan(
        [(t.name, t.nbytes, part_of[d]) for t, d in zip(stored, devices, strict=True)]
    )
    sizes += [0] * (len(device_ids) - len(sizes))

    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        entries = _write_data(tmp, stored, placements, sizes, chunk_size, progress)
        partitions = tuple(
            Partition(f"data.{i}", device_ids[i], sizes[i], entries[1][i])
            for i in range(len(sizes))
        )
        tensors = dict(entries[0])
        for t in source.tensors:
            if t.alias_of is not None:
                base = tensors[t.alias_of]
                tensors[t.name] = TensorEntry(
                    t.name, base.dtype, base.shape, base.partition, base.offset, base.nbytes
                )
        ordered = {t.name: tensors[t.name] for t in source.tensors}
        for rel, path in source.files.items():
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        manifest = Manifest(chunk_size, partitions, ordered, tuple(source.files), source.metadata)
        _write_json(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        _publish(tmp, dst, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write_data(
    folder: Path,
    stored: list[SourceTensor],
    placements: list[Placement],
    sizes: list[int],
    chunk_size: int,
    progress: bool | None,
) -> tuple[list[tuple[str, TensorEntry]], list[tuple[int, ...]]]:
    total = sum(t.nbytes for t in stored)
    show = (
        progress if progress is not None else (total >= PROGRESS_THRESHOLD and sys.stderr.isatty())
    )
    writers = [_PartitionWriter(folder / f"data.{i}", chunk_size) for i in range(len(sizes))]
    handles: dict[Path, BinaryIO] = {}
    entries = []
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not show) as bar:
            for t, where in zip(stored, placements, strict=True):
                w = writers[where.partition]
                w.pad_to(where.offset)
                for block in t.blocks(handles):
                    w.write(block)
                    bar.update(len(block))
                entries.append(
                    (
                        t.name,
                        TensorEntry(
                            t.name, t.dtype, t.shape, where.partition, where.offset, t.nbytes
                        ),
                    )
                )
        checksums = [w.close(size) for w, size in zip(writers, sizes, strict=True)]
    finally:
        for f in handles.values():
            f.close()
        for w in writers:
            if not w.file.closed:
                w.file.close()
    return entries, checksums


def _write_json(path: Path, manifest: Manifest) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(manifest.to_json(), f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, dst: Path, overwrite: bool) -> None:
    if dst.exists():
        if not overwrite:
            raise ConversionError(f"{dst}: appeared during conversion")
        old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:12]}"
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)
    fsync_dir(dst.parent)
