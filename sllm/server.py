"""The embedded all-in-one server: a controller on SQLite, local invokers, a local folder store.

`sllm server start` prepares the data folder (database migrated, a namespace
and the admin key, reused from DATA/admin.key), then supervises the child
processes, `sllm controller start` and one `sllm invoker start` per local
invoker (one unless `--invokers N`; see `sllm.server_invokers`), sharing a
fresh internal token (passed in their environment). It writes the CLI config
so the next `sllm` command talks to it, prints the URL (and the key, on a
terminal), and stops the children when it is stopped (SIGTERM, SIGINT, `sllm
server stop`) or when the controller dies: the controller first (its streams
get its graceful timeout), then the invokers (with no controller left, nothing
runs on them and their drain is short). An invoker that dies or exits (a
rolling restart: `kill -TERM` drains it first) is started again on its own,
with bounded retries and backoff (`sllm.server_restart`); the controller and
the other invokers stay up meanwhile. The data folder and its files are
readable by their owner only.

    DATA/sllm.db     the database          STORE          published models (the CLI's
                                           default store: SLLM_STORE_URI or $SLLM_HOME/store)
    DATA/invoker/    the first invoker's caches (DATA/invoker-2/ ... for the others)
    DATA/logs/       the children's output
    DATA/server.pid  the supervisor's pid  DATA/server.json  URL, ports, pids, invokers
    DATA/admin.key   the admin key (0600)  DATA/server.log   a detached server's output
    DATA/server.lock the supervisor's lock (one server per data folder; `sllm.server_lock`)
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx

from sllm import server_lock
from sllm.server_invokers import LocalInvoker, invoker_command
from sllm.server_invokers import plan as plan_invokers
from sllm.server_restart import RestartPolicy
from sllm.server_secrets import (
    choose_key,
    key_path,
    make_private,
    private_files,
    save_key,
    saved_key,
)

if TYPE_CHECKING:
    from sllm.controller import Controller

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
    invokers: int = 1  # local invokers (see sllm.server_invokers)
    drain_grace: float | None = None  # an invoker's SIGTERM drain; None: the invoker's default

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

    def local_invokers(self, env: Mapping[str, str]) -> list[LocalInvoker]:
        """The local invokers to run; ValueError naming the flag for bad counts or budgets."""
        return plan_invokers(
            self.data_dir,
            self.invokers,
            self.invoker_port or self.port + 1,
            dram=self.dram_capacity,
            nvme=self.nvme_capacity,
            env=env,
        )


def prepare(settings: ServerSettings, *, new_key: bool = False) -> str:
    """Migrate the database and install the admin key; return the key.

    The key saved in the data folder is reused unless another is given
    (`settings.api_key`) or asked for (`new_key`); see `sllm.server_secrets`.
    """
    with private_files():
        make_private(settings.data_dir)
        return _install_key(settings, new_key=new_key)


def _install_key(settings: ServerSettings, *, new_key: bool) -> str:
    from sllm.controller import Controller, ControllerConfig
    from sllm.db import Database

    saved = saved_key(settings.data_dir)
    db = Database(settings.database_url)
    try:
        db.upgrade()
        config = ControllerConfig(database_url=settings.database_url, internal_token="setup")
        controller = Controller(config, db)
        try:
            controller.ensure_namespace(NAMESPACE)
            state = _key_state(controller, saved)
            if settings.api_key and _key_state(controller, settings.api_key) == "revoked":
                # Installing it again would undo an operator's revocation.
                raise RuntimeError(
                    f"the admin key {settings.api_key.partition(':')[0]!r} given with --api-key "
                    "or $SLLM_SERVER_API_KEY was revoked; give another key, or use --new-key"
                )
            key = choose_key(saved, settings.api_key, new=new_key, revoked=state == "revoked")
            if key != saved or state != "valid":
                controller.install_key(NAMESPACE, key, admin=True)
            old_id = (saved or "").partition(":")[0]
            if state == "valid" and old_id != key.partition(":")[0]:
                controller.revoke_key(NAMESPACE, old_id)  # a rotation: the old key stops working
        finally:
            controller.close()
    finally:
        db.dispose()
    if key != saved:
        save_key(settings.data_dir, key)
    return key


def _key_state(controller: Controller, key: str | None) -> str:
    """valid, revoked, or unknown (absent, or a database made afresh) for the saved key."""
    from sllm.core.errors import Unauthorized

    if key is None:
        return "unknown"
    try:
        controller.authenticate(key)
        return "valid"
    except Unauthorized:
        key_id = key.partition(":")[0]
        listed = [k for k in controller.list_keys(NAMESPACE) if k["key_id"] == key_id]
        return "revoked" if listed and listed[0]["revoked"] else "unknown"


def run(
    settings: ServerSettings,
    echo: Callable[[str], None],
    env: Mapping[str, str],
    *,
    show_key: bool = False,
    new_key: bool = False,
    policy: RestartPolicy | None = None,
    lock_fd: int | None = None,
) -> int:
    """Run the server in the foreground until stopped; the exit status.

    The key is printed only with `show_key` (a terminal): a log never holds it.
    The data folder's lock is taken first (`lock_fd`: already taken by `detach`)
    and held until the end; RuntimeError when another server holds it.
    """
    with private_files():
        fd = server_lock.acquire(settings.data_dir, lock_fd)
        try:
            return _run(
                settings,
                echo,
                env,
                show_key=show_key,
                new_key=new_key,
                policy=policy or RestartPolicy(),
            )
        finally:
            os.close(fd)  # after the clean-up: a next server never sees it half done


def _run(
    settings: ServerSettings,
    echo: Callable[[str], None],
    env: Mapping[str, str],
    *,
    show_key: bool,
    new_key: bool,
    policy: RestartPolicy,
) -> int:
    from sllm.client import save_cli_config

    local = settings.local_invokers(env)  # before anything starts: a bad flag stops here
    key = prepare(settings, new_key=new_key)
    token = secrets.token_urlsafe(24)
    logs = settings.data_dir / "logs"
    logs.mkdir(exist_ok=True)
    base = {
        **_child_env(env),
        "SLLM_INTERNAL_TOKEN": token,
        "SLLM_HOME": str(settings.data_dir),
        "SLLM_STORE_URI": settings.store,  # the controller checks a function's model there
    }
    controller_cmd = [
        sys.executable, "-m", "sllm", "controller", "start",
        "--host", settings.host, "--port", str(settings.port),
        "--database", settings.database_url,
    ]  # fmt: skip
    commands = {"controller": controller_cmd}
    for inv in local:
        commands[inv.key] = invoker_command(
            inv,
            sys.executable,
            store=settings.store,
            device=settings.device,
            controller_url=settings.url,
            drain_grace=settings.drain_grace,
        )
    children: dict[str, subprocess.Popen[bytes]] = {}
    stopping = False

    def stop(_signum: int = 0, _frame: object = None) -> None:
        nonlocal stopping
        stopping = True

    def start(name: str) -> None:
        out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child writes to it
        children[name] = subprocess.Popen(
            commands[name], env=base, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        out.close()

    def write_info() -> None:
        write_server_info(settings, children, local)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    pidfile = settings.data_dir / "server.pid"
    info_path = settings.data_dir / "server.json"
    info_path.unlink(missing_ok=True)  # a dead server's (this one holds the lock)
    pidfile.write_text(str(os.getpid()))
    try:
        for name in commands:
            start(name)
        _wait_ready(settings.url, children, lambda: stopping)
        save_cli_config(settings.url, key, env={**env, "SLLM_HOME": str(_cli_home(env))})
        for line in ready_lines(settings, key if show_key else None):
            echo(line)
        echo("  the sllm CLI is configured for it; stop with Ctrl-C or `sllm server stop`")
        write_info()
        now = time.monotonic()
        watches = {inv.key: _Watch(policy, now, inv.name) for inv in local}
        while not stopping:
            controller = children["controller"]
            if controller.poll() is not None:
                echo(f"the controller exited with status {controller.returncode}; stopping")
                return 1
            for name, watch in watches.items():
                verdict = watch.check(children[name], time.monotonic(), echo)
                if verdict == "give up":
                    return 1
                if verdict == "restart":
                    start(name)
                    write_info()
                    echo(f"restarted invoker {watch.label} (pid {children[name].pid})")
            time.sleep(0.2)
        return 0
    finally:
        _stop_all(children, settings.drain_grace)
        pidfile.unlink(missing_ok=True)
        info_path.unlink(missing_ok=True)


def write_server_info(
    settings: ServerSettings,
    children: Mapping[str, subprocess.Popen[bytes]],
    local: list[LocalInvoker],
) -> None:
    """DATA/server.json: URL, pids, ports, and each local invoker (name, port, pid, folders).

    invoker_pid and invoker_port are the first invoker's (as with one invoker).
    """
    info = {
        "url": settings.url,
        "pid": os.getpid(),
        "controller_pid": children["controller"].pid,
        "invoker_pid": children[local[0].key].pid,
        "invoker_port": local[0].port,
        "invokers": [{**inv.to_json(), "pid": children[inv.key].pid} for inv in local],
        "store": settings.store,
        "data_dir": str(settings.data_dir),
    }
    partial = settings.data_dir / ".server.json.partial"
    partial.write_text(json.dumps(info))
    os.replace(partial, settings.data_dir / "server.json")  # readers never see half of it


class _Watch:
    """One invoker's restarts: when it died, when to start it again, how many so far."""

    def __init__(self, policy: RestartPolicy, now: float, label: str = "local") -> None:
        self.policy = policy
        self.label = label
        self.started = now
        self.restarts = 0
        self.due: float | None = None

    def check(self, child: subprocess.Popen[bytes], now: float, echo: Callable[[str], None]) -> str:
        """ "running", "waiting" (dead, restart not yet due), "restart" or "give up"."""
        if self.due is None:
            if child.poll() is None:
                return "running"
            # What the dead child started (gunicorn's workers) would go on serving and
            # sending heartbeats for a while, and could hold the port: end it first.
            _kill_group(child)
            plan = self.policy.next_restart(self.restarts, now - self.started)
            if plan is None:
                echo(
                    f"invoker {self.label} exited with status {child.returncode} after "
                    f"{self.restarts} restarts; stopping (see its log)"
                )
                return "give up"
            delay, self.restarts = plan
            self.due = now + delay
            echo(
                f"invoker {self.label} exited with status {child.returncode}; restarting it in "
                f"{delay:.0f} s (restart {self.restarts} of {self.policy.max_restarts})"
            )
        if now < self.due:
            return "waiting"
        self.due = None
        self.started = now
        return "restart"


