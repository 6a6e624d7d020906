"""`sllm server start --invokers 2`: a two-invoker cluster on one machine, driven with the CLI:
both invokers register and serve, a drain moves the work to the other one, and a rolling
restart (SIGTERM of one invoker while it streams) loses no stream."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from sllm.client import Client
from sllm.store import open_store, push_model
from sllm.tiny_models import build_tiny_model
from tests.support.cli import alive, sllm
from tests.support.s3 import free_port
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.invoker, pytest.mark.slow]

KEY = "embedded:the-admin-secret-0123456789"
TOKENS = 3000  # a stream of a few seconds (see test_invoker_drain)


def _two_free_ports() -> int:
    """A port p such that p and p + 1 are both free now."""
    for _ in range(50):
        p = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
        except OSError:
            continue
        return p
    raise AssertionError("no two consecutive free ports")


def _info(data: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((data / "server.json").read_text())
    return doc


def _invokers(env: dict[str, str]) -> dict[str, dict[str, Any]]:
    listed = sllm(env, "invoker", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return {v["name"]: v for v in json.loads(listed.stdout)}


def test_two_local_invokers_serve_drain_and_survive_a_rolling_restart(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLLM_")}
    env["SLLM_HOME"] = str(home)
    port, invoker_port = free_port(), _two_free_ports()
    started = sllm(
        env, "server", "start", "--detach", "--invokers", "2", "--port", str(port),
        "--invoker-port", str(invoker_port), "--api-key", KEY, "--drain-grace", "30",
        "--dram-capacity", "2GiB",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr + started.stdout
    data = home / "server"
    try:
        info = _info(data)
        assert [(i["name"], i["port"]) for i in info["invokers"]] == [
            ("local", invoker_port),
            ("local-2", invoker_port + 1),
        ]
        assert [i["cache_dir"] for i in info["invokers"]] == [
            str(data / "invoker"),
            str(data / "invoker-2"),
        ]
        assert info["invoker_pid"] == info["invokers"][0]["pid"]  # as with one invoker
        assert all(alive(i["pid"]) for i in info["invokers"])
        wait_until(
            lambda: (
                {n: v["state"] for n, v in _invokers(env).items()}
                == {"local": "active", "local-2": "active"}
            ),
            60,
            "both invokers to register",
        )
        # Each has half of the DRAM budget.
        assert {v["capacity"]["dram_bytes"] for v in _invokers(env).values()} == {1024**3}
        table = sllm(env, "invoker", "list").stdout.splitlines()
        assert table[0].split() == [
            "NAME", "STATE", "DEVICE", "URL", "INSTANCES", "RUNNING", "HEARTBEAT",
        ]  # fmt: skip
        assert [line.split()[:2] for line in table[1:]] == [
            ["local", "active"],
            ["local-2", "active"],
        ]
        status = sllm(env, "server", "status")
        assert status.returncode == 0, status.stderr
        assert [line.split()[:5] for line in status.stdout.splitlines()[3:]] == [
            ["local", str(invoker_port), str(info["invokers"][0]["pid"]), "running", "active"],
            [
                "local-2",
                str(invoker_port + 1),
                str(info["invokers"][1]["pid"]),
                "running",
                "active",
            ],
        ]

        src = build_tiny_model("llama", tmp_path / "hf", seed=0)
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
        push_model(str(src), "llama", open_store((home / "store").as_uri()), progress=False)
        api = Client(info["url"], KEY, namespace="default")
        api.put_function("long", {"model": "llama", "limits": {"max_tokens": TOKENS}})

        def run() -> str:
            doc = api.invoke("long", {"prompt": "hi", "max_tokens": 2}, blocking=True)
            return str(doc["invoker"])

        first = run()
        other = "local-2" if first == "local" else "local"
        drained = sllm(env, "invoker", "drain", first, "--wait", "--timeout", "60")
        assert drained.returncode == 0, drained.stderr
        assert f"drained {first}" in drained.stdout
        assert _invokers(env)[first]["state"] == "drained"
        assert run() == other  # requests use both invokers
        assert sllm(env, "invoker", "undrain", first).stdout.strip() == f"invoker {first} is active"

        # A rolling restart: SIGTERM the invoker streaming; the stream runs to its end.
        events: list[dict[str, Any]] = []
        first_token = threading.Event()

        def stream() -> None:
            body = {"prompt": "tell me a story", "max_tokens": TOKENS, "ignore_eos": True}
            for ev in api.invoke_stream("long", body):
                events.append(ev)
                first_token.set()

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert first_token.wait(60)
        streaming = str(events[0]["invoker"])
        pid = next(i["pid"] for i in _info(data)["invokers"] if i["name"] == streaming)
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: _invokers(env)[streaming]["state"] == "draining", 10, "the drain")
        assert events[-1]["event"] == "token", "the stream ended before the SIGTERM"
        assert run() != streaming  # new work goes elsewhere meanwhile
        reader.join(120)
        assert not reader.is_alive()
        kinds = [e["event"] for e in events]
        assert kinds[-1] == "done" and kinds.count("token") == TOKENS, kinds[-3:]
        # It exits once drained; the server starts it again, and it is back to work.
        wait_until(
            lambda: (
                next(i["pid"] for i in _info(data)["invokers"] if i["name"] == streaming) != pid
            ),
            60,
            "the supervisor to restart it",
        )
        assert not alive(pid)
        wait_until(
            lambda: _invokers(env)[streaming]["state"] == "active", 60, "the restarted invoker"
        )
    finally:
        last = _info(data) if (data / "server.json").exists() else info
        stopped = sllm(env, "server", "stop", timeout=90)
    assert stopped.returncode == 0, stopped.stderr
    pids = [last["pid"], last["controller_pid"], *(i["pid"] for i in last["invokers"])]
    wait_until(lambda: not any(alive(p) for p in pids), 30, "every process to end")
