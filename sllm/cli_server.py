"""`sllm server start|stop`: the embedded all-in-one server on this machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from sllm.core.errors import SllmError


def _default_data_dir() -> Path:
    from sllm.core.config import sllm_home

    return sllm_home(os.environ) / "server"


@click.group()
def server() -> None:
    """Run the embedded server: controller (SQLite), local invokers, a local folder store."""


@server.command("start")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8700, show_default=True, help="Controller port.")
@click.option(
    "--invokers",
    type=int,
    default=1,
    show_default=True,
    help="Local invokers to run, each with its own port, cache folder (DATA/invoker, "
    "DATA/invoker-2, ...), name (local, local-2, ...) and share of the tier budgets.",
)
@click.option(
    "--invoker-port",
    type=int,
    default=0,
    help="The first invoker's port; the others follow [PORT + 1, PORT + 2, ...].",
)
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="Database, store, caches and logs [$SLLM_HOME/server].",
)
@click.option(
    "--api-key",
    default="",
    envvar="SLLM_SERVER_API_KEY",
    help="Admin API key to install instead of the saved one (KEY_ID:SECRET); the previous one "
    "is revoked. Prefer $SLLM_SERVER_API_KEY: a flag shows in `ps`. [the data folder's key]",
)
@click.option(
    "--new-key", is_flag=True, help="Mint a new admin API key and revoke the previous one."
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--dram-capacity",
    default="",
    help="DRAM tier budget, e.g. 8GiB: the total, split evenly between the invokers "
    "[the invoker default, 16GiB].",
)
@click.option(
    "--nvme-capacity",
    default="",
    help="NVMe tier budget, e.g. 100GiB: the total, split evenly between the invokers "
    "[the invoker default, 64GiB].",
)
@click.option(
    "--drain-grace",
    type=click.FloatRange(0, 3600),
    help="Seconds an invoker's running generations get to finish when it is stopped with "
    "SIGTERM (a rolling restart) [60].",
)
@click.option(
    "--store",
    "store_uri",
    help="Object store URI [SLLM_STORE_URI, $SLLM_HOME/store: where `sllm model push` goes].",
)
@click.option("--detach", is_flag=True, help="Run in the background; stop with `sllm server stop`.")
@click.option("--lock-fd", type=int, hidden=True, help="The data folder's lock, from --detach.")
def start(
    host: str,
    port: int,
    invokers: int,
    invoker_port: int,
    data_dir: Path | None,
    api_key: str,
    new_key: bool,
    device: str,
    dram_capacity: str,
    nvme_capacity: str,
    drain_grace: float | None,
    store_uri: str | None,
    detach: bool,
    lock_fd: int | None,
) -> None:
    """Start the embedded server (foreground unless --detach); print its URL and API key.

    It writes the CLI config, so `sllm fn ...` works right after. The admin key
    is kept in DATA/admin.key (readable by you only) and reused by every start;
    it is printed only to a terminal, never to a log. With --invokers N, N local
    invokers form a cluster on this machine (`sllm invoker list` shows them); one
    that exits, or is stopped with SIGTERM (which drains it first), is restarted.
    """
    from sllm import server as embedded
    from sllm.core.names import KEY_ID_RULE, is_api_key

    folder = (data_dir or _default_data_dir()).expanduser().resolve()
    if api_key and not is_api_key(api_key):
        raise click.BadParameter(
            f"expected KEY_ID:SECRET, the KEY_ID {KEY_ID_RULE}", param_hint="'--api-key'"
        )
    if api_key and new_key:
        raise click.UsageError("--api-key and --new-key cannot be combined")
    from sllm.store import default_store_uri

    settings = embedded.ServerSettings(
        folder,
        host,
        port,
        invoker_port,
        api_key,
        device,
        dram_capacity,
        nvme_capacity,
        store_uri or default_store_uri(os.environ),
        invokers=invokers,
        drain_grace=drain_grace,
    )
    try:
        settings.local_invokers(os.environ)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    try:
        show_key = sys.stdout.isatty()
        if detach:
            embedded.detach(settings, click.echo, show_key=show_key, new_key=new_key)
            return
        status = embedded.run(
            settings, click.echo, os.environ, show_key=show_key, new_key=new_key, lock_fd=lock_fd
        )
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    except SllmError as exc:
        raise click.ClickException(exc.message) from None
    sys.exit(status)


@server.command("stop")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="The data folder it was started with [$SLLM_HOME/server].",
)
def stop(data_dir: Path | None) -> None:
    """Stop a server started with --detach."""
    from sllm import server as embedded

    folder = (data_dir or _default_data_dir()).expanduser().resolve()
    try:
        if not embedded.stop(folder, click.echo):
            raise click.ClickException(f"no server is running with data folder {folder}")
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None


@server.command("status")
@click.option(
    "--data-dir",
    type=click.Path(path_type=Path),
    help="The data folder it was started with [$SLLM_HOME/server].",
)
@click.option("--json", "as_json", is_flag=True, help="Print DATA/server.json with liveness.")
def status(data_dir: Path | None, as_json: bool) -> None:
    """Show the server running on a data folder: URL, processes, and its local invokers."""
    import json

    from sllm.server_status import read_status, status_lines

    folder = (data_dir or _default_data_dir()).expanduser().resolve()
    try:
        info = read_status(folder)
    except (RuntimeError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for line in status_lines(info):
        click.echo(line)
