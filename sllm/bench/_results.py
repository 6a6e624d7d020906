"""Writing a benchmark's JSON: the measurements plus the code they ran on."""

from __future__ import annotations

import datetime
import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

_REPO = Path(__file__).resolve().parents[2]


def code_version(repo: Path = _REPO) -> dict[str, Any]:
    """The commit a run measured and whether the tree differed from it.

    Changes under `benchmarks/results/` do not count as dirty: they are the
    outputs of earlier runs, not code.
    """

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changed = git(
        "status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results"
    )
    return {
        "commit": commit or "unknown (not a git checkout)",
        "dirty": bool(changed) if changed is not None else None,
        "ran_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(out: Path, results: dict[str, Any], echo: Callable[[str], None]) -> None:
    """Stamp `results` with the code version (unless stamped) and write it to `out` as JSON."""
    results.setdefault("code", code_version())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    echo(f"wrote {out}")
