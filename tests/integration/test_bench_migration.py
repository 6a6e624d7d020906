"""`sllm bench migration --quick` end to end: two controllers, two invokers, a kill -9, and a
results file with every measurement, its outputs checked against the unmoved run."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sllm.cli import main

pytestmark = [pytest.mark.invoker, pytest.mark.slow]

VARIANTS = {"baseline", "live", "stop_and_recompute", "preempt_and_restart", "resume_after_kill"}


def test_quick_run_measures_every_variant_and_writes_its_targets(tmp_path: Path) -> None:
    out = tmp_path / "migration.json"
    began = time.monotonic()
    result = CliRunner().invoke(
        main,
        ["bench", "migration", "--quick", "--workdir", str(tmp_path / "w"), "--out", str(out)],
    )
    took = time.monotonic() - began

    assert result.exit_code == 0, result.output
    assert took < 90, f"the smoke run took {took:.0f} s"
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "migration" and doc["code"]["commit"]
    assert doc["outputs_match"] is True  # a differing output fails the run instead
    assert set(doc["summary"]) == {"16", "64"}
    for length, by_variant in doc["summary"].items():
        assert set(by_variant) == VARIANTS, length
        live, stop = by_variant["live"], by_variant["stop_and_recompute"]
        assert live["rounds"]["median"] >= 1 and stop["rounds"]["median"] == 0
        # Stop-and-recompute recomputes the whole sequence: at least the prompt.
        assert stop["tokens_recomputed"]["median"] >= int(length)
        assert live["pause_s"]["median"] > 0 and stop["pause_s"]["median"] > 0
        resume = by_variant["resume_after_kill"]
        assert resume["tier"]["rounds"] == ["warm"]  # the destination is kept warm
        assert 0 <= resume["detection_s"]["median"] < 5
        assert resume["prefill_s"]["median"] > 0 and resume["resume_ttft_s"]["median"] > 0
        assert by_variant["preempt_and_restart"]["finish_s"]["median"] > 0
    for name, target in doc["targets"].items():
        assert isinstance(target["met"], bool), name
    assert set(doc["condition_decode_step"]) == {"decode_step_ms", "bound_ms", "held"}
    assert "round 1/1, prompt 16 tokens" in result.output
    assert "live pause / TPOT" in result.output
