"""The migration benchmark's arithmetic (gaps, log parsing, medians, targets) and its settings."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any

import click
import pytest

from sllm.bench._migration_stats import (
    gaps,
    over_rounds,
    pause_after,
    ratios,
    resume_parts,
    step_condition,
    targets,
    tpot,
)
from sllm.bench.migration import QUICK, Settings, check

TIMES = [0.00, 0.02, 0.04, 0.30, 0.32]  # the module docstring's example


def test_tpot_is_the_median_gap_and_the_pause_the_largest_gap_after_the_mark() -> None:
    assert gaps(TIMES) == pytest.approx([0.02, 0.02, 0.26, 0.02])
    assert tpot(TIMES) == pytest.approx(0.02)
    assert pause_after(TIMES, 0.03) == pytest.approx(0.26)
    # A gap counts when its later token came after the mark, even if it began before.
    assert pause_after(TIMES, 0.29) == pytest.approx(0.26)
    assert pause_after(TIMES, 0.31) == pytest.approx(0.02)
    assert math.isnan(pause_after(TIMES, 1.0)) and math.isnan(tpot([0.5]))


LOG = [
    "2026-11-29T22:00:00.000Z dispatched to inv-a",
    "2026-11-29T22:00:01.250Z invoker inv-a ended the stream before its end (broken; "
    "choice 0 at token 17)",
    "2026-11-29T22:00:01.260Z resuming choice 0 on inv-b from token 17",
]


@pytest.mark.parametrize(
    ("last", "tier", "load"),
    [
        ("2026-11-29T22:00:01.300Z resumed on inv-b (warm)", "warm", 0.0),
        ("2026-11-29T22:00:01.900Z resumed on inv-b (cold from dram, load 0.512 s)", "dram", 0.512),
    ],
    ids=["warm", "cold"],
)
def test_the_resume_parts_come_from_the_activation_log(last: str, tier: str, load: float) -> None:
    parts = resume_parts([*LOG, last])
    lost = datetime(2026, 11, 29, 22, 0, 1, 250_000, tzinfo=timezone.utc).timestamp()
    assert parts["lost_at"] == pytest.approx(lost)  # the stamp of the "lost" line
    assert (parts["resumed_on"], parts["tier"], parts["load_s"]) == ("inv-b", tier, load)


def test_a_log_without_a_resume_leaves_the_parts_unknown() -> None:
    assert resume_parts(LOG[:1]) == {
        "lost_at": None,
        "resumed_on": None,
        "tier": None,
        "load_s": None,
    }


def test_medians_over_rounds_skip_nan_and_keep_words_as_values() -> None:
    rows = [
        {"pause_s": 0.03, "tier": "warm", "same_invoker": False},
        {"pause_s": math.nan, "tier": "warm", "same_invoker": True},
        {"pause_s": 0.05, "tier": "dram", "same_invoker": False},
    ]
    out = over_rounds(rows)
    assert out["pause_s"]["median"] == pytest.approx(0.04)
    assert out["tier"] == {"rounds": ["warm", "warm", "dram"]}
    assert "median" not in out["same_invoker"]


def _summary(live: float, stop: dict[str, float], gap: float = 0.3) -> dict[str, Any]:
    """Medians of a run at prompts 128 and 4096, TPOT 20 ms; `stop` maps length -> pause."""

    def med(v: float) -> dict[str, float]:
        return {"median": v}

    return {
        n: {
            "baseline": {"tpot_s": med(0.02), "total_s": med(10.0)},
            "live": {"pause_s": med(live)},
            "stop_and_recompute": {"pause_s": med(stop[n])},
            "preempt_and_restart": {"pause_s": med(1.0), "finish_s": med(11.5)},
            "resume_after_kill": {
                "gap_s": med(gap),
                "parts_s": med(0.25),
                "detection_s": med(0.01),
            },
        }
        for n in ("128", "4096")
    }


def test_ratios_per_prompt_length() -> None:
    r = ratios(_summary(0.05, {"128": 0.1, "4096": 3.0}))["4096"]
    assert r["live_pause_over_tpot"] == pytest.approx(2.5)
    assert r["stop_and_recompute_pause_over_tpot"] == pytest.approx(150.0)
    assert r["preempt_pause_over_tpot"] == pytest.approx(50.0)
    assert r["resume_gap_over_parts"] == pytest.approx(1.2)
    assert r["preempt_extra_finish_s"] == pytest.approx(1.5)


@pytest.mark.parametrize(
    ("live", "stop", "gap", "expected"),
    [
        (0.05, {"128": 0.1, "4096": 3.0}, 0.3, True),
        (0.07, {"128": 0.1, "4096": 3.0}, 0.3, False),  # 3.5x TPOT
        (0.05, {"128": 0.1, "4096": 0.1}, 0.3, False),  # stop-and-recompute does not grow
        (0.05, {"128": 0.1, "4096": 3.0}, 0.4, False),  # 1.6x the resume's parts
    ],
    ids=["all-met", "live-pause-too-long", "flat-recompute", "resume-gap-too-long"],
)
def test_targets(live: float, stop: dict[str, float], gap: float, expected: bool) -> None:
    found = targets(_summary(live, stop, gap))
    assert all(t["met"] for t in found.values()) is expected
    assert found["prompt 4096: detection of the dead connection (s)"]["met"] is True


def test_a_missing_figure_is_not_measured_rather_than_met() -> None:
    summary = _summary(0.05, {"128": 0.1, "4096": 3.0})
    del summary["128"]["live"]
    found = targets(summary)
    assert found["prompt 128: live pause / TPOT"] == {
        "value": None,
        "target": "<= 3",
        "met": None,
    }


@pytest.mark.parametrize(
    ("steps", "held"), [((0.012, 0.02), True), ((0.008, 0.02), False)], ids=["held", "too-fast"]
)
def test_the_decode_step_condition(steps: tuple[float, float], held: bool) -> None:
    summary = {
        str(n): {"baseline": {"tpot_s": {"median": s}}}
        for n, s in zip((128, 4096), steps, strict=True)
    }
    cond = step_condition(summary)
    assert cond["held"] is held and cond["decode_step_ms"]["128"] == pytest.approx(steps[0] * 1000)


def test_the_defaults_are_the_issues_and_quick_is_small() -> None:
    d = Settings()
    assert d.prompt_lens == (128, 1024, 4096) and d.context >= 4608
    assert max(d.prompt_lens) + d.output_len <= d.context
    assert QUICK.size_mb <= 10 and QUICK.rounds == 1 and len(QUICK.prompt_lens) == 2
    check(d)
    check(QUICK)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"output_len": 600}, "past --context 4608"),
        ({"at": 512}, r"--at must be in \[1, 511\]"),
    ],
    ids=["past-context", "at-past-output"],
)
def test_settings_that_cannot_run_are_refused(change: dict[str, int], message: str) -> None:
    from dataclasses import replace

    with pytest.raises(click.BadParameter, match=message):
        check(replace(Settings(), **change))


def test_registered_under_sllm_bench() -> None:
    from sllm.cli import bench

    assert "migration" in bench.commands
