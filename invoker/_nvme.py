"""The NVMe tier: verified checkpoint folders in a local cache with a byte budget.

    {root}/nvme/{name}@{digest}/      complete, verified checkpoints (what loads read)
    {root}/partial/{name}@{digest}/   downloads in progress or interrupted (resumable)
    {root}/meta/{name}@{digest}/      manifest, config and tokenizer files of every model
                                      seen (small; lets a DRAM-resident model be built
                                      even after its NVMe copy was evicted)

States of a model on this tier:

    absent --begin--> partial --publish (rename)--> complete --evict/discard--> absent
                      partial --failure--> partial (kept; the next begin resumes it)

Data per complete entry: bytes on disk, last use, users (loads reading it).
A complete entry with users is never evicted; a discarded one (found corrupt)
disappears from lookups at once and from disk when its last user leaves.
Partial folders count against the budget and are evicted like idle entries.

The folder is not ours alone: an operator or a disk cleaner may delete it,
or any entry in it, under a running invoker. Every lookup and every download
first reconciles the bookkeeping with the disk (missing folders are made
again, entries whose checkpoint is gone are forgotten), so the tier heals
instead of failing every load until a restart. A publish that fails (fsync,
rename) leaves the download resumable, never stuck "in progress". While the
folder's lock is lost to another invoker (`CacheLock.lost`), the tier is off:
nothing is found, begun, published, evicted or deleted there.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sllm.core.files import fsync_dir

from ._cachelock import CacheLock
from ._eviction import CachedModel, plan_eviction

log = logging.getLogger("sllm.invoker")


@dataclass
class _Entry:
    nbytes: int
    last_used: float
    users: int = 0
    doomed: bool = False


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class NvmeTier:
    """Checkpoint folders on local disk, LRU within `capacity` bytes, never evicting one in use."""

    def __init__(self, root: Path, capacity: int, *, lock: CacheLock | None = None) -> None:
        """`lock`, the invoker's claim on `root`, is taken again if the folder is remade."""
        self.root = root
        self._folder_lock = lock
        self.capacity = capacity
        self.complete_dir = root / "nvme"
        self.partial_dir = root / "partial"
        self.meta_dir = root / "meta"
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._partials: dict[str, int] = {}  # key -> bytes reserved on disk
        self._active: set[str] = set()  # partials being written now
        self._make_dirs()
        for d in self.complete_dir.iterdir():
            if (d / "manifest.json").is_file():
                self._entries[d.name] = _Entry(_folder_bytes(d), d.stat().st_mtime)
            else:
                shutil.rmtree(d, ignore_errors=True)
        for d in self.partial_dir.iterdir():
            self._partials[d.name] = _folder_bytes(d)
        for d in root.glob(".trash-*"):  # deletions a crash interrupted
            shutil.rmtree(d, ignore_errors=True)

    # ---------------------------------------------------------------- queries
    def path(self, key: str) -> Path:
        """Where the complete checkpoint `key` lives (whether or not it is there)."""
        return self.complete_dir / key

    def partial_path(self, key: str) -> Path:
        """Where the download of `key` is assembled."""
        return self.partial_dir / key

    def meta_path(self, key: str) -> Path:
        """The small-files folder of `key`."""
        return self.meta_dir / key

    def contains(self, key: str) -> bool:
        """Whether a complete, usable copy of `key` is on this tier."""
        with self._lock:
            self._reconcile()
            e = self._entries.get(key)
            return e is not None and not e.doomed and not self._lost

    @property
    def _lost(self) -> bool:
        """Whether another invoker holds the folder now: it is theirs to use and tidy."""
        return self._folder_lock is not None and self._folder_lock.lost

    @property
    def used_bytes(self) -> int:
        """Bytes of complete and partial checkpoints on disk."""
        with self._lock:
            self._reconcile()
            return sum(e.nbytes for e in self._entries.values()) + sum(self._partials.values())

    def contents(self) -> list[dict[str, object]]:
        """Every complete entry: key, bytes, in use, last used (epoch seconds)."""
        with self._lock:
            self._reconcile()
            return [
                {"key": k, "bytes": e.nbytes, "in_use": e.users > 0, "last_used": e.last_used}
                for k, e in sorted(self._entries.items(), key=lambda kv: kv[1].last_used)
                if not e.doomed
            ]

    # ---------------------------------------------------------------- actions
    @contextlib.contextmanager
    def use(self, key: str) -> Iterator[Path]:
        """Hold `key` (no eviction) while reading it; KeyError when it is not complete."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.doomed:
                raise KeyError(key)
            e.users += 1
            e.last_used = time.time()
        try:
            yield self.path(key)
        finally:
            with self._lock:
                e.users -= 1
                e.last_used = time.time()
                if e.doomed and e.users == 0:
                    self._remove_complete(key)

    def begin(self, key: str, nbytes: int) -> Path:
        """Reserve room for a download of `key` and return its partial folder.

        An existing partial folder (an interrupted download) is kept so the
        caller can resume it. Raises InsufficientCapacity when it cannot fit.
        """
        with self._lock:
            if key in self._active:
                raise RuntimeError(f"download of {key} already in progress")
            self._reconcile()
            if self._lost:  # the caller streams to memory only
                raise OSError(f"cache folder {self.root} is held by another invoker")
            have = self._partials.pop(key, 0)
            snapshot = [
                CachedModel(k, e.nbytes, e.last_used, e.users > 0) for k, e in self._entries.items()
            ] + [
                CachedModel("partial:" + k, n, 0.0, k in self._active)
                for k, n in self._partials.items()
            ]
            try:
                victims = plan_eviction(snapshot, capacity=self.capacity, need=nbytes, tier="NVMe")
            except BaseException:
                self._partials[key] = have
                raise
            for v in victims:
                if v.startswith("partial:"):
                    self._partials.pop(v[8:])
                    shutil.rmtree(self.partial_path(v[8:]), ignore_errors=True)
                else:
                    self._remove_complete(v)
            self._partials[key] = nbytes
            self._active.add(key)
        folder = self.partial_path(key)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except BaseException:
            self.abandon(key)
            raise
        return folder

    def publish(self, key: str) -> Path:
        """Atomically turn the finished partial folder of `key` into a complete entry.

        On an OSError before the rename (a failed fsync or rename) the
        download is abandoned as after any failure: its partial folder stays
        for a resume and the next `begin` of `key` may start again. Once
        renamed the entry is complete: a failed fsync of the parent folder
        only risks the rename after a crash, which the start-up scan handles.
        """
        src, dst = self.partial_path(key), self.path(key)
        try:
            fsync_dir(src)  # the data files were fsynced; this makes their names durable
            with self._lock:
                if self._lost:
                    raise OSError(f"cache folder {self.root} is held by another invoker")
                self._make_dirs()
                if dst.exists():  # an earlier publish of the same content won; keep it
                    shutil.rmtree(src, ignore_errors=True)
                else:
                    os.rename(src, dst)
                self._active.discard(key)
                nbytes = self._partials.pop(key, 0)
                self._entries[key] = _Entry(nbytes or _folder_bytes(dst), time.time())
        except OSError:
            self.abandon(key)
            raise
        try:
            fsync_dir(self.complete_dir)
        except OSError as exc:
            log.warning("NVMe entry %s published, but its folder was not synced: %s", key, exc)
        return dst

    def abandon(self, key: str) -> None:
        """The download of `key` stopped; keep its partial folder for a resume."""
        with self._lock:
            self._active.discard(key)
            folder = self.partial_path(key)
            if folder.exists():
                self._partials[key] = _folder_bytes(folder)
            else:
                self._partials.pop(key, None)

    def discard(self, key: str) -> None:
        """Drop `key` (found corrupt): hidden at once, deleted when no load reads it."""
        with self._lock:
            e = self._entries.get(key)
            if e is None:
                return
            e.doomed = True
            if e.users == 0:
                self._remove_complete(key)

    def evict(self, key: str) -> bool:
        """Delete an idle complete entry; False when it is in use or absent."""
        with self._lock:
            e = self._entries.get(key)
            if e is None or e.users > 0 or self._lost:
                return False
            self._remove_complete(key)
            return True

    def _make_dirs(self) -> None:
        for d in (self.complete_dir, self.partial_dir, self.meta_dir):
            d.mkdir(parents=True, exist_ok=True)

    def _reconcile(self) -> None:
        """Holds the lock. Bring the bookkeeping back in line with a folder changed under us.

        A few stat calls per entry; entries are whole checkpoints, so there are few.
        A folder that cannot be made again leaves the tier empty, not lookups failing.
        """
        try:
            self._make_dirs()
        except OSError as exc:
            log.warning("NVMe cache folder %s is unusable: %s", self.root, exc)
        else:
            if self._folder_lock is not None:
                self._folder_lock.reclaim()
        for key in list(self._entries):
            if not (self.path(key) / "manifest.json").is_file():
                del self._entries[key]  # a load reading it fails its checks and goes remote
        for key in list(self._partials):
            if key not in self._active and not self.partial_path(key).is_dir():
                del self._partials[key]

    def _remove_complete(self, key: str) -> None:
        """Holds the lock. The rename is instant; the slow delete runs in the background."""
        self._entries.pop(key, None)
        if self._lost:  # the folder is another invoker's now: forget the entry, keep its files
            return
        # Rename first so a half-deleted folder is never mistaken for a checkpoint.
        trash = self.root / f".trash-{key}-{time.monotonic_ns()}"
        with contextlib.suppress(FileNotFoundError):
            os.rename(self.path(key), trash)
            threading.Thread(
                target=shutil.rmtree, args=(trash,), kwargs={"ignore_errors": True}, daemon=True
            ).start()
