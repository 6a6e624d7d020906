"""The DRAM tier's building block: a pool of aligned host buffers holding checkpoints.

States of an entry:

    loading --(read ok)--> resident --(evict, when idle)--> gone
    loading --(read fails)--> gone (waiters get the same error)

Data: the manifest, one HostMemory per partition, the manifest's identity
(inode, size, mtime) to notice a replaced checkpoint, and the time of last use.
Events: checkout (hit, join a load in flight, or start one), release of the
last tensor view, eviction under capacity pressure.

An entry is *in use* while a checkout holds it or any tensor still views its
memory (the buffer's export count): such an entry is never evicted, so a
tensor handed out can never see its bytes reused. Freed buffers stay mapped
(and pinned) on a free list for the next load, which then pays no page
faults or cudaHostRegister; they are unmapped first when room is needed.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ._engine import HostMemory
from ._errors import CapacityError, FormatError
from ._format import Chunk, Manifest, read_manifest
from ._memory import allocate, cuda_available
from ._read import DEFAULT_THREADS, ReadStats, read_partitions

HUGE_PAGE = 2 * 1024 * 1024
OnChunk = Callable[[Chunk, HostMemory], None]


class HostSource(Protocol):
    """Where a checkpoint's bytes come from when the pool does not hold it."""

    def manifest(self) -> Manifest:
        """The checkpoint's manifest (buffers are sized from it)."""
        ...

    def read_into(self, buffers: Sequence[HostMemory], on_chunk: OnChunk | None) -> ReadStats:
        """Fill one buffer per partition, calling `on_chunk` as each verified chunk lands."""
        ...


@dataclass(frozen=True)
class FolderSource:
    """A converted checkpoint folder on a local disk, read with the native engine."""

    folder: Path
    verify: str = "always"
    threads: int = DEFAULT_THREADS
    direct: bool = True

    def manifest(self) -> Manifest:
        """The folder's manifest.json."""
        return read_manifest(self.folder)

    def read_into(self, buffers: Sequence[HostMemory], on_chunk: OnChunk | None) -> ReadStats:
        """Read every partition with O_DIRECT and many threads."""
        return read_partitions(
            self.folder,
            self.manifest(),
            buffers,
            verify=self.verify,
            threads=self.threads,
            direct=self.direct,
            on_chunk=on_chunk,
        )


@dataclass
class HostCheckpoint:
    """A checkpoint resident in host memory: its manifest and one buffer per partition."""

    folder: Path
    manifest: Manifest
    buffers: tuple[HostMemory, ...]
    stats: ReadStats | None = None
    hit: bool = False  # True when served from memory without reading

    @property
    def nbytes(self) -> int:
        """Bytes the checkpoint occupies in the pool."""
        return sum(b.nbytes for b in self.buffers)

    def in_use(self) -> bool:
        """Whether any tensor still views this checkpoint's memory."""
        return any(b.exports > 0 for b in self.buffers)


@dataclass
class _Entry:
    identity: tuple[int, int, int]
    ready: threading.Event = field(default_factory=threading.Event)
    checkpoint: HostCheckpoint | None = None
    error: BaseException | None = None
    holds: int = 0
    last_used: float = 0.0


