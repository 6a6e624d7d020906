"""The host's measured bandwidths: probed at start-up, refined from every observed load.

Three links matter for start-up time (DESIGN "Tiers"): network to the object
store, local disk read with O_DIRECT, and host->device copy. Each is a
moving estimate: the start-up probe seeds it, then every load that moved at
least MIN_OBSERVED bytes over the link nudges it (EWMA, weight ALPHA), so a
busy network or a slower disk shows up in what the invoker reports to the
scheduler.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from sllm.native_loader import HostMemory
from sllm.native_loader._engine import Reader

ALPHA = 0.3
MIN_OBSERVED = 1 << 20
LINKS = ("network", "disk", "host_to_device")


class Bandwidths:
    """Bytes/second per link; None until measured or observed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, float | None] = dict.fromkeys(LINKS)
        self._samples: dict[str, int] = dict.fromkeys(LINKS, 0)

    def get(self, link: str) -> float | None:
        """The current estimate for `link`."""
        with self._lock:
            return self._values[link]

    def set(self, link: str, value: float | None) -> None:
        """Seed `link` with a probe result."""
        with self._lock:
            self._values[link] = value

    def observe(self, link: str, nbytes: int, seconds: float) -> None:
        """Fold one observed transfer into the estimate."""
        if nbytes < MIN_OBSERVED or seconds <= 0:
            return
        rate = nbytes / seconds
        with self._lock:
            old = self._values[link]
            self._values[link] = rate if old is None else (1 - ALPHA) * old + ALPHA * rate
            self._samples[link] += 1

    def to_json(self) -> dict[str, float | None]:
        """Bytes/second per link (None: unknown)."""
        with self._lock:
            return dict(self._values)


def measure_disk(folder: Path, nbytes: int = 64 << 20, threads: int = 8) -> float:
    """Read bandwidth of `folder`'s disk with O_DIRECT and the native engine, in bytes/s."""
    path = folder / f".bandwidth-probe-{os.getpid()}"
    chunk = 4 << 20
    nbytes = max(chunk, nbytes // chunk * chunk)
    block = os.urandom(chunk)
    try:
        with open(path, "wb") as f:
            for _ in range(nbytes // chunk):
                f.write(block)
            f.flush()
            os.fsync(f.fileno())
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        mem = HostMemory(nbytes)
        start = time.perf_counter()
        with Reader([str(path)], threads=threads, direct=True) as reader:
            for i in range(nbytes // chunk):
                reader.submit(0, i * chunk, chunk, mem, i * chunk, -1, i)
            while reader.pending:
                if reader.next() is None:
                    break
        seconds = time.perf_counter() - start
        mem.release()
        return nbytes / seconds
    finally:
        path.unlink(missing_ok=True)


def measure_host_to_device(nbytes: int = 256 << 20) -> float | None:
    """Pinned host->GPU copy bandwidth in bytes/s; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    src = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(3):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 3 * nbytes / (time.perf_counter() - start)


def measure_network(fetch: Callable[[int], int]) -> float | None:
    """Network bandwidth from `fetch(limit) -> bytes read`; None when there is nothing to read."""
    fetch(1 << 20)  # connection set-up and first-byte latency are not bandwidth
    start = time.perf_counter()
    got = fetch(32 << 20)
    seconds = time.perf_counter() - start
    return got / seconds if got >= MIN_OBSERVED and seconds > 0 else None
