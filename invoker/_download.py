"""Streaming a checkpoint from the object store into host memory and the NVMe tier at once.

A cold load from the store is one pipeline, not three steps: parallel ranged
GETs land each part straight in the DRAM-tier buffer, its chunks are checked
against the manifest's CRC32C there, the verified bytes are written to the
partial NVMe folder and handed on (`on_chunk`) to the device copy, all while
the next parts are still on the wire. When every part is in, the partial
folder is published atomically as a complete NVMe entry.

The NVMe copy is a by-product, never a condition: a model the NVMe tier
cannot hold (larger than its budget, or the budget held by models being read)
streams into host memory only. A disk error while writing the copy (a full or
failing disk, the partial folder deleted under us) or a failed publish (fsync,
rename) is logged, the rest streams to memory only, the partial folder is kept
for a resume, and the verified bytes in memory are served.

Resume: every chunk written is recorded in `.parts` in the partial folder
(partition, chunk index: independent of the part size). A later attempt, in
this process or another, re-reads those chunks from disk, re-checks their
CRCs (a torn write or a journal line that outlived its data is simply
fetched again) and downloads only the runs of chunks still missing.

Corruption: a part whose chunks do not match the manifest is fetched again
once (the network may have garbled it); if the store's bytes themselves are
wrong, or the object is shorter than it was published, the load fails with
CorruptObject (not a retryable store error) and nothing is published or served.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import threading
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sllm.core.errors import CorruptObject, InsufficientCapacity
from sllm.core.files import write_durably
from sllm.native_loader import (
    Chunk,
    FormatError,
    HostMemory,
    Manifest,
    OnChunk,
    ReadStats,
    crc32c,
    read_manifest,
)
from sllm.store import PublishedFile, PublishedModel, ShortObject, Store

from ._nvme import NvmeTier

log = logging.getLogger("sllm.invoker")
JOURNAL = ".parts"
PART_ATTEMPTS = 2


@dataclass(frozen=True)
class _Part:
    partition: int
    offset: int
    length: int
    chunks: tuple[Chunk, ...]


@dataclass
class DownloadStats:
    """What a download did: bytes fetched from the store, bytes resumed from disk, time."""

    fetched: int = 0
    resumed: int = 0
    seconds: float = 0.0


def cache_key(model: PublishedModel) -> str:
    """The tier key of a published model version: name@digest."""
    return f"{model.name}@{model.digest}"


def ensure_meta(store: Store, model: PublishedModel, nvme: NvmeTier) -> Path:
    """The model's small files (manifest, config, tokenizer) on local disk, fetched once."""
    folder = nvme.meta_path(cache_key(model))
    if (folder / "manifest.json").is_file():
        try:
            read_manifest(folder)
            return folder
        except FormatError:  # torn by a crash: fetch it again
            shutil.rmtree(folder, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.{os.getpid()}.{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    small = [f for f in model.files if not _is_data(f.path)]

    def fetch(f: PublishedFile) -> None:
        dst = tmp / f.path
        dst.parent.mkdir(parents=True, exist_ok=True)
        data = store.get_bytes(model.prefix + f.path)
        if len(data) != f.size:
            raise CorruptObject(
                f"model {model.name!r}: {f.path} is {len(data)} bytes in the store, "
                f"published as {f.size}"
            )
        write_durably(dst, data)

    # A handful of small GETs: one round trip each, so they go in parallel.
    try:
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(small)))) as pool:
            for done in [pool.submit(fetch, f) for f in small]:
                done.result()
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        manifest = read_manifest(tmp)
    except FormatError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CorruptObject(f"model {model.name!r}: unusable manifest in the store: {exc}") from exc
    sizes = {f.path: f.size for f in model.files}
    for p in manifest.partitions:
        if sizes.get(p.file) != p.nbytes:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CorruptObject(
                f"model {model.name!r}: partition {p.file} is published as "
                f"{sizes.get(p.file)} bytes, the manifest says {p.nbytes}"
            )
    try:
        os.rename(tmp, folder)
    except OSError:  # another thread or process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class RemoteSource:
    """A HostSource that downloads from the store, verifying and persisting on the way."""

    kind = "remote"

    def __init__(
        self,
        store: Store,
        model: PublishedModel,
        nvme: NvmeTier,
        *,
        concurrency: int = 8,
        part_size: int = 16 * 1024 * 1024,
    ) -> None:
        self.store = store
        self.model = model
        self.nvme = nvme
        self.concurrency = concurrency
        self.part_size = part_size
        self.key = cache_key(model)
        self.stats = DownloadStats()
        self._stats_lock = threading.Lock()
        self._manifest: Manifest | None = None
        self._disk_error: OSError | None = None  # set once writing the NVMe copy failed

    def manifest(self) -> Manifest:
        """The manifest, from the local meta folder (fetched from the store once)."""
        if self._manifest is None:
            self._manifest = read_manifest(ensure_meta(self.store, self.model, self.nvme))
        return self._manifest

    def read_into(self, buffers: Sequence[HostMemory], on_chunk: OnChunk | None) -> ReadStats:
        """Download every partition into `buffers` and, when it has room, the NVMe tier."""
        manifest = self.manifest()
        start = time.perf_counter()
        try:
            partial: Path | None = self.nvme.begin(self.key, self.model.total_bytes)
        except InsufficientCapacity as exc:
            log.info("%s: streaming %s to memory without an NVMe copy", exc, self.key)
            partial = None
        except OSError as exc:  # the cache folder is broken; serving does not need it
            log.warning("NVMe tier unusable (%s): streaming %s to memory only", exc, self.key)
            partial = None
        if partial is None:
            self._download(manifest, None, buffers, on_chunk)
        else:
            self._download_and_persist(manifest, partial, buffers, on_chunk)
        self.stats.seconds = time.perf_counter() - start
        return ReadStats(manifest.total_bytes, self.stats.seconds, ())

    # --------------------------------------------------------------- internal
    def _download_and_persist(
        self,
        manifest: Manifest,
        partial: Path,
        buffers: Sequence[HostMemory],
        on_chunk: OnChunk | None,
    ) -> None:
        try:
            self._download(manifest, partial, buffers, on_chunk)
        except BaseException:
            self.nvme.abandon(self.key)
            raise
        if self._disk_error is not None:  # logged when it happened
            self.nvme.abandon(self.key)
            return
        try:
            meta = self.nvme.meta_path(self.key)
            for f in self.model.files:
                if not _is_data(f.path):
                    write_durably(partial / f.path, (meta / f.path).read_bytes())
            published = self.nvme.publish(self.key)
        except OSError as exc:  # the journal lets a later load resume
            self.nvme.abandon(self.key)
            log.warning("NVMe copy of %s not published, serving it from memory: %s", self.key, exc)
            return
        # Kept until now so a failed publish resumes instead of fetching everything again.
        with contextlib.suppress(OSError):
            (published / JOURNAL).unlink(missing_ok=True)

    def _download(
        self,
        manifest: Manifest,
        partial: Path | None,
        buffers: Sequence[HostMemory],
        on_chunk: OnChunk | None,
    ) -> None:
        """Fetch every part into `buffers`, also into the files in `partial` unless None.

        A disk error only stops the NVMe copy (`_disk_error`); store errors fail the load.
        """
        parts = self._parts(manifest)
        done: set[tuple[int, int]] = set()
        fds: list[int] = []
        journal: TextIO | None = None
        try:
            if partial is not None:
                try:
                    done = _read_journal(partial / JOURNAL)
                    for p in manifest.partitions:
                        fd = os.open(partial / p.file, os.O_RDWR | os.O_CREAT, 0o644)
                        fds.append(fd)
                        if os.fstat(fd).st_size != p.nbytes:
                            os.ftruncate(fd, p.nbytes)
                    journal = open(partial / JOURNAL, "a", encoding="ascii")  # noqa: SIM115
                except OSError as exc:
                    self._lose_disk(exc)
            self._run_parts(parts, done, fds, buffers, journal, on_chunk)
            if partial is not None and self._disk_error is None:
                try:
                    for fd, p in zip(fds, manifest.partitions, strict=True):
                        os.fsync(fd)
                        _check_same_file(fd, partial / p.file)
                except OSError as exc:
                    self._lose_disk(exc)
        finally:
            if journal is not None:
                with contextlib.suppress(OSError):
                    journal.close()
            for fd in fds:
                os.close(fd)

    def _lose_disk(self, exc: OSError) -> None:
        """Stop writing the NVMe copy after a disk error; the download goes on in memory."""
        with self._stats_lock:
            if self._disk_error is not None:
                return
            self._disk_error = exc
        log.warning("NVMe copy of %s failed (%s): streaming it to memory only", self.key, exc)

    def _parts(self, manifest: Manifest) -> list[_Part]:
        per_part = max(1, self.part_size // manifest.chunk_size)
        out = []
        for i in range(len(manifest.partitions)):
            chunks = list(manifest.chunks(i))
            for j in range(0, len(chunks), per_part):
                group = tuple(chunks[j : j + per_part])
                length = sum(c.length for c in group)
                out.append(_Part(i, group[0].offset, length, group))
        # Interleave partitions so every device's pipeline advances together.
        return sorted(out, key=lambda p: (p.offset, p.partition))

    def _run_parts(
        self,
        parts: list[_Part],
        done: set[tuple[int, int]],
        fds: list[int],
        buffers: Sequence[HostMemory],
        journal: TextIO | None,
        on_chunk: OnChunk | None,
    ) -> None:
        stop = threading.Event()
        journal_lock = threading.Lock()
        files = [p.file for p in self.manifest().partitions]

        def work(part: _Part) -> _Part:
            if stop.is_set():
                return part
            with memoryview(buffers[part.partition]) as whole:
                view = whole[part.offset : part.offset + part.length]
                try:
                    todo = [
                        c
                        for c in part.chunks
                        if (c.partition, c.index) not in done
                        or not self._resume(c, fds, view, part)
                    ]
                    for run in _runs(todo):
                        start = run[0].offset - part.offset
                        length = sum(c.length for c in run)
                        sub = view[start : start + length]
                        try:
                            piece = _Part(part.partition, run[0].offset, length, tuple(run))
                            self._fetch(piece, files[part.partition], sub)
                            if journal is None or not self._persist(piece, fds, sub):
                                continue
                        finally:
                            sub.release()
                        try:
                            with journal_lock:
                                journal.writelines(f"{c.partition} {c.index}\n" for c in run)
                                journal.flush()
                        except OSError as exc:
                            self._lose_disk(exc)
                finally:
                    view.release()
            return part

        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="sllm-download") as pool:
            pending: set[Future[_Part]] = {pool.submit(work, p) for p in parts}
            try:
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        part = fut.result()
                        if on_chunk is not None:
                            for c in part.chunks:
                                on_chunk(c, buffers[c.partition])
            except BaseException:
                stop.set()
                for fut in pending:
                    fut.cancel()
                raise

    def _resume(self, chunk: Chunk, fds: list[int], view: memoryview, part: _Part) -> bool:
        """Take a journaled chunk from disk if its CRC still holds."""
        if self._disk_error is not None:
            return False
        rel = chunk.offset - part.offset
        with view[rel : rel + chunk.length] as sub:
            try:
                got = os.preadv(fds[chunk.partition], [sub], chunk.offset)
            except OSError as exc:
                self._lose_disk(exc)
                return False
            if got != chunk.length or crc32c(sub) != chunk.crc:
                return False
        with self._stats_lock:
            self.stats.resumed += chunk.length
        return True

    def _fetch(self, part: _Part, file: str, view: memoryview) -> None:
        key = self.model.prefix + file
        for attempt in range(PART_ATTEMPTS):
            try:
                self.store.get_range_into(key, part.offset, view)
            except ShortObject as exc:
                # The range comes from the published size: the object lost bytes after the push.
                published = next((f.size for f in self.model.files if f.path == file), None)
                raise CorruptObject(
                    f"model {self.model.name!r}: {file} in the store is shorter than the "
                    f"{published} bytes it was published with ({exc}); the object is corrupt "
                    "and will not be served"
                ) from exc
            with self._stats_lock:
                self.stats.fetched += part.length
            bad = _bad_chunk(part, view)
            if bad is None:
                break
            if attempt == PART_ATTEMPTS - 1:
                raise CorruptObject(
                    f"model {self.model.name!r}: {file} in the store fails its checksum at "
                    f"offset {bad.offset} (chunk {bad.index}); the object is corrupt and "
                    "will not be served"
                )

    def _persist(self, part: _Part, fds: list[int], view: memoryview) -> bool:
        """Write verified bytes to the partial copy; False once the disk has failed."""
        if self._disk_error is not None:
            return False
        try:
            written = os.pwrite(fds[part.partition], view, part.offset)
            while written < part.length:  # pwrite may write less on some filesystems
                written += os.pwrite(fds[part.partition], view[written:], part.offset + written)
        except OSError as exc:
            self._lose_disk(exc)
            return False
        return True


