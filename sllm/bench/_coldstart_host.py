"""How busy the host is: a benchmark on a shared machine waits for a quiet moment.

On a 2-core host, one other process (a test run, a type checker) halves the
CPU a prefill gets and the disk bandwidth a load gets. Before each timed
start the benchmark samples /proc/stat over a short window and waits, up to
a limit, until the other processes leave the CPUs mostly idle, and then
watches how much CPU other processes took while it ran (`CpuWatch`): a start
they disturbed is repeated. What it saw is recorded with the results.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

STAT = Path("/proc/stat")


@dataclass(frozen=True)
class Quiet:
    """What the wait saw: CPU busy fraction of the last window, and seconds waited."""

    busy: float | None  # None where /proc/stat is unavailable
    waited: float


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies over all CPUs since boot, or None off Linux."""
    try:
        fields = STAT.read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


def busy_fraction(window: float = 0.5) -> float | None:
    """Fraction of all CPUs busy during the next `window` seconds (None off Linux)."""
    before = _cpu_times()
    if before is None:
        return None
    time.sleep(window)
    after = _cpu_times()
    if after is None:
        return None
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total > 0 else 0.0


def wait_quiet(threshold: float = 0.15, limit: float = 20.0, window: float = 0.5) -> Quiet:
    """Wait until the CPUs are at most `threshold` busy over a `window`, for at most `limit` s."""
    start = time.monotonic()
    while True:
        busy = busy_fraction(window)
        waited = time.monotonic() - start
        if busy is None or busy <= threshold or waited >= limit:
            return Quiet(busy, waited)


def _clock_ticks() -> int:
    return os.sysconf("SC_CLK_TCK")


def _user_jiffies_all() -> int | None:
    """user + nice jiffies of every CPU since boot (None off Linux)."""
    try:
        fields = STAT.read_text().split("\n", 1)[0].split()[1:3]
    except OSError:
        return None
    return int(fields[0]) + int(fields[1])


def _user_jiffies(pid: int) -> int:
    """utime of process `pid` (all its threads), 0 when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(text[text.rindex(")") + 2 :].split()[11])


class CpuWatch:
    """User CPU time that processes other than `pids` spent during the block.

    `foreign` is that time as a fraction of the host's capacity over the
    block's wall time (CPUs x seconds): 0 on a quiet host, 0.5 when other
    processes kept one of two CPUs busy. Kernel threads (writeback, softirq)
    are not counted: our own I/O causes them.
    """

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.foreign: float | None = None
        self._start: tuple[float, int | None, int] = (0.0, None, 0)

    def __enter__(self) -> CpuWatch:
        self._start = (time.perf_counter(), _user_jiffies_all(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._start[0]
        all_before, own_before = self._start[1], self._start[2]
        all_after = _user_jiffies_all()
        if all_before is None or all_after is None or wall <= 0:
            return
        others = (all_after - all_before) - (self._own() - own_before)
        capacity = wall * (os.cpu_count() or 1)
        self.foreign = max(0.0, others / _clock_ticks() / capacity)

    def _own(self) -> int:
        return sum(_user_jiffies(p) for p in self.pids)
