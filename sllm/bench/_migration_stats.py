"""The migration benchmark's arithmetic: gaps in a client's token times, ratios, targets.

A measured stream is the client's send time and the arrival time of each token (one
clock). From these:

    tpot        the median gap between consecutive tokens (no migration: the decode step
                as the client sees it)
    pause       the largest gap between consecutive tokens whose later token arrived
                after `mark` (the migrate request, the abort, the kill): what the client
                waits at the switch-over, the worst step of the migration included

Example: tokens at 0.00, 0.02, 0.04, 0.30, 0.32 s with the migrate request at 0.03: the
gaps after it are 0.26 (0.04 -> 0.30) and 0.02, so the pause is 0.26 s, 13x a TPOT of
0.02 s.

The targets (issue 14), per prompt length: the live switch-over pause at most 3x the
median TPOT; stop-and-recompute's pause growing with the prompt length; a resume's
client-visible gap within 1.5x of its parts (detection + the destination's load +
prefill of the whole sequence), with detection under 1 s.
"""

from __future__ import annotations

import itertools
import math
import re
import statistics
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

LIVE_PAUSE_BOUND = 3.0  # x TPOT
RESUME_BOUND = 1.5  # x (detection + load + prefill)
DETECTION_BOUND_S = 1.0
MIN_STEP_S = 0.010  # the condition on the model: a decode step of at least 10 ms

_RESUMED = re.compile(r"resumed on (\S+) \((?:warm|cold from (\w+), load ([0-9.]+) s)\)")
_LOST = re.compile(r"\(\w+; choice 0 at token \d+\)")


def gaps(times: Sequence[float]) -> list[float]:
    """Gaps between consecutive token arrivals."""
    return [b - a for a, b in itertools.pairwise(times)]


def tpot(times: Sequence[float]) -> float:
    """The median inter-token gap (nan with fewer than two tokens)."""
    found = gaps(times)
    return statistics.median(found) if found else math.nan


def pause_after(times: Sequence[float], mark: float) -> float:
    """The largest gap whose later token arrived after `mark` (nan if none did)."""
    after = [b - a for a, b in itertools.pairwise(times) if b > mark]
    return max(after) if after else math.nan


