"""Partition and offset planning for a conversion (pure: data in, plan out).

A device map decides which partition (target device) each tensor goes to:

- ``None``: one partition, device 0.
- an int ``n``: ``n`` partitions of about equal bytes, split between whole
  layers in name order (``model.layers.3.*`` never straddles two devices).
  Example: 4 layers of 10 MB and an embedding of 20 MB over 2 devices gives
  ``{embed, layers.0}`` on 0 and ``{layers.1..3}`` on 1 (30 MB each).
- a mapping of module prefixes to devices, as Hugging Face writes them:
  ``{"model.embed_tokens": 0, "model.layers": 0, "lm_head": 1, "": 0}``; the
  longest matching prefix wins and ``""`` matches everything.

Within a partition, tensors keep name order; large ones start on a 4 KiB
page, small ones are packed at 64-byte alignment.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ._errors import ConversionError
from ._format import LARGE_TENSOR, PAGE, SMALL_ALIGN, align

DeviceMap = int | Mapping[str, int] | None


@dataclass(frozen=True)
class Placement:
    """Where the planner put one tensor."""

    partition: int
    offset: int


def assign_devices(tensors: Sequence[tuple[str, int]], device_map: DeviceMap) -> list[int]:
    """The target device of every (name, nbytes), in input order."""
    if device_map is None:
        return [0] * len(tensors)
    if isinstance(device_map, bool) or not isinstance(device_map, (int, Mapping)):
        raise ConversionError(f"device_map must be None, an int or a mapping, got {device_map!r}")
    if isinstance(device_map, int):
        if not 1 <= device_map <= 1024:
            raise ConversionError(f"device_map must name 1..1024 devices, got {device_map}")
        return _balanced(tensors, device_map)
    return [_by_prefix(name, device_map) for name, _ in tensors]


def plan(tensors: Sequence[tuple[str, int, int]]) -> tuple[list[Placement], list[int]]:
    """Offsets for (name, nbytes, partition) triples; returns placements and partition sizes."""
    ends: dict[int, int] = {}
    placements = []
    for _, nbytes, part in tensors:
        at = align(ends.get(part, 0), PAGE if nbytes >= LARGE_TENSOR else SMALL_ALIGN)
        placements.append(Placement(part, at))
        ends[part] = at + nbytes
    sizes = [align(ends.get(p, 0), PAGE) for p in range(max(ends, default=-1) + 1)]
    return placements, sizes


def _group(name: str) -> str:
    """The layer a tensor belongs to: the name up to its first numeric component."""
    m = re.match(r"^(.*?\.\d+)(\.|$)", name)
    return m.group(1) if m else name


def _balanced(tensors: Sequence[tuple[str, int]], n: int) -> list[int]:
    groups: list[tuple[str, int]] = []  # (layer, bytes) in order
    for name, size in tensors:
        g = _group(name)
        if groups and groups[-1][0] == g:
            groups[-1] = (g, groups[-1][1] + size)
        else:
            groups.append((g, size))
    total = sum(size for _, size in groups) or 1
    device_of: dict[str, int] = {}
    device, done = 0, 0
    for g, size in groups:
        # Move on when the middle of this layer lies past this device's share:
        # each cut lands at the layer boundary closest to an equal split.
        if device < n - 1 and done + size / 2 > total * (device + 1) / n and done > 0:
            device += 1
        device_of[g] = device
        done += size
    return [device_of[_group(name)] for name, _ in tensors]


def _by_prefix(name: str, device_map: Mapping[str, int]) -> int:
    best: tuple[int, int] | None = None
    for prefix, device in device_map.items():
        if not isinstance(prefix, str) or isinstance(device, bool) or not isinstance(device, int):
            raise ConversionError(f"device_map entry {prefix!r}: {device!r} is not str -> int")
        if device < 0:
            raise ConversionError(f"device_map entry {prefix!r} names negative device {device}")
        matches = prefix == "" or name == prefix or name.startswith(prefix + ".")
        if matches and (best is None or len(prefix) > best[0]):
            best = (len(prefix), device)
    if best is None:
        raise ConversionError(f"device_map places no device for tensor {name!r}")
    return best[1]
