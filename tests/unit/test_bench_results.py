"""Every benchmark JSON says which commit it ran on."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from sllm.bench._results import code_version, write_results


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def _repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "code.py").write_text("x = 1\n")
    (repo / "benchmarks" / "results").mkdir(parents=True)
    (repo / "benchmarks" / "results" / "old.json").write_text("{}\n")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    return repo


def test_the_commit_and_a_clean_tree_are_recorded(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    version = code_version(repo)
    assert version["commit"] == _git(repo, "rev-parse", "HEAD")
    assert version["dirty"] is False


def test_changed_code_is_dirty_but_changed_results_are_not(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    (repo / "benchmarks" / "results" / "old.json").write_text('{"new": 1}\n')
    assert code_version(repo)["dirty"] is False
    (repo / "code.py").write_text("x = 2\n")
    assert code_version(repo)["dirty"] is True


def test_outside_a_checkout_the_commit_is_unknown(tmp_path: Path) -> None:
    version = code_version(tmp_path)
    assert version["commit"].startswith("unknown")
    assert version["dirty"] is None


def test_written_results_carry_the_code_version(tmp_path: Path) -> None:
    out = tmp_path / "deep" / "r.json"
    said: list[str] = []
    write_results(out, {"benchmark": "x"}, said.append)
    doc = json.loads(out.read_text())
    assert doc["benchmark"] == "x"
    assert doc["code"]["commit"] == code_version()["commit"]
    assert "ran_at" in doc["code"]
    assert said == [f"wrote {out}"]
