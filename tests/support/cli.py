"""Running the `sllm` command as a user would, and checking on the processes it starts."""

from __future__ import annotations

import os
import subprocess
import sys


def sllm(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """`python -m sllm ARGS` with `env`; its exit code and output, never raising on failure."""
    return subprocess.run(
        [sys.executable, "-m", "sllm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def alive(pid: int) -> bool:
    """Whether a process with `pid` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