def _bad_chunk(part: _Part, view: memoryview) -> Chunk | None:
    for c in part.chunks:
        rel = c.offset - part.offset
        with contextlib.ExitStack() as stack:
            sub = stack.enter_context(view[rel : rel + c.length])
            if crc32c(sub) != c.crc:
                return c
    return None


def _check_same_file(fd: int, path: Path) -> None:
    """OSError unless `path` still names the file written through `fd` (folder deleted?)."""
    a, b = os.fstat(fd), os.stat(path)
    if (a.st_dev, a.st_ino) != (b.st_dev, b.st_ino):
        raise OSError(errno.ENOENT, "replaced or deleted during the download", str(path))


def _runs(chunks: list[Chunk]) -> list[list[Chunk]]:
    """Split chunks (in file order) into runs of consecutive ones: one ranged GET each."""
    runs: list[list[Chunk]] = []
    for c in chunks:
        if runs and runs[-1][-1].index + 1 == c.index:
            runs[-1].append(c)
        else:
            runs.append([c])
    return runs


def _read_journal(path: Path) -> set[tuple[int, int]]:
    done: set[tuple[int, int]] = set()
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                done.add((int(fields[0]), int(fields[1])))
    return done


def _is_data(path: str) -> bool:
    name = path.rsplit("/", 1)[-1]
    return name.startswith("data.") and name[5:].isdigit()
