"""`sllm server status`: what the embedded server on a data folder runs, read from
DATA/server.json (written by the supervisor) and, for each invoker's state, its controller.

Example (two local invokers, the second one draining):

    server   http://127.0.0.1:8700 (pid 4100; controller pid 4101)
    store    file:///home/me/.sllm/store
    NAME     PORT  PID   PROCESS  STATE     CACHE
    local    8701  4102  running  active    /home/me/.sllm/server/invoker
    local-2  8702  4103  running  draining  /home/me/.sllm/server/invoker-2
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from sllm import server_lock
from sllm.server_secrets import saved_key

CONTROLLER_TIMEOUT_S = 5.0


def read_status(data_dir: Path) -> dict[str, Any]:
    """server.json with each pid's liveness and each invoker's state at the controller.

    RuntimeError when no server holds the folder, or it has not finished starting.
    """
    if not server_lock.held(data_dir):
        raise RuntimeError(f"no server is running with data folder {data_dir}")
    try:
        info: dict[str, Any] = json.loads((data_dir / "server.json").read_text())
    except FileNotFoundError:
        raise RuntimeError(f"the server on {data_dir} is starting (no server.json yet)") from None
    except ValueError as exc:
        raise RuntimeError(f"cannot read {data_dir / 'server.json'}: {exc}") from None
    invokers = info.get("invokers")
    if not isinstance(invokers, list):  # written by a server from before --invokers
        invokers = [
            {"name": "local", "port": info.get("invoker_port"), "pid": info.get("invoker_pid")}
        ]
    states = _states(info.get("url"), data_dir)
    info["controller_running"] = _alive(info.get("controller_pid"))
    info["invokers"] = [
        {
            **inv,
            "running": _alive(inv.get("pid")),
            "state": states.get(str(inv.get("name")), "unknown"),
        }
        for inv in invokers
        if isinstance(inv, dict)
    ]
    return info


def status_lines(info: dict[str, Any]) -> list[str]:
    """What `sllm server status` prints for `read_status`'s document."""
    running = "running" if info.get("controller_running") else "not running"
    lines = [
        f"server   {info.get('url')} (pid {info.get('pid')}; controller pid "
        f"{info.get('controller_pid')}, {running})",
        f"store    {info.get('store')}",
    ]
    rows = [("NAME", "PORT", "PID", "PROCESS", "STATE", "CACHE")] + [
        (
            str(inv.get("name")),
            str(inv.get("port")),
            str(inv.get("pid")),
            "running" if inv.get("running") else "exited",
            str(inv.get("state")),
            str(inv.get("cache_dir", "-")),
        )
        for inv in info["invokers"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, row[-1]]))
    return lines


def _states(url: Any, data_dir: Path) -> dict[str, str]:
    """Invoker name -> state at the controller ({} when it cannot be asked)."""
    from sllm.client import ApiError, Client

    key = saved_key(data_dir)
    if not isinstance(url, str) or key is None:
        return {}
    try:
        with Client(url, key, timeout=CONTROLLER_TIMEOUT_S) as api:
            return {str(v.get("name")): str(v.get("state")) for v in api.list_invokers()}
    except ApiError:
        return {}


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process by now
        return False
    return True