def over_rounds(rows: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per figure: the median over the rounds (numbers; nan left out) and every round's value.

    A figure that is not a number (a tier, a flag) keeps its values only.
    """
    out: dict[str, dict[str, Any]] = {}
    for key in rows[0] if rows else ():
        values = [row.get(key) for row in rows]
        numbers = [
            float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)
        ]
        out[key] = {}
        if len(numbers) == len(values):
            finite = [v for v in numbers if not math.isnan(v)]
            out[key]["median"] = statistics.median(finite) if finite else math.nan
        out[key]["rounds"] = values
    return out


def histogram_totals(text: str, metric: str, labels: str) -> tuple[float, float]:
    """(sum, count) of one series of a Prometheus histogram, e.g. labels 'tier="warm"'."""
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith("#") or "{" + labels + "}" not in line:
            continue
        name, value = line.split("{", 1)[0], float(line.rsplit(" ", 1)[1])
        if name == f"{metric}_sum":
            total = value
        elif name == f"{metric}_count":
            count = value
    return total, count


def log_time(line: str) -> float | None:
    """The epoch seconds of an activation log line ("2026-01-01T10:00:00.123Z message")."""
    stamp = line.split(" ", 1)[0]
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def resume_parts(lines: Sequence[str]) -> dict[str, Any]:
    """From an activation's log: when the loss was seen, and how the destination started.

    {"lost_at": epoch s of the first "(reason; choice 0 at token k)" line or None,
     "resumed_on": invoker, "tier": "warm" or the tier it loaded from, "load_s": seconds}
    """
    out: dict[str, Any] = {"lost_at": None, "resumed_on": None, "tier": None, "load_s": None}
    for line in lines:
        if out["lost_at"] is None and _LOST.search(line):
            out["lost_at"] = log_time(line)
        found = _RESUMED.search(line)
        if found and out["resumed_on"] is None:
            out["resumed_on"] = found.group(1)
            out["tier"] = found.group(2) or "warm"
            out["load_s"] = float(found.group(3) or 0.0)
    return out


def median_of(summary: Mapping[str, Any], length: str, variant: str, metric: str) -> float:
    """A median from `summary[length][variant][metric]`, nan when not measured."""
    try:
        return float(summary[length][variant][metric]["median"])
    except (KeyError, TypeError, ValueError):
        return math.nan


def _div(a: float, b: float) -> float:
    return a / b if b > 0 and not math.isnan(a) else math.nan


def ratios(summary: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Per prompt length: pause / TPOT (live and stop-and-recompute), the resume's gap over
    its parts, and preempt-and-restart's extra time to finish over the baseline's total."""
    out: dict[str, dict[str, float]] = {}
    for length in summary:
        step = median_of(summary, length, "baseline", "tpot_s")
        parts = median_of(summary, length, "resume_after_kill", "parts_s")
        gap = median_of(summary, length, "resume_after_kill", "gap_s")
        finish = median_of(summary, length, "preempt_and_restart", "finish_s")
        total = median_of(summary, length, "baseline", "total_s")
        out[length] = {
            "live_pause_over_tpot": _div(median_of(summary, length, "live", "pause_s"), step),
            "stop_and_recompute_pause_over_tpot": _div(
                median_of(summary, length, "stop_and_recompute", "pause_s"), step
            ),
            "preempt_pause_over_tpot": _div(
                median_of(summary, length, "preempt_and_restart", "pause_s"), step
            ),
            "resume_gap_over_parts": _div(gap, parts),
            "preempt_extra_finish_s": finish - total,
        }
    return out


def targets(summary: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each target with its value, bound and met (None when a figure is missing)."""
    rs = ratios(summary)
    out: dict[str, dict[str, Any]] = {}
    for length, r in rs.items():
        out[f"prompt {length}: live pause / TPOT"] = _check(
            r["live_pause_over_tpot"], "<=", LIVE_PAUSE_BOUND
        )
        out[f"prompt {length}: resume gap / (detection + load + prefill)"] = _check(
            r["resume_gap_over_parts"], "<=", RESUME_BOUND
        )
        out[f"prompt {length}: detection of the dead connection (s)"] = _check(
            median_of(summary, length, "resume_after_kill", "detection_s"), "<", DETECTION_BOUND_S
        )
    lengths = sorted(summary, key=int)
    pauses = [median_of(summary, n, "stop_and_recompute", "pause_s") for n in lengths]
    name = "stop-and-recompute pause grows with the prompt length (longest / shortest)"
    if len(pauses) < 2 or any(math.isnan(p) for p in pauses):
        out[name] = {"value": None, "target": "> 1, increasing", "met": None}
    else:
        increasing = all(b > a for a, b in itertools.pairwise(pauses))
        out[name] = {
            "value": _div(pauses[-1], pauses[0]),
            "target": "> 1, increasing",
            "met": increasing,
        }
    return out


def step_condition(summary: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's condition on the model: the baseline's decode step >= 10 ms at every length."""
    steps = {n: median_of(summary, n, "baseline", "tpot_s") for n in summary}
    known = [s for s in steps.values() if not math.isnan(s)]
    return {
        "decode_step_ms": {n: s * 1000 for n, s in steps.items()},
        "bound_ms": MIN_STEP_S * 1000,
        "held": bool(known) and min(known) >= MIN_STEP_S,
    }


def _check(value: float, op: str, bound: float) -> dict[str, Any]:
    target = f"{op} {bound:g}"
    if math.isnan(value):
        return {"value": None, "target": target, "met": None}
    met = value <= bound if op == "<=" else value < bound
    return {"value": value, "target": target, "met": met}
