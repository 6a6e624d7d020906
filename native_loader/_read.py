"""Reading partitions into host memory with the native engine, chunk by chunk."""

from __future__ import annotations

import errno as errno_mod
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import _engine
from ._engine import HostMemory
from ._errors import ChecksumError, LoaderError, MissingPartitionError, ReadError
from ._format import Chunk, Manifest

DEFAULT_THREADS = 16
VERIFY_MODES = ("always", "first", "never")

_verified: set[tuple[str, int, int, int]] = set()
_verified_lock = threading.Lock()


@dataclass(frozen=True)
class ReadStats:
    """What one read did: bytes, wall time and whether O_DIRECT was used per file."""

    nbytes: int
    seconds: float
    direct: tuple[bool, ...]

    @property
    def bandwidth(self) -> float:
        """Bytes per second."""
        return self.nbytes / self.seconds if self.seconds > 0 else 0.0


def _identity(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return (str(path.resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


def check_partitions(folder: Path, manifest: Manifest) -> list[Path]:
    """The partition paths, after checking each exists and is long enough."""
    paths = []
    for i, part in enumerate(manifest.partitions):
        path = folder / part.file
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise MissingPartitionError(
                f"{path}: partition {i} is missing", str(path), 0, errno_mod.ENOENT
            ) from None
        if size < part.nbytes:
            raise ReadError(
                f"{path}: partition {i} is truncated: {size} bytes on disk, manifest says {part.nbytes}",
                str(path),
                size,
            )
        paths.append(path)
    return paths


def read_partitions(
    folder: Path,
    manifest: Manifest,
    buffers: Sequence[HostMemory],
    *,
    verify: str = "always",
    threads: int = DEFAULT_THREADS,
    direct: bool = True,
    on_chunk: Callable[[Chunk, HostMemory], None] | None = None,
) -> ReadStats:
    """Read every partition of `manifest` into `buffers` (one per partition).

    Chunks are submitted round-robin across partitions so the pipelines of
    several devices advance together; `on_chunk` runs in the calling thread
    for each chunk once its bytes are in memory and verified. Any failure
    cancels the rest and raises before the caller sees a tensor.
    """
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    paths = check_partitions(folder, manifest)
    ids = [_identity(p) for p in paths]
    with _verified_lock:
        check = verify == "always" or (verify == "first" and not all(i in _verified for i in ids))
    chunks = _interleave([list(manifest.chunks(i)) for i in range(len(paths))])
    start = time.perf_counter()
    try:
        reader = _engine.Reader([str(p) for p in paths], threads=threads, direct=direct)
    except FileNotFoundError as exc:
        raise MissingPartitionError(
            f"{exc.filename}: partition is missing", str(exc.filename), 0, errno_mod.ENOENT
        ) from None
    except OSError as exc:
        raise ReadError(
            f"{exc.filename}: cannot open: {exc.strerror}", str(exc.filename), 0, exc.errno or 0
        ) from exc
    with reader:
        for n, c in enumerate(chunks):
            reader.submit(
                c.partition,
                c.offset,
                c.length,
                buffers[c.partition],
                c.offset,
                c.crc if check else -1,
                n,
            )
        failure: BaseException | None = None
        while reader.pending:
            done = reader.next()
            if done is None:
                break
            tag, kind, err, file, offset, got = done
            if failure is not None:
                continue  # draining after a failure
            assert isinstance(tag, int)
            chunk = chunks[tag]
            if kind != _engine.OK:
                failure = _failure(paths[file], chunk, kind, err, offset, got)
            elif on_chunk is not None:
                try:
                    on_chunk(chunk, buffers[chunk.partition])
                except BaseException as exc:
                    failure = exc
            if failure is not None:
                reader.cancel()
        if failure is not None:
            raise failure
        direct_flags = reader.direct
    if check:
        with _verified_lock:
            _verified.update(ids)
    return ReadStats(manifest.total_bytes, time.perf_counter() - start, direct_flags)


def _interleave(per_partition: list[list[Chunk]]) -> list[Chunk]:
    out = []
    for i in range(max((len(c) for c in per_partition), default=0)):
        out += [c[i] for c in per_partition if i < len(c)]
    return out


def _failure(path: Path, chunk: Chunk, kind: int, err: int, offset: int, got: int) -> LoaderError:
    where = f"{path} at offset {offset} (partition {chunk.partition}, chunk {chunk.index})"
    if kind == _engine.CHECKSUM:
        return ChecksumError(
            f"checksum mismatch in {where}: crc32c {got:#010x}, manifest says {chunk.crc:#010x}",
            str(path),
            chunk.index,
            offset,
        )
    if kind == _engine.SHORT:
        return ReadError(
            f"short read in {where}: got {got} of {chunk.length} bytes", str(path), offset
        )
    if kind == _engine.OSERROR:
        return ReadError(f"I/O error in {where}: {os.strerror(err)}", str(path), offset, err)
    return ReadError(f"read cancelled in {where}", str(path), offset)
