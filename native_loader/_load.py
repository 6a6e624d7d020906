"""Loading a converted checkpoint into tensors on the CPU or on CUDA devices.

CPU: tensors are views into the host buffer the partition was read into (no
copy). CUDA: every partition has its own pipeline (a device buffer and a
CUDA stream); each chunk's host->device copy is issued the moment the chunk
lands in pinned memory, so disk reads and copies overlap.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from . import _dtypes
from ._engine import HostMemory
from ._errors import LoaderError
from ._format import Chunk, Manifest, read_manifest
from ._memory import allocate, as_tensor, cuda_available
from ._pool import HostPool, HostSource
from ._read import DEFAULT_THREADS, ReadStats, read_partitions

Device = str | torch.device | Mapping[int, str | torch.device]


@dataclass
class LoadResult:
    """Tensors plus how they were obtained."""

    tensors: dict[str, torch.Tensor]
    manifest: Manifest
    stats: ReadStats | None  # None when no bytes were read (a pool hit or a shared load)
    hit: bool  # served from a host pool without reading


class _DevicePipeline:
    """One partition's way to its GPU: a device buffer and a stream of chunk copies."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device=device)
        # The caching allocator hands out `dst` in the current stream's order: its block may
        # still have kernels of a previous owner queued there, so the copies wait for them.
        self.stream.wait_stream(torch.cuda.current_stream(device))
        # ...and once `dst` is freed, its block is not reused before our copies have run.
        self.dst.record_stream(self.stream)
        self.host: torch.Tensor | None = None

    def copy(self, buffer: HostMemory, offset: int, length: int) -> None:
        if self.host is None:
            self.host = as_tensor(buffer, self.dst.numel())
        with torch.cuda.stream(self.stream):
            self.dst[offset : offset + length].copy_(
                self.host[offset : offset + length], non_blocking=True
            )

    def abandon(self) -> None:
        """Wait for issued copies and drop the host view (after a failed load)."""
        self.stream.synchronize()
        self.host = None

    def finish(self) -> torch.Tensor:
        self.stream.synchronize()
        self.host = None
        return self.dst


def resolve_devices(device: Device, manifest: Manifest) -> list[torch.device]:
    """The torch device of every partition for a `device` argument.

    "cpu", "cuda", "cuda:N": everything there. "auto": each partition on the
    CUDA device it was converted for (all on the CPU without CUDA). A mapping
    {partition: device} places partitions one by one.
    """
    n = len(manifest.partitions)
    if isinstance(device, Mapping):
        missing = [i for i in range(n) if i not in device]
        if missing:
            raise ValueError(f"device map leaves partitions {missing} without a device")
        out = [torch.device(device[i]) for i in range(n)]
    elif device == "auto":
        out = [
            torch.device("cuda", p.device) if cuda_available() else torch.device("cpu")
            for p in manifest.partitions
        ]
    else:
        try:
            out = [torch.device(device)] * n
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"invalid device {device!r}: {exc}") from None
    for d in out:
        if d.type == "cuda":
            if not cuda_available():
                raise ValueError(f"device {d} requested but CUDA is not available")
            if d.index is not None and d.index >= torch.cuda.device_count():
                raise ValueError(
                    f"device {d} does not exist ({torch.cuda.device_count()} CUDA devices)"
                )
        elif d.type != "cpu":
            raise ValueError(f"unsupported device {d}; use cpu or cuda[:N]")
    return out


