"""`sllm bench overhead`: its statistics, targets and JSON with synthetic numbers, and a smoke run."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from sllm.bench._overhead_stack import METRIC_ENDPOINT, parse_histogram
from sllm.bench._overhead_stats import (
    LatencySamples,
    LoadRun,
    all_met,
    difference,
    paired,
    percentile,
    summary_ms,
    targets,
    throughput_point,
)
from sllm.bench.overhead import breakdown, command, finite, print_table, results_document, run


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),  # order does not matter
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([7.0], 99, 7.0),
        ([float(v) for v in range(1, 102)], 99, 100.0),
        ([0.0, 10.0], 99, 9.9),
    ],
    ids=["even-median", "unsorted", "min", "max", "one-value", "p99-of-101", "interpolated"],
)
def test_percentile_interpolates_between_ranks(
    values: list[float], q: float, expected: float
) -> None:
    assert percentile(values, q) == pytest.approx(expected)


def test_percentile_of_nothing_is_nan_and_q_is_checked() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError, match="q must be in"):
        percentile([1.0], 101)


def test_summary_is_in_milliseconds() -> None:
    s = summary_ms([0.001, 0.002, 0.003])
    assert s["n"] == 3
    assert s["p50"] == pytest.approx(2.0)
    assert s["mean"] == pytest.approx(2.0)
    assert (s["min"], s["max"]) == (pytest.approx(1.0), pytest.approx(3.0))


def test_paired_differences_differ_from_the_difference_of_medians() -> None:
    ctl, direct = [0.010, 0.020, 0.030], [0.025, 0.005, 0.015]
    d = difference(ctl, direct)
    # Per pair: -15, +15, +15 ms -> median 15; medians: 20 - 15 = 5 ms.
    assert d["paired"]["p50"] == pytest.approx(15.0)
    assert d["p50_difference"] == pytest.approx(5.0)
    with pytest.raises(ValueError, match="cannot pair"):
        paired([1.0, 2.0], [1.0])


def test_latency_overheads_subtract_the_right_series() -> None:
    runtime = [0.002 + i * 1e-5 for i in range(100)]
    samples = LatencySamples(
        controller=[r + 0.004 for r in runtime],
        direct=[r + 0.001 for r in runtime],
        runtime=runtime,
    )
    lat = samples.summarise()
    assert lat["pairs"] == 100
    assert lat["overhead_vs_runtime"]["paired"]["p50"] == pytest.approx(4.0)
    assert lat["overhead_vs_runtime"]["paired"]["p99"] == pytest.approx(4.0)
    assert lat["overhead_vs_direct"]["paired"]["p50"] == pytest.approx(3.0)
    assert lat["direct_vs_runtime"]["paired"]["p50"] == pytest.approx(1.0)
    assert lat["runtime"]["p50"] == pytest.approx(runtime[49] * 500 + runtime[50] * 500)


def test_load_run_rates_and_cpu_shares() -> None:
    r = LoadRun(
        seconds=2.0,
        ok=100,
        errors=1,
        latencies=[0.01] * 100,
        client_cpu_s=0.5,
        server_cpu_s={"controller": 1.0, "invoker": 0.4},
        host_busy=0.9,
        error_kinds={"HTTP 503": 1},
    )
    doc = r.to_json()
    assert r.rate == 50.0
    assert doc["client_cpu_cores"] == pytest.approx(0.25)
    assert doc["server_cpu_cores"] == {"controller": 0.5, "invoker": 0.2}
    assert doc["server_cpu_ms_per_request"]["controller"] == pytest.approx(10.0)
    assert doc["latency_ms"]["p50"] == pytest.approx(10.0)
    assert doc["error_kinds"] == {"HTTP 503": 1}


def _run(rate: float, errors: int = 0, seconds: float = 10.0) -> LoadRun:
    return LoadRun(
        seconds=seconds,
        ok=int(rate * seconds),
        errors=errors,
        latencies=[0.01],
        server_cpu_s={"controller": 1.0},
    )


def test_throughput_point_takes_medians_then_their_ratio() -> None:
    rounds = [
        {"direct": _run(100), "controller": _run(90)},
        {"direct": _run(300), "controller": _run(60, errors=2)},
        {"direct": _run(200), "controller": _run(180)},
    ]
    p = throughput_point(rounds)
    assert p["direct_rps"] == pytest.approx(200)
    assert p["controller_rps"] == pytest.approx(90)
    assert p["ratio"] == pytest.approx(0.45)
    assert p["round_ratios"] == pytest.approx([0.9, 0.2, 0.9])
    assert p["errors"] == {"direct": 0, "controller": 2}
    assert len(p["rounds"]) == 3 and set(p["rounds"][0]) == {"direct", "controller"}


def _latency(p50_s: float, p99_s: float) -> dict[str, Any]:
    runtime = [0.0] * 100  # exact differences: the bounds below are tested inclusively
    over = [p50_s] * 98 + [p99_s] * 2  # p99 of 100 values sits between the two largest
    return LatencySamples(
        [r + o for r, o in zip(runtime, over, strict=True)], runtime, runtime
    ).summarise()


@pytest.mark.parametrize(
    ("p50", "p99", "ratio", "errors", "met"),
    [
        (0.004, 0.010, 0.85, 0, [True, True, True, True]),
        (0.005, 0.015, 0.80, 0, [True, True, True, True]),  # the bounds are inclusive
        (0.006, 0.010, 0.85, 0, [False, True, True, True]),
        (0.004, 0.020, 0.85, 0, [True, False, True, True]),
        (0.004, 0.010, 0.79, 0, [True, True, False, True]),
        (0.004, 0.010, 0.95, 3, [True, True, True, False]),
    ],
    ids=["all-met", "at-the-bounds", "p50-high", "p99-high", "ratio-low", "errors"],
)
def test_targets(p50: float, p99: float, ratio: float, errors: int, met: list[bool]) -> None:
    point = {"ratio": ratio, "errors": {"direct": 0, "controller": errors}}
    t = targets(_latency(p50, p99), {"16": point, "64": {**point, "ratio": 0.1}})
    assert [v["met"] for v in t.values()] == met
    assert all_met({"sqlite": t}) is all(met)


def test_rate_target_without_a_16_client_point_is_not_met() -> None:
    t = targets(_latency(0.001, 0.002), {"4": {"ratio": 1.0, "errors": {"controller": 0}}})
    rate = next(v for k, v in t.items() if "rate at 16" in k)
    assert rate["met"] is False and rate["measured"] is False
    assert all_met({}) is False


def test_histogram_sum_and_count_for_one_endpoint() -> None:
    text = "\n".join(
        [
            "# HELP sllm_controller_request_seconds HTTP request latency",
            f'sllm_controller_request_seconds_bucket{{endpoint="{METRIC_ENDPOINT}",le="0.01"}} 3.0',
            f'sllm_controller_request_seconds_sum{{endpoint="{METRIC_ENDPOINT}"}} 0.25',
            f'sllm_controller_request_seconds_count{{endpoint="{METRIC_ENDPOINT}"}} 10.0',
            'sllm_controller_request_seconds_sum{endpoint="/readyz"} 9.0',
            'sllm_controller_request_seconds_count{endpoint="/readyz"} 99.0',
        ]
    )
    assert parse_histogram(text, "sllm_controller_request_seconds", METRIC_ENDPOINT) == (0.25, 10.0)


def test_breakdown_splits_a_controller_request() -> None:
    samples = LatencySamples(
        controller=[0.020, 0.030], direct=[0.005, 0.005], runtime=[0.003, 0.003]
    )
    records: list[dict[str, Any] | None] = [
        {"wait_ms": 2.0, "duration_ms": 6.0},
        None,  # a request without a record is left out
    ]
    bd = breakdown(samples, records, (1.0, 100.0), (1.036, 102.0))
    assert bd["records"] == 1
    assert bd["before_dispatch"]["p50"] == pytest.approx(2.0)
    assert bd["dispatch_minus_runtime"]["p50"] == pytest.approx(3.0)
    assert bd["outside_run"]["p50"] == pytest.approx(12.0)
    assert bd["server_mean"] == pytest.approx(18.0)
    assert bd["client_minus_server_mean"] == pytest.approx(7.0)


def _document() -> dict[str, Any]:
    lat = _latency(0.004, 0.010)
    samples = LatencySamples([0.02], [0.005], [0.003])
    lat["controller_breakdown"] = breakdown(samples, [None], (0.0, 0.0), (0.0, 0.0))
    lat["errors"] = {}
    lat["cpu_ms_per_pair"] = {"controller": 10.0, "invoker": 6.0}
    tp = {"16": throughput_point([{"direct": _run(100), "controller": _run(85)}])}
    db = {"url": "sqlite:///x", "latency_ms": lat, "throughput": tp, "targets": targets(lat, tp)}
    machine = {"cpus": 2, "loadavg": {"start": [0.5, 0, 0], "end": [0.7, 0, 0]}}
    settings = {
        "requests": 100,
        "duration_s": 10.0,
        "rounds": 1,
        "controller_workers": 2,
        "controller_threads": 32,
        "invoker_threads": 64,
    }
    return results_document(machine, settings, {"sqlite": db, "postgres": {"skipped": "down"}})


def test_document_shape_and_json_without_nan() -> None:
    doc = _document()
    assert set(doc) >= {"benchmark", "definitions", "machine", "settings", "databases", "targets"}
    assert set(doc["targets"]) == {"sqlite"}  # a skipped database has no targets
    assert doc["all_met"] is True
    assert doc["settings"]["function"]["limits"]["concurrency"] == 64
    text = json.dumps(finite(doc), allow_nan=False)  # the breakdown's NaN server mean -> null
    back = json.loads(text)
    assert back["databases"]["sqlite"]["latency_ms"]["controller_breakdown"]["server_mean"] is None


def test_table_names_every_database_and_target() -> None:
    lines: list[str] = []
    print_table(_document(), lines.append)
    text = "\n".join(lines)
    assert "[sqlite]" in text and "[postgres] skipped: down" in text
    assert "overhead p50 ms (1 client) <= 5" in text
    assert "all targets met: yes" in text


@pytest.mark.parametrize(
    "clients", ["0", "65", "a,b", ""], ids=["zero", "too-many", "words", "empty"]
)
def test_bad_client_counts_are_refused_before_anything_starts(clients: str) -> None:
    result = CliRunner().invoke(command, ["--clients", clients])
    assert result.exit_code == 2
    assert "--clients" in result.output


def test_registered_under_sllm_bench() -> None:
    from sllm.cli import bench

    assert "overhead" in bench.commands


@pytest.mark.slow
@pytest.mark.invoker
def test_small_run_writes_latency_throughput_and_targets(tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "overhead.json"

    res = run(
        requests=20,
        duration=1.0,
        warmup=0.5,
        rounds=1,
        clients=[4],
        database="sqlite",
        workers=1,
        invoker_threads=8,
        device="cpu",
        postgres_url="postgresql+psycopg://unused@127.0.0.1:1/none",
        workdir=tmp_path / "w",
        out=out,
        keep=False,
        echo=lines.append,
    )

    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(finite(res)))
    db = saved["databases"]["sqlite"]
    lat = db["latency_ms"]
    assert lat["pairs"] == 20 and lat["errors"] == {}
    for key in ("controller_e2e", "direct_e2e", "runtime"):
        assert 0 < lat[key]["p50"] <= lat[key]["p99"], key
    assert lat["overhead_vs_runtime"]["paired"]["n"] == 20
    assert lat["controller_breakdown"]["records"] == 20
    point = db["throughput"]["4"]
    assert point["errors"] == {"direct": 0, "controller": 0}
    assert point["direct_rps"] > 0 and point["controller_rps"] > 0
    assert point["ratio"] == pytest.approx(point["controller_rps"] / point["direct_rps"])
    assert all(isinstance(t["met"], bool) for t in db["targets"].values())
    assert saved["settings"]["clients"] == [4]
    assert any("[sqlite]" in line for line in lines)
    assert not any((tmp_path / "w").iterdir())  # the scratch run folder was removed
