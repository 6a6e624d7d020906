"""An invoker's exclusive claim on its cache folder: two invokers never share one.

Two invokers on one folder would write into each other's partial downloads,
delete each other's entries on eviction and each count the folder against its
own budget. So an invoker takes an exclusive `flock` on `{cache}/.lock` at
start-up and refuses to start when another process holds it. The kernel drops
the lock when the holder exits, however it exits, so a crash never leaves a
stale lock behind; the pid written into the file only names the holder in
the error message.

Deleting the whole cache folder under a running invoker deletes the lock file
too; the NVMe tier calls `reclaim` when it makes the folder again, so the
recreated folder is locked once more. Caveat: a second invoker that starts in
between wins the folder. The first one then marks its lock `lost` (logged
once) and its NVMe tier leaves the folder alone (loads stream to memory only,
nothing is published or deleted there) until a later `reclaim` succeeds.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path

from sllm.core.errors import Conflict

log = logging.getLogger("sllm.invoker")
LOCK_FILE = ".lock"


class CacheFolderBusy(Conflict):
    """Another invoker holds the cache folder."""

    code = "cache_folder_busy"


class CacheLock:
    """An exclusive lock on a cache folder, held until `release` or process exit."""

    def __init__(self, root: Path, fd: int) -> None:
        self.root = root
        self._fd: int | None = fd
        self.lost = False  # another process holds the folder now (see the module docstring)

    @classmethod
    def acquire(cls, root: Path) -> CacheLock:
        """Lock `root` (created if missing); CacheFolderBusy when another process holds it."""
        root.mkdir(parents=True, exist_ok=True)
        path = root / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise CacheFolderBusy(
                f"cache folder {root} is in use by another invoker (pid {holder}); "
                "give each invoker its own cache folder (--cache-dir or SLLM_INVOKER_CACHE_DIR)"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:  # a failed write would otherwise hold the lock until exit
            os.close(fd)
            raise
        return cls(root, fd)

    def reclaim(self) -> None:
        """Lock the folder again if its lock file was deleted (the folder wiped under us).

        Sets `lost` while another process holds it (logged once), clears it once locked again.
        """
        fd = self._fd
        if fd is None:
            return
        try:
            have, now = os.fstat(fd), os.stat(self.root / LOCK_FILE)
            if (have.st_dev, have.st_ino) == (now.st_dev, now.st_ino):
                return
        except FileNotFoundError:
            pass
        try:
            fresh = CacheLock.acquire(self.root)
        except (CacheFolderBusy, OSError) as exc:
            if not self.lost:
                log.error(
                    "cache folder %s lost its lock: %s; the NVMe tier is off until it is back",
                    self.root,
                    exc,
                )
            self.lost = True
            return
        self._fd, fresh._fd = fresh._fd, None
        with contextlib.suppress(OSError):
            os.close(fd)
        if self.lost:
            log.warning("cache folder %s is locked again; the NVMe tier is back", self.root)
            self.lost = False

    def release(self) -> None:
        """Give the folder up (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the last descriptor drops the flock
