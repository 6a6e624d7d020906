"""One embedded server per data folder: a second start leaves the live one alone, and
`sllm server stop` tells a live server by its lock, not by a pid file a dead one left."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sllm.client import Client
from tests.support.cli import alive, sllm
from tests.support.s3 import free_port

pytestmark = [pytest.mark.invoker, pytest.mark.slow]

KEY = "embedded:the-admin-secret-0123456789"


def _gone(*pids: int, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    return not any(alive(p) for p in pids)


def test_a_second_start_and_a_stale_pid_file_leave_others_alone(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
    env["SLLM_HOME"] = str(home)
    data = home / "server"
    started = sllm(
        {**env, "SLLM_SERVER_API_KEY": KEY}, "server", "start", "--detach",
        "--port", str(free_port()), "--invoker-port", str(free_port()),
    )  # fmt: skip
    assert started.returncode == 0, started.stderr + started.stdout
    info = json.loads((data / "server.json").read_text())
    pids = [info["pid"], info["controller_pid"], info["invoker_pid"]]
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        # The key given in the environment is saved; no process of the server inherits it.
        assert (data / "admin.key").read_text().strip() == KEY
        for pid in pids:
            assert b"SLLM_SERVER_API_KEY=" not in Path(f"/proc/{pid}/environ").read_bytes()
        files = {n: (data / n).read_text() for n in ("server.pid", "server.json", "admin.key")}
        for detach in ((), ("--detach",)):
            second = sllm(
                env, "server", "start", *detach, "--new-key", "--port", str(free_port()),
                "--invoker-port", str(free_port()), timeout=60,
            )  # fmt: skip
            assert second.returncode != 0
            assert f"a server is already running on {data} (pid {info['pid']})" in second.stderr
        assert {n: (data / n).read_text() for n in files} == files
        with Client(info["url"], KEY) as api:  # its key was neither revoked nor replaced
            assert api.list_functions() == []

        # The supervisor dies; its pid file now names an unrelated process.
        os.kill(info["pid"], signal.SIGKILL)
        assert _gone(info["pid"])
        (data / "server.pid").write_text(str(unrelated.pid))
        stopped = sllm(env, "server", "stop", timeout=60)
        assert stopped.returncode != 0 and "no server is running" in stopped.stderr
        assert unrelated.poll() is None
        assert _gone(info["controller_pid"], info["invoker_pid"])
        assert not (data / "server.pid").exists() and not (data / "server.json").exists()
    finally:
        unrelated.kill()
        unrelated.wait()
        for pid in pids:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)
