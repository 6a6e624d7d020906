"""`sllm invoker ...`: run an invoker on this host."""

from __future__ import annotations

import os
from pathlib import Path

import click

from sllm.core.config import parse_size


def _size(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return parse_size(value, name=f"--{param.name}".replace("_", "-"))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


@click.group()
def invoker() -> None:
    """Run and inspect invokers (the per-host model agents)."""


@invoker.command("start")
@click.option("--host", help="Address to bind [SLLM_INVOKER_HOST, 127.0.0.1].")
@click.option("--port", type=int, help="Port [SLLM_INVOKER_PORT, 8701]; 0 picks a free one.")
@click.option(
    "--port-file",
    help="Write the bound port to this file once listening [SLLM_INVOKER_PORT_FILE].",
)
@click.option("--token", help="Internal token shared with the controller [SLLM_INTERNAL_TOKEN].")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path),
    help="NVMe cache folder [SLLM_INVOKER_CACHE_DIR, $SLLM_HOME/invoker].",
)
@click.option("--store", "store_uri", help="Object store URI [SLLM_STORE_URI].")
@click.option("--nvme-capacity", callback=_size, help="NVMe tier budget, e.g. 100GiB.")
@click.option("--dram-capacity", callback=_size, help="DRAM tier budget, e.g. 32GiB.")
@click.option("--device", help="auto, cpu, cuda or cuda:N [SLLM_INVOKER_DEVICE, auto].")
@click.option("--download-concurrency", type=int, help="Parallel ranged GETs per download.")
@click.option("--part-size", callback=_size, help="Bytes per ranged GET, e.g. 16MiB.")
@click.option("--threads", type=int, help="Request threads.")
@click.option(
    "--controller",
    "controller_url",
    help="Controller URL to register and heartbeat with [SLLM_CONTROLLER_URL].",
)
@click.option("--name", help="Name at the controller [SLLM_INVOKER_NAME, HOST:PORT].")
@click.option(
    "--advertise-url", help="URL the controller calls this invoker at [SLLM_INVOKER_URL]."
)
@click.option("--heartbeat-interval", type=float, help="Seconds between heartbeats [2].")
@click.option(
    "--measure/--no-measure",
    "measure_bandwidth",
    default=None,
    help="Probe disk, network and host->device bandwidth at start.",
)
@click.option(
    "--batching/--no-batching",
    default=None,
    help="Batch an instance's concurrent streams into one forward pass [SLLM_BATCHING, on].",
)
@click.option(
    "--kv-cache-bytes",
    callback=_size,
    help="KV cache budget per instance, e.g. 4GiB [SLLM_KV_CACHE_BYTES; "
    "default a quarter of the DRAM tier, or half the free GPU memory].",
)
@click.option(
    "--prefill-chunk",
    type=int,
    help="Prompt tokens per step between decode passes [SLLM_PREFILL_CHUNK, 256].",
)
@click.option(
    "--hold-timeout",
    type=float,
    help="Seconds a held generation (a migration target) waits for its next prefill or "
    "continue before it is cancelled [SLLM_HOLD_TIMEOUT, 120].",
)
@click.option(
    "--drain-grace",
    type=click.FloatRange(0, 3600),
    help="On SIGTERM, seconds running generations get to finish before the invoker exits "
    "(it takes no new work meanwhile) [SLLM_DRAIN_GRACE, 60].",
)
@click.option(
    "--detach-grace",
    type=click.FloatRange(0, 3600),
    help="Seconds a generation whose controller stopped reading runs on, for a reconnecting "
    "client to attach to it; 0 cancels it at once [SLLM_DETACH_GRACE, 30].",
)
def start(**flags: object) -> None:
    """Start an invoker in the foreground (gunicorn, one worker process, request threads)."""
    from sllm.core.errors import SllmError
    from sllm.invoker import InvokerConfig, serve

    try:
        config = InvokerConfig.from_env(os.environ, **flags)
        config.validate()
    except (ValueError, SllmError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        serve(config)
    except SllmError as exc:  # CacheFolderBusy among them
        raise click.ClickException(exc.message) from None
    except OSError as exc:  # the cache folder cannot be made or locked
        raise click.ClickException(f"cannot start the invoker: {exc}") from None
