"""`sllm bench decode`: lengths, arrivals, statistics and targets with synthetic numbers; a smoke run."""

from __future__ import annotations

import inspect
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from sllm.bench._decode_static import left_padded
from sllm.bench._decode_stats import (
    TARGETS,
    StreamTimes,
    met,
    over_rounds,
    percentile,
    run_stats,
    targets,
)
from sllm.bench._decode_workload import (
    FIRST_TOKEN,
    TRACE,
    Request,
    draw_requests,
    find_trace,
    poisson_arrivals,
    prompt_tokens,
    rates_from_saturation,
    read_lengths,
    rotation,
    scale,
    scale_factor,
)
from sllm.bench.decode import QUICK, Settings, run


def write_trace(path: Path, rows: list[tuple[int, int]]) -> Path:
    lines = ["num_prefill_tokens,num_decode_tokens,num_total_tokens,pd_ratio"]
    lines += [f"{p},{o},{p + o},{p / o if o else 0}" for p, o in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- lengths
def test_trace_rows_with_a_zero_or_bad_count_are_skipped(tmp_path: Path) -> None:
    path = write_trace(tmp_path / "t.csv", [(10, 5), (0, 3), (4, 0), (7, 9)])
    with path.open("a") as f:
        f.write("x,y,z,w\n")

    assert read_lengths(path) == [(10, 5), (7, 9)]


def test_a_trace_without_usable_rows_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no rows"):
        read_lengths(write_trace(tmp_path / "t.csv", [(0, 1)]))


@pytest.mark.parametrize(
    ("pair", "factor", "context", "expected"),
    [
        ((1730, 415), 0.126, 1024, Request(218, 52)),
        ((8000, 149), 1024 / 8149, 1024, Request(1005, 19)),
        ((3, 2), 0.01, 1024, Request(1, 1)),  # never below one token
        ((10, 10), 1.0, 20, Request(10, 10)),
        ((11, 10), 1.0, 20, Request(10, 10)),  # the sum never exceeds the context
    ],
    ids=["median", "longest-prompt", "at-least-one", "exactly-fits", "rounded-over"],
)
def test_scale_keeps_the_shape_within_the_context(
    pair: tuple[int, int], factor: float, context: int, expected: Request
) -> None:
    got = scale(pair, factor, context)

    assert got == expected
    assert got.prompt_len + got.output_len <= context


def test_every_drawn_request_fits_and_the_draw_is_seeded() -> None:
    pairs = [(p, o) for p in range(1, 4000, 97) for o in range(1, 1000, 211)]

    a = draw_requests(pairs, 16, context=512, seed=3)
    b = draw_requests(pairs, 16, context=512, seed=3)
    c = draw_requests(pairs, 16, context=512, seed=4)

    assert a == b and a != c
    assert len(a) == 16
    assert all(r.prompt_len >= 1 and r.output_len >= 1 for r in a)
    assert all(r.prompt_len + r.output_len <= 512 for r in a)
    assert scale_factor(pairs, 512) == pytest.approx(512 / max(p + o for p, o in pairs))


def test_a_trace_that_fits_is_not_stretched() -> None:
    assert scale_factor([(10, 10)], 1024) == 1.0


def test_drawing_more_requests_than_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="cannot draw"):
        draw_requests([(1, 1)], 2, context=16, seed=0)


def test_the_trace_is_found_in_shared_beside_a_parent(tmp_path: Path) -> None:
    csv = tmp_path / "shared" / TRACE
    csv.parent.mkdir(parents=True)
    write_trace(csv, [(1, 1)])
    worktree = tmp_path / "wt" / "bench"
    worktree.mkdir(parents=True)

    assert find_trace(tmp_path / "main") == csv  # ../shared
    assert find_trace(worktree) == csv  # ../../shared
    assert find_trace(tmp_path.parent / "elsewhere") is None


def test_prompts_are_seeded_and_avoid_special_tokens() -> None:
    a = prompt_tokens(200, seed=1, vocab=260)

    assert a == prompt_tokens(200, seed=1, vocab=260)
    assert a != prompt_tokens(200, seed=2, vocab=260)
    assert len(a) == 200 and all(FIRST_TOKEN <= t < 260 for t in a)


# ---------------------------------------------------------------- arrivals
def test_poisson_arrivals_start_at_zero_increase_and_average_the_rate() -> None:
    times = poisson_arrivals(2001, 4.0, seed=0)

    assert times[0] == 0.0
    assert all(b >= a for a, b in itertools.pairwise(times))
    assert times[-1] / 2000 == pytest.approx(0.25, rel=0.1)
    assert times == poisson_arrivals(2001, 4.0, seed=0)
    assert times != poisson_arrivals(2001, 4.0, seed=1)


