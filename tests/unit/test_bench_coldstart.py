"""`sllm bench coldstart` on a tiny model: every measurement and ratio lands in the JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sllm.bench._coldstart_model import shape_for
from sllm.bench.coldstart import MEASUREMENTS, TARGETS, run


@pytest.mark.parametrize(
    ("size_bytes", "hidden"), [(int(1.2e9), 1024), (int(0.02e9), 256)], ids=["1.2GB", "20MB"]
)
def test_model_shape_matches_the_requested_size(size_bytes: int, hidden: int) -> None:
    shape = shape_for(size_bytes)
    assert shape.hidden == hidden
    assert abs(shape.params * 4 - size_bytes) / size_bytes < 0.15


@pytest.mark.s3
@pytest.mark.slow
def test_small_run_writes_every_measurement_and_ratio(tmp_path: Path) -> None:
    lines: list[str] = []
    out = tmp_path / "coldstart.json"

    res = run(
        size_gb=0.02,
        rounds=1,
        workdir=tmp_path / "w",
        out=out,
        keep=False,
        echo=lines.append,
        patient=False,  # a busy CI host must not stretch the smoke test
    )

    saved = json.loads(out.read_text())
    assert saved == json.loads(json.dumps(res))
    for name in MEASUREMENTS:
        assert len(saved["seconds"][name]["rounds"]) == 1, name
        assert saved["seconds"][name]["median"] > 0, name
    for num, den, _, _ in TARGETS:
        key = f"{num} / {den}"
        assert saved["ratios"][key] > 0, key
        assert isinstance(saved["targets"][key]["met"], bool), key
    assert [sorted(order) for order in saved["order"]["rounds"]] == [sorted(MEASUREMENTS)]
    assert "baselines: fresh memory" in saved["memory"]
    assert saved["physical_limit"]["seconds"] > 0
    assert saved["first_tokens"]["match"] is True
    assert saved["request"]["prompt_tokens"] > 0
    assert any("ours_nvme" in line for line in lines)
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())
