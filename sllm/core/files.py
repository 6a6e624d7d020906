"""Durable local files: what a rename-to-publish needs to survive a crash."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` (creating its folder) and fsync it, before it is published."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def escaping_link(root: Path, path: Path) -> str | None:
    """Why `path` may not be read as part of folder `root`, or None when it may.

    A symlink (of the file or of a folder on its way) may point anywhere inside
    `root`; one that leads out of it would make a copy or an upload of the folder
    carry whatever it points to (a key, another user's file), so it is refused.
    """
    target = path.resolve()
    if target.is_relative_to(root.resolve()):
        return None
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    return (
        f"{rel} leads through a symlink to {target}, outside {root}; symlinks that leave "
        "the model folder are not followed (copy the file into the folder instead)"
    )