@pytest.mark.parametrize("rate", [0.0, -1.0, math.inf, math.nan], ids=["zero", "neg", "inf", "nan"])
def test_a_rate_must_be_positive_and_finite(rate: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(3, rate, seed=0)


def test_rates_are_fractions_of_saturation() -> None:
    assert rates_from_saturation(2.0, (0.25, 0.5, 1.0)) == [0.5, 1.0, 2.0]
    with pytest.raises(ValueError):
        rates_from_saturation(0.0, (0.5,))


def test_rotation_puts_each_system_first_in_turn() -> None:
    systems = ("a", "b", "c")

    firsts = [rotation(systems, r)[0] for r in range(4)]

    assert firsts == ["a", "b", "c", "a"]
    assert sorted(rotation(systems, 1)) == ["a", "b", "c"]


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),
        ([7.0], 99, 7.0),
        ([1.0, 2.0], 99, 1.99),
    ],
    ids=["median", "unsorted", "one-value", "interpolated"],
)
def test_percentile(values: list[float], q: float, expected: float) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan() -> None:
    assert math.isnan(percentile([], 50))


def test_run_stats_of_two_streams() -> None:
    streams = [
        StreamTimes(sent=0.0, tokens=[1.0, 1.1, 1.2, 1.3]),  # TTFT 1.0, TPOT 0.1
        StreamTimes(sent=0.5, tokens=[1.0, 1.3, 1.6]),  # TTFT 0.5, TPOT 0.3
    ]

    s = run_stats(streams)

    assert s["tokens"] == 7
    assert s["wall_s"] == pytest.approx(1.6)
    assert s["tokens_per_s"] == pytest.approx(7 / 1.6)
    assert s["ttft_p50_s"] == pytest.approx(0.75)
    assert s["tpot_p50_s"] == pytest.approx(0.2)
    assert s["tpot_p99_s"] == pytest.approx(0.1 + 0.2 * 0.99)
    assert s["itl_p50_s"] == pytest.approx(0.1)


def test_static_batches_count_only_useful_tokens_until_generate_returns() -> None:
    steps = [1.0, 2.0, 3.0, 4.0]  # the batch ran to the longest output (4)
    streams = [StreamTimes(0.0, steps, useful=4), StreamTimes(0.0, steps, useful=2)]

    s = run_stats(streams, end=4.5)

    assert s["tokens"] == 6
    assert s["tokens_per_s"] == pytest.approx(6 / 4.5)
    assert s["tpot_p50_s"] == pytest.approx(1.0)


def test_over_rounds_takes_medians_and_keeps_the_rounds() -> None:
    runs = [{"tokens_per_s": 10.0}, {"tokens_per_s": 30.0}, {"tokens_per_s": 20.0}]

    assert over_rounds(runs) == {"tokens_per_s": {"median": 20.0, "rounds": [10.0, 30.0, 20.0]}}


def med(**metrics: float) -> dict[str, dict[str, float]]:
    return {k: {"median": v} for k, v in metrics.items()}


def synthetic(**override: float) -> dict[str, Any]:
    """Medians where every target is met unless `override` changes one."""
    v = {
        "same8": 95.0,
        "static8": 100.0,
        "same16": 180.0,
        "static16": 190.0,
        "mixed8": 140.0,
        "mstatic8": 100.0,
        "mixed16": 200.0,
        "mstatic16": 150.0,
        "one": 30.0,
        "off1": 31.0,
        "tpot1": 0.030,
        "stag_p99": 0.059,
        **override,
    }
    return {
        "same_lengths": {
            "1": {
                "batching": med(tokens_per_s=v["one"], tpot_p50_s=v["tpot1"]),
                "no_batching": med(tokens_per_s=v["off1"]),
            },
            "8": {
                "batching": med(tokens_per_s=v["same8"]),
                "static_generate": med(tokens_per_s=v["static8"]),
            },
            "16": {
                "batching": med(tokens_per_s=v["same16"]),
                "static_generate": med(tokens_per_s=v["static16"]),
            },
        },
        "mixed": {
            "8": {
                "batching": med(tokens_per_s=v["mixed8"]),
                "static_generate": med(tokens_per_s=v["mstatic8"]),
            },
            "16": {
                "batching": med(tokens_per_s=v["mixed16"]),
                "static_generate": med(tokens_per_s=v["mstatic16"]),
            },
        },
        "staggered": {"middle": {"batching": med(tpot_p99_s=v["stag_p99"])}},
    }