def _kill_group(child: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):  # nothing of it is left
        os.killpg(child.pid, signal.SIGKILL)


def ready_lines(settings: ServerSettings, key: str | None) -> list[str]:
    """What a started server says; the key itself only when given (shown on a terminal)."""
    where = key_path(settings.data_dir)
    return [
        f"sllm server ready at {settings.url}",
        f"  API key:   {key} (saved in {where})" if key else f"  API key:   in {where}",
        f"  namespace: {NAMESPACE}",
        f"  store:     {settings.store}",
        f"  data:      {settings.data_dir} (logs in {settings.data_dir / 'logs'})",
    ]


def _child_env(env: Mapping[str, str]) -> dict[str, str]:
    """`env` less the admin key a start may have been given: no child needs it."""
    return {k: v for k, v in env.items() if k != "SLLM_SERVER_API_KEY"}


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


def _stop_all(children: Mapping[str, subprocess.Popen[bytes]], drain_grace: float | None) -> None:
    """The controller first (its streams get its graceful timeout), then every invoker at once.

    With the controller gone no stream runs on an invoker any more, so their drains
    end at once; an invoker still busy (a stream of nobody's) is killed after its grace.
    """
    controller = children.get("controller")
    if controller is not None:
        _stop((controller,), 20.0)
    if drain_grace is None:
        from sllm.invoker import InvokerConfig

        drain_grace = InvokerConfig().drain_grace
    _stop([c for name, c in children.items() if name != "controller"], drain_grace + 15.0)


