"""Servers started on port 0: read back the port the kernel chose and publish it to a file.

Binding port 0 is the only race-free way to start several servers on one
host (tests, benchmarks): a port picked "free" beforehand may be taken by
the time the server binds it. Whoever starts the server reads the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def bound_port(arbiter: Any) -> int:
    """The TCP port of a gunicorn arbiter's first listener (bound by now)."""
    return int(arbiter.LISTENERS[0].getsockname()[1])


def publish_port(path: str, port: int) -> None:
    """Write `port` to `path` by temp file + rename, so a reader sees the whole number or nothing."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{port}\n")
    os.replace(tmp, target)
