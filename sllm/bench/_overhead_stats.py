"""The overhead benchmark's arithmetic: percentiles, paired differences, rates, targets.

Data in, data out; no I/O, so the unit tests check it with synthetic numbers.
Latencies are seconds on the way in and milliseconds in every summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# The "done when".
OVERHEAD_P50_MS = 5.0
OVERHEAD_P99_MS = 15.0
MIN_RATIO = 0.8
RATIO_CLIENTS = 16


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default).

    Example: percentile([1, 2, 3, 4], 50) == 2.5; percentile([1, 2, 3, 4], 100) == 4.
    NaN for no values.
    """
    if not 0 <= q <= 100:
        raise ValueError(f"q must be in [0, 100], got {q}")
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    """The median (NaN for no values)."""
    return percentile(values, 50)


def summary_ms(seconds: Sequence[float]) -> dict[str, float | int]:
    """n, p50, p90, p99, mean, min and max of `seconds`, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "n": len(ms),
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "mean": sum(ms) / len(ms) if ms else math.nan,
        "min": min(ms) if ms else math.nan,
        "max": max(ms) if ms else math.nan,
    }


def paired(minuend: Sequence[float], subtrahend: Sequence[float]) -> list[float]:
    """Per-pair differences minuend[i] - subtrahend[i] (the sequences must pair up)."""
    if len(minuend) != len(subtrahend):
        raise ValueError(f"cannot pair {len(minuend)} values with {len(subtrahend)}")
    return [a - b for a, b in zip(minuend, subtrahend, strict=True)]


def difference(minuend: Sequence[float], subtrahend: Sequence[float]) -> dict[str, Any]:
    """minuend - subtrahend two ways, in ms: per pair (then percentiles), and of percentiles.

    The per-pair view keeps noise that hits both sides of a pair out; the
    difference of percentiles is what comparing two latency reports shows.
    """
    a, b = summary_ms(minuend), summary_ms(subtrahend)
    return {
        "paired": summary_ms(paired(minuend, subtrahend)),
        "p50_difference": a["p50"] - b["p50"],
        "p99_difference": a["p99"] - b["p99"],
    }


@dataclass(frozen=True)
class LatencySamples:
    """One client's paired requests, seconds: e2e through the controller, e2e direct, runtime.

    runtime[i] is the invoker's own `timing.total_s` of direct request i
    (receipt to done, inside the invoker); controller[i] and direct[i] ran
    back to back.
    """

    controller: Sequence[float]
    direct: Sequence[float]
    runtime: Sequence[float]

    def summarise(self) -> dict[str, Any]:
        """Percentiles of each series and of the overheads (ms)."""
        return {
            "pairs": len(self.controller),
            "controller_e2e": summary_ms(self.controller),
            "direct_e2e": summary_ms(self.direct),
            "runtime": summary_ms(self.runtime),
            "overhead_vs_runtime": difference(self.controller, self.runtime),
            "overhead_vs_direct": difference(self.controller, self.direct),
            "direct_vs_runtime": difference(self.direct, self.runtime),
        }


@dataclass(frozen=True)
class LoadRun:
    """One closed-loop run of one path: completions and errors in the measured window."""

    seconds: float  # the measured window
    ok: int
    errors: int
    latencies: Sequence[float] = ()  # seconds, of the completions in the window
    client_cpu_s: float = 0.0  # CPU time of the load generator in the window
    server_cpu_s: Mapping[str, float] | None = None  # CPU seconds per server process group
    host_busy: float | None = None  # share of all CPUs busy in the window
    warmup_errors: int = 0
    error_kinds: Mapping[str, int] | None = None

    @property
    def rate(self) -> float:
        """Successful invocations per second."""
        return self.ok / self.seconds if self.seconds > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        """The run as JSON."""
        lat = summary_ms(self.latencies)
        return {
            "seconds": self.seconds,
            "ok": self.ok,
            "errors": self.errors,
            "warmup_errors": self.warmup_errors,
            "error_kinds": dict(self.error_kinds or {}),
            "rps": self.rate,
            "latency_ms": {k: lat[k] for k in ("n", "p50", "p90", "p99", "mean")},
            "client_cpu_cores": self.client_cpu_s / self.seconds if self.seconds > 0 else None,
            "server_cpu_cores": {k: v / self.seconds for k, v in (self.server_cpu_s or {}).items()}
            if self.seconds > 0
            else {},
            "server_cpu_ms_per_request": {
                k: v * 1000 / self.ok for k, v in (self.server_cpu_s or {}).items()
            }
            if self.ok
            else {},
            "host_busy": self.host_busy,
        }


def throughput_point(rounds: Sequence[Mapping[str, LoadRun]]) -> dict[str, Any]:
    """Rounds of {"direct": run, "controller": run} at one concurrency: medians and ratio.

    The ratio is median controller rate / median direct rate; the per-round
    ratios are listed too, so a drifting host shows.
    """
    direct = [r["direct"].rate for r in rounds]
    ctl = [r["controller"].rate for r in rounds]
    d, c = median(direct), median(ctl)
    docs = [{path: run.to_json() for path, run in r.items()} for r in rounds]
    ctl_cpu = [
        r["controller"]["server_cpu_ms_per_request"].get("controller", math.nan)
        for r in docs
        if r["controller"]["server_cpu_ms_per_request"]
    ]
    return {
        "rounds": docs,
        "direct_rps": d,
        "controller_rps": c,
        "ratio": c / d if d > 0 else math.nan,
        "round_ratios": [b / a if a > 0 else math.nan for a, b in zip(direct, ctl, strict=True)],
        "errors": {
            "direct": sum(r["direct"].errors for r in rounds),
            "controller": sum(r["controller"].errors for r in rounds),
        },
        "median_p50_ms": {
            path: median([r[path]["latency_ms"]["p50"] for r in docs])
            for path in ("direct", "controller")
        },
        "controller_cpu_ms_per_request": median(ctl_cpu),
        "client_cpu_cores_max": max(
            (run["client_cpu_cores"] or 0.0 for r in docs for run in r.values()), default=0.0
        ),
    }


def _target(value: float, op: str, bound: float) -> dict[str, Any]:
    met = not math.isnan(value) and (value <= bound if op == "<=" else value >= bound)
    return {"value": value, "target": f"{op} {bound:g}", "met": met}


def targets(latency: Mapping[str, Any], throughput: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets for one database, from the summaries above.

    Overhead is `overhead_vs_runtime` per pair (e2e through controller and
    invoker minus the runtime's own time). The rate target needs a point at
    RATIO_CLIENTS clients; without one it is reported as not measured (met False).
    """
    over = latency["overhead_vs_runtime"]["paired"]
    out = {
        f"overhead p50 ms (1 client) <= {OVERHEAD_P50_MS:g}": _target(
            over["p50"], "<=", OVERHEAD_P50_MS
        ),
        f"overhead p99 ms (1 client) <= {OVERHEAD_P99_MS:g}": _target(
            over["p99"], "<=", OVERHEAD_P99_MS
        ),
    }
    point = throughput.get(str(RATIO_CLIENTS))
    name = f"controller/direct rate at {RATIO_CLIENTS} clients >= {MIN_RATIO:g}"
    if point is None:
        out[name] = {"value": None, "target": f">= {MIN_RATIO:g}", "met": False, "measured": False}
    else:
        out[name] = _target(point["ratio"], ">=", MIN_RATIO)
        errors = point["errors"]["controller"]
        out[f"controller errors at {RATIO_CLIENTS} clients == 0"] = {
            "value": errors,
            "target": "== 0",
            "met": errors == 0,
        }
    return out


def all_met(per_database: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether every target of every measured database is met."""
    found = [t["met"] for d in per_database.values() for t in d.values()]
    return bool(found) and all(found)
