"""`sllm bench load` on a tiny checkpoint: every measurement runs and the JSON says so."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sllm.bench._load_report import CUDA_TARGETS, TARGETS, TOUCH
from sllm.bench.load import cold_orders, llm_shapes, run


def test_llm_shapes_mix_small_and_large_tensors() -> None:
    shapes = llm_shapes(2 * 10**9)
    sizes = [math.prod(s) * 2 for _, s in shapes]
    assert sum(sizes) >= 2 * 10**9
    assert sum(1 for b in sizes if b < 10**6) >= len(sizes) / 3


def test_small_run_writes_medians_and_ratios(tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "load.json"

    res = run(
        size_gb=0.02,
        rounds=2,
        workdir=tmp_path / "w",
        out=out,
        threads=4,
        keep=False,
        echo=lines.append,
    )

    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    for key in (
        "ours_cold",
        "ours_cold_reused_buffer",
        "safetensors_cold_every_byte",
        "torch_load_cold",
        "ours_dram_hit",
        "ours_dram_hit_every_page",
        "safetensors_warm_page_cache",
        "safetensors_warm_page_cache_untouched",
    ):
        assert len(saved["seconds"][key]["rounds"]) == 2, key
        assert saved["seconds"][key]["median"] > 0, key
    assert saved["ratios"]["ours_cold_speedup_vs_safetensors_cold"] > 0
    assert saved["ratios"]["dram_hit_every_page_speedup_vs_safetensors_warm"] > 0
    # Ours cold reads into memory mapped by the read itself, as the invoker's pool does;
    # the reused-buffer variant into memory mapped before.
    mapped = saved["pool_bytes_mapped_before_cold_read"]
    assert mapped["ours_cold"] == [0, 0]
    assert all(n >= saved["checkpoint"]["bytes"] for n in mapped["ours_cold_reused_buffer"])
    for order in saved["cold_order"]["rounds"]:
        assert sorted(order) == sorted(saved["cold_order"]["rounds"][0])
    assert any("ours_cold" in line for line in lines)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_every_target_compares_measurements_with_the_same_page_touch() -> None:
    for name, ours, baseline, _ in TARGETS + CUDA_TARGETS:
        assert TOUCH[ours] == TOUCH[baseline], name


def test_cold_reads_run_in_a_shuffled_order_every_round() -> None:
    names = ["fio", "ours_cold", "ours_cold_reused_buffer", "safetensors", "torch_load"]
    orders = cold_orders(names, 20, seed=7)
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == cold_orders(names, 20, seed=7)  # reproducible from the seed
    after_fio = [o.index("ours_cold") == o.index("fio") + 1 for o in orders]
    assert any(after_fio) and not all(after_fio)
    assert len({tuple(o) for o in orders}) > len(names)  # not a rotation of one order