def test_all_targets_met() -> None:
    got = targets(synthetic())

    assert len(got) == len(TARGETS)
    assert all(t["met"] is True for t in got.values()), got
    assert got["single stream: batching / no batching tokens/s"]["value"] == pytest.approx(30 / 31)


@pytest.mark.parametrize(
    ("override", "failing"),
    [
        ({"same8": 89.0}, "same lengths, 8 streams"),
        ({"same16": 170.0}, "same lengths, 16 streams"),
        ({"mixed8": 129.0}, "mixed lengths, 8 requests"),
        ({"mixed16": 194.0}, "mixed lengths, 16 requests"),
        ({"one": 29.0}, "single stream"),
        ({"stag_p99": 0.061}, "staggered, middle rate"),
    ],
    ids=["same8", "same16", "mixed8", "mixed16", "single", "staggered"],
)
def test_each_target_fails_on_its_own(override: dict[str, float], failing: str) -> None:
    got = targets(synthetic(**override))

    failed = [name for name, t in got.items() if t["met"] is False]
    assert len(failed) == 1 and failed[0].startswith(failing), got


def test_a_target_not_measured_says_so() -> None:
    doc = synthetic()
    del doc["mixed"]["16"]

    got = targets(doc)

    t = got["mixed lengths, 16 requests: batching / static generate useful tokens/s"]
    assert t == {"value": None, "target": ">= 1.3", "met": None, "note": "not measured"}


def test_nan_never_meets_a_target() -> None:
    assert not met(math.nan, ">=", 0.9) and not met(math.nan, "<=", 2.0)
    with pytest.raises(ValueError):
        met(1.0, "==", 1.0)


# ---------------------------------------------------------------- baseline and settings
def test_left_padding_right_aligns_prompts() -> None:
    ids, mask = left_padded([[5, 6], [7]], 3)

    assert ids.tolist() == [[5, 6], [3, 7]]
    assert mask.tolist() == [[1, 1], [0, 1]]
    assert ids.dtype == torch.long


def test_quick_settings_are_small_and_the_defaults_are_the_issues() -> None:
    d = Settings()

    assert d.streams == (1, 4, 8, 16) and d.mixed == (8, 16) and d.size_mb == 400
    assert len(d.rate_fractions) == 3 and max(d.rate_fractions) == 1.0
    assert QUICK.size_mb < 50 and QUICK.rounds == 1


def test_registered_under_sllm_bench() -> None:
    from sllm.cli import bench

    assert "decode" in bench.commands
    assert "trace" in inspect.signature(run).parameters


def test_invoker_batching_switch_from_env_and_flags() -> None:
    from sllm.invoker import InvokerConfig

    assert InvokerConfig.from_env({}).batching is True
    assert InvokerConfig.from_env({"SLLM_BATCHING": "0"}).batching is False
    assert InvokerConfig.from_env({"SLLM_BATCHING": "0"}, batching=True).batching is True
    with pytest.raises(ValueError, match="SLLM_BATCHING"):
        InvokerConfig.from_env({"SLLM_BATCHING": "maybe"})


# ---------------------------------------------------------------- smoke
@pytest.mark.slow
def test_quick_run_writes_every_scenario_and_target(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t.csv", [(p, o) for p in (3, 9, 20) for o in (1, 2, 4)])
    settings = Settings(
        size_mb=QUICK.size_mb,
        rounds=1,
        streams=(1, 8),
        prompt_len=4,
        output_len=3,
        mixed=(4,),
        context=24,
        staggered_requests=4,
    )
    out = tmp_path / "decode.json"
    lines: list[str] = []

    run(settings, workdir=tmp_path / "w", out=out, trace=trace, keep=False, echo=lines.append)

    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "decode" and doc["code"]["commit"]
    for system in ("batching", "no_batching", "static_generate"):
        assert doc["same_lengths"]["8"][system]["tokens"]["median"] == 24
    assert set(doc["mixed"]["4"]) == {"batching", "static_generate"}
    assert set(doc["staggered"]) == {"low", "middle", "high"}
    assert doc["warmup_outputs_match"] is True
    assert all(
        v == 1.0 for v in doc["greedy_agreement_with_no_batching"]["same_lengths/8"].values()
    )
    assert isinstance(
        doc["targets"]["same lengths, 8 streams: batching / static generate tokens/s"]["met"], bool
    )
    assert any(line.startswith("round 1/1") for line in lines)
    assert not (tmp_path / "w" / f"decode-{settings.size_mb}MB").exists()
