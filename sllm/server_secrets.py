"""The embedded server's admin key and the privacy of its data folder.

The admin key lives in DATA/admin.key (mode 0600), never in a log or on a
command line. Every `sllm server start` reuses it, so a key handed out once
keeps working and no stale keys pile up; `--api-key KEY` or `--new-key`
replaces it, and the key it replaces is revoked (a rotation).

    file            key asked for       outcome
    absent          none                a new key
    K, valid        none                K again
    K, revoked      none                a new key (an operator revoked K on purpose)
    K               --api-key N / new   N (or a new one); K is revoked
    any             --api-key R, R was  refused (a revocation is never undone; use --new-key)
                    revoked before
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sllm.core.names import is_api_key

KEY_FILE = "admin.key"
_PRIVATE = 0o077  # the bits a file in the data folder must not have


def key_path(data_dir: Path) -> Path:
    """DATA/admin.key."""
    return data_dir / KEY_FILE


def saved_key(data_dir: Path) -> str | None:
    """The admin key saved in the data folder, or None when there is none (or it is mangled)."""
    try:
        key = key_path(data_dir).read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return key if is_api_key(key) else None


def save_key(data_dir: Path, key: str) -> Path:
    """Write the admin key, readable by its owner only (written whole, then renamed)."""
    path = key_path(data_dir)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    os.chmod(partial, 0o600)  # O_CREAT's mode does not apply to a leftover file
    os.replace(partial, path)
    return path


def choose_key(saved: str | None, given: str, *, new: bool, revoked: bool) -> str:
    """The key to use: `given`, `saved` or a new one (see the module's table)."""
    if given:
        return given
    if new or saved is None or revoked:
        from sllm.controller import new_key

        return new_key()[2]
    return saved


@contextmanager
def private_files() -> Iterator[None]:
    """Files and folders created inside are readable by their owner only."""
    old = os.umask(_PRIVATE)
    try:
        yield
    finally:
        os.umask(old)


def make_private(data_dir: Path) -> None:
    """Create the data folder owner-only, and take group/other access off what it holds.

    A folder written by an older version had a 0644 database and log.
    """
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    for path in (data_dir, *data_dir.iterdir(), *(data_dir / "logs").glob("*")):
        if path.is_symlink():
            continue
        mode = path.stat().st_mode
        if mode & _PRIVATE:
            os.chmod(path, mode & 0o7777 & ~_PRIVATE)
