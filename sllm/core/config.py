"""Typed configuration helpers: byte sizes, booleans and the SLLM_HOME default."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: str | int, *, name: str = "size") -> int:
    """Bytes from "8GiB", "512M", "1.5 GB" or a plain integer; ValueError naming `name`."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"{name} must not be negative, got {value}")
        return value
    m = _SIZE.match(str(value))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise ValueError(
            f"{name}: cannot read {value!r} as a size; use bytes or a unit such as 512MiB, 8GiB, 2GB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def parse_bool(value: str, *, name: str) -> bool:
    """true/false, 1/0, yes/no, on/off; ValueError naming `name` otherwise."""
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{name}: expected true or false, got {value!r}")


def sllm_home(env: Mapping[str, str]) -> Path:
    """SLLM_HOME, defaulting to ~/.sllm: where embedded state lives."""
    return Path(env.get("SLLM_HOME") or os.path.expanduser("~/.sllm"))


def format_bytes(n: float) -> str:
    """A short human size: 1.5 GiB, 320 MiB, 12 KiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