def _identity(folder: Path) -> tuple[int, int, int]:
    try:
        st = (folder / "manifest.json").stat()
    except FileNotFoundError:
        raise FormatError(f"{folder}: no manifest.json; not a converted sllm checkpoint") from None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class HostPool:
    """Keeps loaded checkpoints in host memory up to `capacity` bytes, LRU, single-flight."""

    def __init__(
        self,
        capacity: int,
        *,
        pin: bool | None = None,
        threads: int = DEFAULT_THREADS,
        direct: bool = True,
        verify: str = "always",
    ) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.pin = cuda_available() if pin is None else pin
        self.threads = threads
        self.direct = direct
        self.verify = verify
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._free: list[HostMemory] = []
        self._orphans: list[HostMemory] = []  # replaced while in use: freed once unviewed
        self._mapped = 0
        self.hits = 0
        self.misses = 0

    # ---------------------------------------------------------------- queries
    @property
    def used_bytes(self) -> int:
        """Bytes mapped by the pool: resident checkpoints plus free buffers."""
        return self._mapped

    def __contains__(self, folder: str | os.PathLike[str]) -> bool:
        entry = self._entries.get(_key(folder))
        return entry is not None and entry.checkpoint is not None

    def resident(self) -> list[tuple[str, int, bool]]:
        """(folder, bytes, in use) of every resident checkpoint, least recently used first."""
        with self._lock:
            items = sorted(self._entries.items(), key=lambda kv: kv[1].last_used)
            return [
                (k, e.checkpoint.nbytes, e.holds > 0 or e.checkpoint.in_use())
                for k, e in items
                if e.checkpoint is not None
            ]

    # ---------------------------------------------------------------- actions
    def reserve(self, sizes: Iterable[int]) -> None:
        """Map, fault in (and pin) free buffers of these sizes now, as an invoker does at start."""
        for size in sizes:
            need = _round(size)
            with self._lock:
                self._make_room(need, reuse=False)
                self._mapped += need
            try:
                mem = allocate(need, pin=self.pin, prefault=True)
            except BaseException:
                with self._lock:
                    self._mapped -= need
                raise
            with self._lock:
                self._free.append(mem)

    @contextlib.contextmanager
    def checkout(
        self,
        folder: str | os.PathLike[str],
        *,
        on_chunk: OnChunk | None = None,
        source: HostSource | None = None,
    ) -> Iterator[HostCheckpoint]:
        """Hold a checkpoint in memory for the duration of the block, loading it if needed.

        Concurrent checkouts of one folder share a single read. `on_chunk`
        runs for each chunk as it lands, only in the caller that does the read.
        Without a `source` the bytes are read from `folder` and a checkpoint
        replaced on disk is noticed; with one, `folder` is only the key and
        must name immutable content (the invoker keys by content digest), and
        a miss fills the buffers from the source.
        """
        key = _key(folder)
        path = Path(key)
        if source is None:
            identity = _identity(path)
            source = FolderSource(path, self.verify, self.threads, self.direct)
        else:
            identity = _IMMUTABLE
        leader = resident = False
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.identity != identity and entry.ready.is_set():
                self._retire(key, entry)  # the checkpoint on disk was replaced
                entry = None
            if entry is None:
                entry = self._entries[key] = _Entry(identity)
                leader = True
                self.misses += 1
            elif entry.checkpoint is not None:
                self.hits += 1
                resident = True
            entry.holds += 1
        try:
            if leader:
                self._load(key, path, entry, source, on_chunk)
            else:
                entry.ready.wait()
                if entry.error is not None:
                    raise entry.error
            assert entry.checkpoint is not None
            entry.last_used = time.monotonic()
            ckpt = entry.checkpoint
            yield HostCheckpoint(
                ckpt.folder,
                ckpt.manifest,
                ckpt.buffers,
                ckpt.stats if leader else None,
                hit=resident,  # a caller that waited for another's read is not a hit
            )
        finally:
            with self._lock:
                entry.holds -= 1
                entry.last_used = time.monotonic()

    def evict(self, folder: str | os.PathLike[str]) -> bool:
        """Drop a checkpoint that nothing uses; its buffers go to the free list."""
        key = _key(folder)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.checkpoint is None or not self._idle(entry):
                return False
            self._drop(key, entry)
            return True

    def clear(self) -> None:
        """Evict every idle checkpoint and unmap every free buffer."""
        with self._lock:
            for key, entry in list(self._entries.items()):
                if entry.checkpoint is not None and self._idle(entry):
                    self._drop(key, entry)
            while self._free:
                self._unmap(self._free.pop())

    # --------------------------------------------------------------- internal
    def _load(
        self,
        key: str,
        path: Path,
        entry: _Entry,
        source: HostSource,
        on_chunk: OnChunk | None,
    ) -> None:
        try:
            manifest = source.manifest()
            buffers: list[HostMemory] = []
            try:
                for part in manifest.partitions:
                    buffers.append(self._take(part.nbytes))
                stats = source.read_into(buffers, on_chunk)
            except BaseException:
                with self._lock:
                    # A view may outlive the failure (a frame in a traceback, a
                    # device pipeline): such buffers wait on the orphan list.
                    for b in buffers:
                        (self._orphans if b.exports else self._free).append(b)
                raise
            entry.checkpoint = HostCheckpoint(path, manifest, tuple(buffers), stats)
        except BaseException as exc:
            entry.error = exc
            with self._lock:
                if self._entries.get(key) is entry:
                    del self._entries[key]
            raise
        finally:
            entry.ready.set()

    def _take(self, nbytes: int) -> HostMemory:
        """A buffer of at least `nbytes`: a close fit from the free list, else a new one."""
        need = _round(nbytes)
        with self._lock:
            mem = self._make_room(need)
            if mem is not None:
                return mem
            self._mapped += need
        try:
            return allocate(need, pin=self.pin)
        except BaseException:
            with self._lock:
                self._mapped -= need
            raise

    def _fit(self, need: int) -> HostMemory | None:
        """Take the smallest free buffer that fits `need` without wasting much. Holds the lock."""
        fits = [m for m in self._free if need <= m.nbytes <= need + max(HUGE_PAGE, need // 8)]
        if not fits:
            return None
        mem = min(fits, key=lambda m: m.nbytes)
        self._free.remove(mem)
        return mem

    def _make_room(self, need: int, *, reuse: bool = True) -> HostMemory | None:
        """Make `need` bytes available. Holds the lock.

        Returns a free buffer that fits (reused: no page faults, no pinning),
        or None once `need` new bytes fit under the capacity. Frees unfitting
        free buffers first, then evicts idle checkpoints, least recently used
        first, whose buffers may themselves fit.
        """
        if need > self.capacity:
            raise CapacityError(f"{need} bytes exceed the host pool's capacity of {self.capacity}")
        self._free += [m for m in self._orphans if m.exports == 0]
        self._orphans = [m for m in self._orphans if m.exports > 0]
        while True:
            mem = self._fit(need) if reuse else None
            if mem is not None:
                return mem
            if self._mapped + need <= self.capacity:
                return None
            if self._free:
                self._unmap(self._free.pop(0))
                continue
            idle = [
                (e.last_used, k, e)
                for k, e in self._entries.items()
                if e.checkpoint is not None and self._idle(e)
            ]
            if not idle:
                raise CapacityError(
                    f"host pool full: {self._mapped} of {self.capacity} bytes in use, "
                    f"{need} more needed and nothing idle to evict"
                )
            _, key, entry = min(idle, key=lambda t: t[0])
            self._drop(key, entry)

    def _retire(self, key: str, entry: _Entry) -> None:
        if self._idle(entry):
            self._drop(key, entry)
        else:
            del self._entries[key]
            if entry.checkpoint is not None:
                self._orphans.extend(entry.checkpoint.buffers)

    def _drop(self, key: str, entry: _Entry) -> None:
        del self._entries[key]
        if entry.checkpoint is not None:
            self._free.extend(entry.checkpoint.buffers)

    def _unmap(self, mem: HostMemory) -> None:
        if mem.exports:  # still viewed: unmapping would fail; retry once it is free
            self._orphans.append(mem)
            return
        nbytes = mem.nbytes  # release() zeroes it: read first, or the capacity leaks
        mem.release()
        self._mapped -= nbytes

    @staticmethod
    def _idle(entry: _Entry) -> bool:
        return entry.holds == 0 and entry.checkpoint is not None and not entry.checkpoint.in_use()


_IMMUTABLE = (-1, -1, -1)


def _key(folder: str | os.PathLike[str]) -> str:
    return str(Path(folder).resolve())


def _round(nbytes: int) -> int:
    return max(HUGE_PAGE, -(-nbytes // HUGE_PAGE) * HUGE_PAGE)
