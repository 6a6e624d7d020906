"""The embedded all-in-one server: a controller on SQLite, one invoker, a local folder store.

`sllm server start` prepares the data folder (database migrated, a namespace
and an API key), then supervises two child processes, `sllm controller start`
and `sllm invoker start`, sharing a fresh internal token. It writes the CLI
config so the next `sllm` command talks to it, prints the URL and the key,
and stops both children when it is stopped (SIGTERM, SIGINT, `sllm server
stop`) or when either child dies.

    DATA/sllm.db     the database          STORE          published models (the CLI's
                                           default store: SLLM_STORE_URI or $SLLM_HOME/store)
    DATA/invoker/    the invoker's caches  DATA/logs/     the children's output
    DATA/server.pid  the supervisor's pid  DATA/server.json  URL, ports, pids
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

NAMESPACE = "default"


@dataclass(frozen=True)
class ServerSettings:
    """Where the embedded server lives and listens."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 8700
    invoker_port: int = 0  # 0: port + 1
    api_key: str = ""  # empty: generate one
    device: str = "auto"
    dram_capacity: str = ""  # empty: the invoker's default
    nvme_capacity: str = ""
    store_uri: str = ""  # empty: the folder store in the data folder

    @property
    def url(self) -> str:
        """The controller's URL."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    @property
    def database_url(self) -> str:
        """The SQLite database in the data folder."""
        return f"sqlite:///{self.data_dir / 'sllm.db'}"

    @property
    def store(self) -> str:
        """The object store's URI."""
        return self.store_uri or (self.data_dir / "store").as_uri()


def prepare(settings: ServerSettings) -> str:
    """Migrate the database and install the API key (given or new); return the key."""
    from sllm.controller import Controller, ControllerConfig, new_key
    from sllm.db import Database

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    key = settings.api_key or new_key()[2]
    db = Database(settings.database_url)
    try:
        db.upgrade()
        config = ControllerConfig(database_url=settings.database_url, internal_token="setup")
        controller = Controller(config, db)
        try:
            controller.ensure_namespace(NAMESPACE)
            controller.install_key(NAMESPACE, key, admin=True)
        finally:
            controller.close()
    finally:
        db.dispose()
    return key


def run(settings: ServerSettings, echo: Callable[[str], None], env: Mapping[str, str]) -> int:
    """Run the server in the foreground until stopped; the exit status."""
    from sllm.client import save_cli_config

    key = prepare(settings)
    token = secrets.token_urlsafe(24)
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    invoker_port = settings.invoker_port or settings.port + 1
    base = {**env, "SLLM_INTERNAL_TOKEN": token, "SLLM_HOME": str(settings.data_dir)}
    controller_cmd = [
        sys.executable, "-m", "sllm", "controller", "start",
        "--host", settings.host, "--port", str(settings.port),
        "--database", settings.database_url,
    ]  # fmt: skip
    invoker_cmd = [
        sys.executable, "-m", "sllm", "invoker", "start",
        "--host", "127.0.0.1", "--port", str(invoker_port),
        "--cache-dir", str(settings.data_dir / "invoker"), "--store", settings.store,
        "--device", settings.device, "--controller", settings.url,
        "--name", "local", "--no-measure",
    ]  # fmt: skip
    if settings.dram_capacity:
        invoker_cmd += ["--dram-capacity", settings.dram_capacity]
    if settings.nvme_capacity:
        invoker_cmd += ["--nvme-capacity", settings.nvme_capacity]
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(_signum: int = 0, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pidfile = settings.data_dir / "server.pid"
    pidfile.write_text(str(os.getpid()))
    try:
        for name, cmd in (("controller", controller_cmd), ("invoker", invoker_cmd)):
            out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child writes to it
            children[name] = subprocess.Popen(
                cmd, env=base, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            out.close()
        _wait_ready(settings.url, children, lambda: stopping)
        save_cli_config(settings.url, key, env={**env, "SLLM_HOME": str(_cli_home(env))})
        echo(f"sllm server ready at {settings.url}")
        echo(f"  API key:   {key}")
        echo(f"  namespace: {NAMESPACE}")
        echo(f"  store:     {settings.store}")
        echo(f"  data:      {settings.data_dir} (logs in {logs})")
        echo("  the sllm CLI is configured for it; stop with Ctrl-C or `sllm server stop`")
        (settings.data_dir / "server.json").write_text(
            json.dumps(
                {
                    "url": settings.url,
                    "pid": os.getpid(),
                    "controller_pid": children["controller"].pid,
                    "invoker_pid": children["invoker"].pid,
                    "invoker_port": invoker_port,
                    "store": settings.store,
                    "data_dir": str(settings.data_dir),
                }
            )
        )
        while not stopping:
            for name, child in children.items():
                if child.poll() is not None:
                    echo(f"the {name} exited with status {child.returncode}; stopping")
                    return 1
            time.sleep(0.2)
        return 0
    finally:
        _stop_all(children)
        pidfile.unlink(missing_ok=True)
        (settings.data_dir / "server.json").unlink(missing_ok=True)


def _cli_home(env: Mapping[str, str]) -> Path:
    """Where the CLI config goes: the user's SLLM_HOME (not the server's data folder)."""
    from sllm.core.config import sllm_home

    return sllm_home(env)


def _wait_ready(
    url: str, children: Mapping[str, subprocess.Popen[bytes]], stopping: Callable[[], bool]
) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not stopping():
        for name, child in children.items():
            if child.poll() is not None:
                raise RuntimeError(f"the {name} exited with status {child.returncode} at start")
        try:
            ready = httpx.get(f"{url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            ready = False
        if ready:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the controller at {url} did not become ready")


def _stop_all(children: Mapping[str, subprocess.Popen[bytes]]) -> None:
    for child in children.values():
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGTERM)
    for child in children.values():
        try:
            child.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait(5)


def detach(settings: ServerSettings, echo: Callable[[str], None]) -> None:
    """Start the server in the background and wait until it is ready."""
    args = [
        "--host", settings.host, "--port", str(settings.port),
        "--invoker-port", str(settings.invoker_port), "--data-dir", str(settings.data_dir),
        "--device", settings.device,
    ]  # fmt: skip
    for flag, value in (
        ("--api-key", settings.api_key),
        ("--store", settings.store_uri),
        ("--dram-capacity", settings.dram_capacity),
        ("--nvme-capacity", settings.nvme_capacity),
    ):
        if value:
            args += [flag, value]
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    log_path = settings.data_dir / "server.log"
    (settings.data_dir / "server.json").unlink(missing_ok=True)
    with open(log_path, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sllm", "server", "start", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 240
    info = settings.data_dir / "server.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{tail}")
        if info.is_file():
            text = log_path.read_text(errors="replace")
            echo(text[text.rfind("sllm server ready") :].strip())
            echo(f"  running in the background (pid {proc.pid}); log: {log_path}")
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become ready; see {log_path}")


def stop(data_dir: Path, echo: Callable[[str], None], timeout: float = 30.0) -> bool:
    """Stop a server started in `data_dir`; False when none runs there."""
    pidfile = data_dir / "server.pid"
    try:
        pid = int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return False
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            echo(f"stopped the server (pid {pid})")
            return True
        time.sleep(0.2)
    raise RuntimeError(f"the server (pid {pid}) did not stop within {timeout:.0f} s")
