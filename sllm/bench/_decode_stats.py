"""The decode benchmark's arithmetic: per-run stream statistics, medians over rounds, targets.

A run is a set of streams measured together. Per stream the client records
when the request was sent and when each token arrived; from these:

    tokens_per_s  all streams' output tokens / (last token of any stream - first send)
    ttft          first token - send, per stream
    tpot          (last token - first token) / (tokens - 1), per stream (vLLM's TPOT)
    itl           every gap between two consecutive tokens of a stream

Percentiles interpolate linearly between order statistics (numpy's default),
so the p99 of fewer than 100 values lies between the two largest.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._overhead_stats import percentile

# (name, (scenario, size, system, metric) numerator, denominator, comparison, bound)
Ref = tuple[str, str, str, str]
TARGETS: tuple[tuple[str, Ref, Ref, str, float], ...] = (
    (
        "same lengths, 8 streams: batching / static generate tokens/s",
        ("same_lengths", "8", "batching", "tokens_per_s"),
        ("same_lengths", "8", "static_generate", "tokens_per_s"),
        ">=",
        0.9,
    ),
    (
        "same lengths, 16 streams: batching / static generate tokens/s",
        ("same_lengths", "16", "batching", "tokens_per_s"),
        ("same_lengths", "16", "static_generate", "tokens_per_s"),
        ">=",
        0.9,
    ),
    (
        "mixed lengths, 8 requests: batching / static generate useful tokens/s",
        ("mixed", "8", "batching", "tokens_per_s"),
        ("mixed", "8", "static_generate", "tokens_per_s"),
        ">=",
        1.3,
    ),
    (
        "mixed lengths, 16 requests: batching / static generate useful tokens/s",
        ("mixed", "16", "batching", "tokens_per_s"),
        ("mixed", "16", "static_generate", "tokens_per_s"),
        ">=",
        1.3,
    ),
    (
        "single stream: batching / no batching tokens/s",
        ("same_lengths", "1", "batching", "tokens_per_s"),
        ("same_lengths", "1", "no_batching", "tokens_per_s"),
        ">=",
        0.95,
    ),
    (
        "staggered, middle rate: batching TPOT p99 / single-stream TPOT",
        ("staggered", "middle", "batching", "tpot_p99_s"),
        ("same_lengths", "1", "batching", "tpot_p50_s"),
        "<=",
        2.0,
    ),
)


@dataclass
class StreamTimes:
    """One stream of a run: when it was sent, and when each of its tokens arrived."""

    sent: float
    tokens: list[float] = field(default_factory=list)
    useful: int | None = None  # tokens that count (static batches pad shorter requests)

    @property
    def counted(self) -> list[float]:
        """Arrival times of the tokens that count."""
        return self.tokens if self.useful is None else self.tokens[: self.useful]


def run_stats(streams: Sequence[StreamTimes], *, end: float | None = None) -> dict[str, float]:
    """The statistics of one run (see the module docstring).

    `end` is when the run's result was complete for its user (a static batch
    ends when `generate` returns, after the longest row); default: the last
    counted token.
    """
    counted = [s.counted for s in streams]
    tokens = sum(len(c) for c in counted)
    start = min(s.sent for s in streams)
    last = max((c[-1] for c in counted if c), default=start)
    wall = (end if end is not None else last) - start
    ttft = [c[0] - s.sent for s, c in zip(streams, counted, strict=True) if c]
    tpot = [(c[-1] - c[0]) / (len(c) - 1) for c in counted if len(c) > 1]
    itl = [b - a for c in counted for a, b in itertools.pairwise(c)]
    return {
        "tokens": float(tokens),
        "wall_s": wall,
        "tokens_per_s": tokens / wall if wall > 0 else math.nan,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
    }


def over_rounds(runs: Sequence[Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per metric: the median over the rounds' runs, and every round's value."""
    if not runs:
        return {}
    out: dict[str, dict[str, Any]] = {}
    for metric in runs[0]:
        values = [r[metric] for r in runs]
        finite = [v for v in values if not math.isnan(v)]
        out[metric] = {
            "median": statistics.median(finite) if finite else math.nan,
            "rounds": values,
        }
    return out


def lookup(results: Mapping[str, Any], ref: Ref) -> float | None:
    """The median a target refers to, or None when the run did not measure it."""
    scenario, size, system, metric = ref
    try:
        value = results[scenario][size][system][metric]["median"]
    except (KeyError, TypeError):
        return None
    return float(value)


def met(value: float, op: str, bound: float) -> bool:
    """Whether `value op bound` holds (op is >=, <=, > or <); nan never meets a target."""
    ops = {
        ">=": value >= bound,
        "<=": value <= bound,
        ">": value > bound,
        "<": value < bound,
    }
    if op not in ops:
        raise ValueError(f"unknown comparison {op!r}")
    return ops[op]


def targets(results: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target's ratio of medians, its bound and whether it is met (or why not measured).

    `results` holds scenario -> size -> system -> metric -> {"median": ...}; the
    staggered scenario's middle rate is filed under the size "middle".
    """
    out: dict[str, dict[str, Any]] = {}
    for name, num_ref, den_ref, op, bound in TARGETS:
        num, den = lookup(results, num_ref), lookup(results, den_ref)
        target = f"{op} {bound:g}"
        if num is None or den is None or not den > 0 or math.isnan(num):
            out[name] = {"value": None, "target": target, "met": None, "note": "not measured"}
            continue
        value = num / den
        out[name] = {"value": value, "target": target, "met": met(value, op, bound)}
    return out