def views(manifest: Manifest, bases: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """A tensor per manifest entry, viewing the partition buffers (no copy)."""
    out = {}
    for name, e in manifest.tensors.items():
        dtype = _dtypes.to_torch(e.dtype)
        out[name] = bases[e.partition][e.offset : e.offset + e.nbytes].view(dtype).view(e.shape)
    return out


def load_with_info(
    path: str | os.PathLike[str],
    device: Device = "cpu",
    *,
    pool: HostPool | None = None,
    verify: str = "always",
    threads: int = DEFAULT_THREADS,
    direct: bool = True,
    source: HostSource | None = None,
) -> LoadResult:
    """Like `load`, also saying whether bytes were read and how fast.

    With a `source` (and a `pool`), `path` is only the pool key and the bytes
    come from the source on a miss: this is how the invoker streams a
    download straight into host memory and on to the device.
    """
    folder = Path(path)
    if source is not None and pool is None:
        raise ValueError("a source needs a pool to hold what it reads")
    manifest = source.manifest() if source is not None else read_manifest(folder)
    for e in manifest.tensors.values():
        _dtypes.to_torch(e.dtype)  # unsupported dtypes fail before any I/O
    targets = resolve_devices(device, manifest)
    if pool is not None:
        return _load_pooled(folder, manifest, targets, pool, source)
    key = (
        str(folder.resolve()),
        (folder / "manifest.json").stat().st_mtime_ns,
        tuple(str(t) for t in targets),
        verify,
    )
    return _single_flight(
        key, lambda: _load_fresh(folder, manifest, targets, verify, threads, direct)
    )


def load(
    path: str | os.PathLike[str],
    device: Device = "cpu",
    *,
    pool: HostPool | None = None,
    verify: str = "always",
    threads: int = DEFAULT_THREADS,
    direct: bool = True,
) -> dict[str, torch.Tensor]:
    """Load a converted checkpoint folder into a state dict on `device`.

    `verify` is "always", "first" (once per file version in this process) or
    "never". With a `pool`, the host copy stays in the pool (DRAM tier) and
    later loads of the same folder read nothing; the pool's own read settings
    (verify, threads, direct) then apply. Concurrent loads of one
    folder share one read; on the CPU their tensors share memory.
    """
    return load_with_info(
        path, device, pool=pool, verify=verify, threads=threads, direct=direct
    ).tensors


def _load_fresh(
    folder: Path,
    manifest: Manifest,
    targets: list[torch.device],
    verify: str,
    threads: int,
    direct: bool,
) -> LoadResult:
    buffers = [
        allocate(p.nbytes, pin=t.type == "cuda")
        for p, t in zip(manifest.partitions, targets, strict=True)
    ]
    pipelines = _pipelines(manifest, targets)
    stats = read_partitions(
        folder,
        manifest,
        buffers,
        verify=verify,
        threads=threads,
        direct=direct,
        on_chunk=_feeder(pipelines),
    )
    return LoadResult(_finish(manifest, buffers, pipelines), manifest, stats, hit=False)


def _load_pooled(
    folder: Path,
    manifest: Manifest,
    targets: list[torch.device],
    pool: HostPool,
    source: HostSource | None,
) -> LoadResult:
    pipelines = _pipelines(manifest, targets)
    try:
        return _checkout(folder, manifest, pool, source, pipelines)
    except BaseException:
        for pipe in pipelines.values():  # copies in flight must not outlive the host buffer
            pipe.abandon()
        raise


def _checkout(
    folder: Path,
    manifest: Manifest,
    pool: HostPool,
    source: HostSource | None,
    pipelines: dict[int, _DevicePipeline],
) -> LoadResult:
    with pool.checkout(folder, on_chunk=_feeder(pipelines), source=source) as ckpt:
        if ckpt.manifest != manifest:
            raise LoaderError(f"{folder}: checkpoint changed while loading; retry")
        if ckpt.stats is None:  # nothing was streamed to the devices: copy it all now
            for i, pipe in pipelines.items():
                pipe.copy(ckpt.buffers[i], 0, manifest.partitions[i].nbytes)
        tensors = _finish(manifest, ckpt.buffers, pipelines)
    return LoadResult(tensors, manifest, ckpt.stats, hit=ckpt.hit)


def _finish(
    manifest: Manifest, buffers: Sequence[HostMemory], pipelines: dict[int, _DevicePipeline]
) -> dict[str, torch.Tensor]:
    """Wait for the device copies, then view every tensor in its partition's buffer."""
    bases = [
        pipelines[i].finish() if i in pipelines else as_tensor(buffers[i], p.nbytes)
        for i, p in enumerate(manifest.partitions)
    ]
    return views(manifest, bases)


def _pipelines(manifest: Manifest, targets: list[torch.device]) -> dict[int, _DevicePipeline]:
    return {
        i: _DevicePipeline(t, manifest.partitions[i].nbytes)
        for i, t in enumerate(targets)
        if t.type == "cuda"
    }


def _feeder(
    pipelines: dict[int, _DevicePipeline],
) -> Callable[[Chunk, HostMemory], None] | None:
    if not pipelines:
        return None

    def on_chunk(chunk: Chunk, buffer: HostMemory) -> None:
        pipe = pipelines.get(chunk.partition)
        if pipe is not None:
            pipe.copy(buffer, chunk.offset, chunk.length)

    return on_chunk


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: LoadResult | None = None
        self.error: BaseException | None = None


_flights: dict[tuple[object, ...], _Flight] = {}
_flights_lock = threading.Lock()


def _single_flight(key: tuple[object, ...], work: Callable[[], LoadResult]) -> LoadResult:
    with _flights_lock:
        flight = _flights.get(key)
        leader = flight is None
        if flight is None:
            flight = _flights[key] = _Flight()
    if leader:
        try:
            flight.result = work()
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with _flights_lock:
                del _flights[key]
            flight.done.set()
        return flight.result
    flight.done.wait()
    if flight.error is not None:
        raise flight.error
    assert flight.result is not None
    r = flight.result
    return LoadResult(dict(r.tensors), r.manifest, None, hit=False)