def _stop(children: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for child in children:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)
            child.wait(5)


def detach(
    settings: ServerSettings,
    echo: Callable[[str], None],
    *,
    show_key: bool = False,
    new_key: bool = False,
) -> None:
    """Start the server in the background and wait until it is ready.

    The key is installed here, before the server starts: the background server
    reuses it from the data folder, so it never travels on a command line. The
    data folder's lock is taken before anything else and handed to the
    background server, which holds it from then on.
    """
    settings.local_invokers(os.environ)  # a bad --invokers or budget fails here, not in the log
    with private_files():
        fd = server_lock.acquire(settings.data_dir)
        try:
            key = prepare(settings, new_key=new_key)
            log_path = settings.data_dir / "server.log"
            (settings.data_dir / "server.json").unlink(missing_ok=True)  # a dead server's
            with open(log_path, "ab") as out:
                command = [sys.executable, "-m", "sllm", "server", "start", *_start_args(settings)]
                proc = subprocess.Popen(
                    [*command, "--lock-fd", str(fd)],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    start_new_session=True,
                    pass_fds=(fd,),
                    env=_child_env(os.environ),  # the key is in the data folder by now
                )
        finally:
            os.close(fd)  # the background server's copy keeps the lock
    deadline = time.monotonic() + 240
    info = settings.data_dir / "server.json"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the server exited with status {proc.returncode}:\n{tail}")
        if info.is_file():
            for line in ready_lines(settings, key if show_key else None):
                echo(line)
            echo("  the sllm CLI is configured for it")
            echo(f"  running in the background (pid {proc.pid}); log: {log_path}")
            echo(f"  stop it with: sllm server stop --data-dir {settings.data_dir}")
            return
        time.sleep(0.2)
    raise RuntimeError(f"the server did not become ready; see {log_path}")


