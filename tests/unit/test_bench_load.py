"""`sllm bench load` on a tiny checkpoint: every measurement runs and the JSON says so."""

from __future__ import annotations

import json
import math
from pathlib import Path

from sllm.bench.load import llm_shapes, run


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
        "safetensors_cold_every_byte",
        "torch_load_cold",
        "ours_dram_hit",
        "safetensors_warm_page_cache",
    ):
        assert len(saved["seconds"][key]["rounds"]) == 2, key
        assert saved["seconds"][key]["median"] > 0, key
    assert saved["ratios"]["ours_cold_speedup_vs_safetensors_cold"] > 0
    assert saved["ratios"]["dram_hit_speedup_vs_safetensors_warm"] > 0
    assert any("ours_cold" in line for line in lines)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
