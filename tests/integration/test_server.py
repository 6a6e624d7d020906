"""The embedded server end to end, as the README's main job runs it: start it detached,
publish a demo model, create a function, invoke it streaming, stop it — all with the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from sllm.client import Client
from tests.support.cli import alive, sllm
from tests.support.s3 import free_port

pytestmark = [pytest.mark.invoker, pytest.mark.slow]


KEY = "embedded:the-admin-secret-0123456789"


def _cmdline(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def _private(path: Path) -> bool:
    return path.stat().st_mode & 0o077 == 0


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


def _restarted_invoker(info_path: Path, old_pid: int, timeout: float = 120) -> dict[str, Any]:
    """server.json once it names another invoker, listening, and that one has reported to the
    controller (what was left of the old one is gone: it sends no more heartbeats)."""
    deadline = time.monotonic() + timeout
    seen_at: float | None = None
    while time.monotonic() < deadline:
        info = json.loads(info_path.read_text())
        if seen_at is None and info["invoker_pid"] != old_pid and _listening(info["invoker_port"]):
            seen_at = time.time()
        if seen_at is not None:
            with Client(info["url"], KEY) as api:
                (local,) = api.list_invokers()
            if local["state"] == "active" and local["last_heartbeat"] > seen_at:
                return info
        time.sleep(0.2)
    raise AssertionError(f"the invoker was not back within {timeout} s")


def test_main_job_on_the_embedded_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SLLM_") or k == "SLLM_REQUIRE_POSTGRES"
    }
    env["SLLM_HOME"] = str(home)
    port = free_port()
    ports = ("--port", str(port), "--invoker-port", str(free_port()))
    started = sllm(env, "server", "start", "--detach", *ports, "--api-key", KEY)
    assert started.returncode == 0, started.stderr + started.stdout
    assert f"http://127.0.0.1:{port}" in started.stdout and "API key:" in started.stdout
    data = home / "server"
    info = json.loads((data / "server.json").read_text())
    try:
        # The key is in a private file, never in a log or on a command line (`ps`).
        secret = KEY.partition(":")[2]
        assert (data / "admin.key").read_text().strip() == KEY
        logs = [data / "server.log", *(data / "logs").glob("*.log")]
        assert all(secret not in p.read_text() for p in logs)
        assert all(
            secret not in _cmdline(info[k]) for k in ("pid", "controller_pid", "invoker_pid")
        )
        assert all(_private(p) for p in (data, data / "sllm.db", data / "admin.key", *logs))
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

        # A dead invoker is started again; the controller stays up throughout.
        os.kill(info["invoker_pid"], signal.SIGKILL)
        info = _restarted_invoker(data / "server.json", info["invoker_pid"])
        assert alive(info["controller_pid"]) and alive(info["pid"])
        again = sllm(env, "fn", "invoke", "demo", *args, "--result")
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["text"] == streamed.stdout.rstrip("\n")
    finally:
        stopped = sllm(env, "server", "stop", timeout=60)
    assert stopped.returncode == 0, stopped.stderr
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
        alive(info[k]) for k in ("pid", "controller_pid", "invoker_pid")
    ):
        time.sleep(0.2)
    assert not any(alive(info[k]) for k in ("pid", "controller_pid", "invoker_pid"))
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
    again = sllm(env, "server", "stop")
    assert again.returncode != 0 and "no server is running" in again.stderr

    # The next start reuses the admin key: what was handed out keeps working.
    restarted = sllm(env, "server", "start", "--detach", *ports)
    assert restarted.returncode == 0, restarted.stderr + restarted.stdout
    try:
        assert json.loads((home / "cli.json").read_text())["api_key"] == KEY
        listed = sllm(env, "fn", "list", "--json")
        assert [f["name"] for f in json.loads(listed.stdout)] == ["demo"]
    finally:
        assert sllm(env, "server", "stop", timeout=60).returncode == 0