def _start_args(settings: ServerSettings) -> list[str]:
    """`sllm server start` flags for the same settings, less the key (in the data folder)."""
    args = [
        "--host", settings.host, "--port", str(settings.port),
        "--invoker-port", str(settings.invoker_port), "--data-dir", str(settings.data_dir),
        "--device", settings.device, "--invokers", str(settings.invokers),
    ]  # fmt: skip
    if settings.drain_grace is not None:
        args += ["--drain-grace", f"{settings.drain_grace:g}"]
    for flag, value in (
        ("--store", settings.store_uri),
        ("--dram-capacity", settings.dram_capacity),
        ("--nvme-capacity", settings.nvme_capacity),
    ):
        if value:
            args += [flag, value]
    return args


def stop(data_dir: Path, echo: Callable[[str], None], timeout: float = 30.0) -> bool:
    """Stop a server started in `data_dir`; False when none runs there.

    A live server is told by its lock, not by DATA/server.pid: the pid of a
    supervisor that died may belong to an unrelated process by now. What a dead
    one left is cleaned up (`server_lock.clean_stale`).
    """
    if not server_lock.held(data_dir):
        server_lock.clean_stale(data_dir, echo)
        return False
    pid = server_lock.holder(data_dir)
    if pid is None:
        raise RuntimeError(f"a server holds {server_lock.lock_path(data_dir)}, pid unknown")
    with contextlib.suppress(ProcessLookupError):  # it is exiting already
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not server_lock.held(data_dir):
            echo(f"stopped the server (pid {pid})")
            return True
        time.sleep(0.2)
    raise RuntimeError(f"the server (pid {pid}) did not stop within {timeout:.0f} s")
