"""The embedded server end to end, as the README's main job runs it: start it detached,
publish a demo model, create a function, invoke it streaming, stop it — all with the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.support.s3 import free_port

pytestmark = [pytest.mark.invoker, pytest.mark.slow]


def sllm(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sllm", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_main_job_on_the_embedded_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLLM_") or k == "SLLM_REQUIRE_POSTGRES"
    }
    env["SLLM_HOME"] = str(home)
    port = free_port()
    started = sllm(
        env, "server", "start", "--detach", "--port", str(port), "--invoker-port", str(free_port())
    )
    assert started.returncode == 0, started.stderr + started.stdout
    assert f"http://127.0.0.1:{port}" in started.stdout and "API key:" in started.stdout
    info = json.loads((home / "server" / "server.json").read_text())
    try:
        # The CLI config was written: the next commands need no flags or variables.
        assert json.loads((home / "cli.json").read_text())["apihost"] == f"http://127.0.0.1:{port}"
        assert (home / "cli.json").stat().st_mode & 0o077 == 0
        assert sllm(env, "model", "demo", str(tmp_path / "demo")).returncode == 0
        pushed = sllm(env, "model", "push", str(tmp_path / "demo"), "demo")
        assert pushed.returncode == 0, pushed.stderr
        created = sllm(env, "fn", "create", "demo", "--model", "demo")
        assert created.returncode == 0, created.stderr
        args = (
            "-p",
            "prompt",
            "Once upon a time",
            "-p",
            "max_tokens",
            "8",
            "-p",
            "temperature",
            "0",
        )
        streamed = sllm(env, "fn", "invoke", "demo", *args, "--stream")
        assert streamed.returncode == 0, streamed.stderr
        assert "8 tokens" in streamed.stderr and "cold start" in streamed.stderr
        result = sllm(env, "fn", "invoke", "demo", *args, "--result")
        assert json.loads(result.stdout)["text"] == streamed.stdout.rstrip("\n")
        listed = sllm(env, "activation", "list", "--json")
        assert [a["status"] for a in json.loads(listed.stdout)] == ["success", "success"]
    finally:
        stopped = sllm(env, "server", "stop", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        _alive(info[k]) for k in ("pid", "controller_pid", "invoker_pid")
    ):
        time.sleep(0.2)
    assert not any(_alive(info[k]) for k in ("pid", "controller_pid", "invoker_pid"))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = sllm(env, "server", "stop")
    assert again.returncode != 0 and "no server is running" in again.stderr
