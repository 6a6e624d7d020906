"""One embedded server per data folder: DATA/server.lock, and cleaning up after a dead one.

The supervisor holds an exclusive `flock` on DATA/server.lock for its whole
life (the kernel drops it when the process dies, however it dies), and writes
its pid into it. A second `sllm server start` on the same folder fails to take
it and stops before touching anything. `sllm server --detach` takes the lock
first and hands the open file to the background supervisor (an inherited file
description shares the lock), so there is no moment where the folder is free.

    lock     DATA/server.pid   meaning               `sllm server stop`
    held     any               a live server         SIGTERM its pid, wait for the lock
    free     absent            nothing runs          "no server is running"
    free     present           the supervisor died   kill its children (if still ours),
                                                     remove server.pid and server.json
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

LOCK_FILE = "server.lock"


def lock_path(data_dir: Path) -> Path:
    """DATA/server.lock."""
    return data_dir / LOCK_FILE


def acquire(data_dir: Path, fd: int | None = None) -> int:
    """Take the folder's lock without waiting; the open file that holds it (close to release).

    `fd` is a lock file inherited from `sllm server start --detach`, which already holds it.
    Raises RuntimeError naming the holder's pid when another process holds it.
    """
    if fd is None:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(lock_path(data_dir), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        pid = holder(data_dir)
        raise RuntimeError(
            f"a server is already running on {data_dir} (pid {pid if pid else 'unknown'})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


def holder(data_dir: Path) -> int | None:
    """The pid written into the lock file by whoever took it last."""
    try:
        return int(lock_path(data_dir).read_text().strip())
    except (OSError, ValueError):
        return None


def held(data_dir: Path) -> bool:
    """Whether a live process holds the folder's lock."""
    try:
        fd = os.open(lock_path(data_dir), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock just taken
    return False


def clean_stale(data_dir: Path, echo: Callable[[str], None]) -> bool:
    """After a supervisor that died: end its children that are still running, remove its files.

    Call only while the lock is free. A child is killed only when it still is one of this
    folder's (its own process group, the data folder on its command line): a pid recorded
    long ago may belong to something else by now. True when there was something to clean.
    """
    info_path, pidfile = data_dir / "server.json", data_dir / "server.pid"
    if not info_path.exists() and not pidfile.exists():
        return False
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        info = {}
    children = [("controller", info.get("controller_pid")), ("invoker", info.get("invoker_pid"))]
    for inv in info.get("invokers") or []:  # every local invoker (--invokers N)
        if isinstance(inv, dict) and inv.get("pid") != info.get("invoker_pid"):
            children.append((f"invoker {inv.get('name')}", inv.get("pid")))
    for what, pid in children:
        if isinstance(pid, int) and _ours(pid, data_dir):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
                echo(f"ended the {what} (pid {pid}) of a server that died")
    info_path.unlink(missing_ok=True)
    pidfile.unlink(missing_ok=True)
    return True


def _ours(pid: int, data_dir: Path) -> bool:
    """Whether `pid` leads its own process group and names `data_dir` on its command line."""
    try:
        if os.getpgid(pid) != pid:
            return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (OSError, UnicodeDecodeError):
        return False
    return str(data_dir) in cmdline
