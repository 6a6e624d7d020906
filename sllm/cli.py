"""The `sllm` command line: a thin client of the library and (later) the controller's API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from sllm.cli_activation import activation as activation_group
from sllm.cli_client import API_OPTIONS
from sllm.cli_client import fn as fn_group
from sllm.cli_client import login as login_command
from sllm.cli_controller import controller as controller_group
from sllm.cli_invoker import invoker as invoker_group
from sllm.cli_invoker_admin import COMMANDS as invoker_admin_commands
from sllm.cli_server import server as server_group
from sllm.cli_store import echo_pushed, open_store_from_env


def _parse_device_map(value: str | None) -> Any:
    """--device-map: a number of devices, or a JSON object {module prefix: device}."""
    if value is None:
        return None
    hint = "'--device-map'"
    if value.strip().lstrip("-").isdigit():
        count = int(value)
        if count < 1:
            raise click.BadParameter(
                "expected a device count of at least 1 or a JSON object", param_hint=hint
            )
        return count
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise click.BadParameter(
            "expected a device count of at least 1 or a JSON object", param_hint=hint
        )
    return parsed


def _with_api_options(group: click.Group) -> click.Group:
    """--apihost, --key and --namespace before the subcommand too (`sllm --key K fn list`);
    the same option after it wins."""
    for option in reversed(API_OPTIONS):
        group = option(group)
    return group


@_with_api_options
@click.group()
@click.version_option(package_name="sllm")
def main() -> None:
    """sllm: a serverless runtime for large language models."""


@main.command()
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path(".sllm-demo"),
    show_default=True,
    help="Scratch folder (recreated).",
)
def demo(workdir: Path) -> None:
    """Build a demo model, convert it, load it and generate: the main job, offline."""
    from sllm.demo import run

    run(workdir, click.echo)


@main.group()
def model() -> None:
    """Convert and publish model checkpoints."""


@model.command("convert")
@click.argument("src", type=click.Path(exists=True, path_type=Path))
@click.argument("dst", type=click.Path(path_type=Path))
@click.option(
    "--device-map",
    help="Partitions: a device count (balanced by layer) or a JSON "
    "object mapping module prefixes to devices.",
)
@click.option(
    "--chunk-size",
    type=int,
    default=4 * 1024 * 1024,
    show_default=True,
    help="Read and checksum unit in bytes (a multiple of 4096).",
)
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
@click.option(
    "--progress/--quiet",
    "-p/-q",
    default=None,
    help="Show a progress bar (default: when stderr is a terminal).",
)
def model_convert(
    src: Path,
    dst: Path,
    device_map: str | None,
    chunk_size: int,
    overwrite: bool,
    progress: bool | None,
) -> None:
    """Convert SRC (a .safetensors file, a sharded folder or a Hugging Face model folder)
    into the loading-optimized format at DST."""
    from sllm.native_loader import LoaderError, convert

    parsed = _parse_device_map(device_map)
    if dst.exists() and not overwrite:
        raise click.ClickException(f"{dst} already exists; pass --overwrite to replace it")
    try:
        manifest = convert(
            src,
            dst,
            device_map=parsed,
            chunk_size=chunk_size,
            overwrite=overwrite,
            progress=sys.stderr.isatty() if progress is None else progress,
        )
    except LoaderError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"converted {src} -> {dst}: {len(manifest.tensors)} tensors, "
        f"{len(manifest.partitions)} partition(s), {manifest.total_bytes / 1e6:.1f} MB, "
        f"{len(manifest.files)} extra file(s)"
    )


_STORE_HELP = (
    "Object store URI: s3://bucket[/prefix] or file:///path "
    "(default: $SLLM_STORE_URI, else file://$SLLM_HOME/store)."
)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if size < 1000 or unit == "TB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    raise AssertionError("unreachable")


@model.command("push")
@click.argument("src")
@click.argument("name")
@click.option("--store", "store_uri", metavar="URI", help=_STORE_HELP)
@click.option(
    "--device-map",
    help="When SRC needs converting: a device count or a JSON object of module prefixes to devices.",
)
@click.option(
    "--chunk-size",
    type=click.IntRange(min=1),
    metavar="MB",
    help="When SRC needs converting: read and checksum unit in MiB.",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bars.")
def model_push(
    src: str,
    name: str,
    store_uri: str | None,
    device_map: str | None,
    chunk_size: int | None,
    quiet: bool,
) -> None:
    """Publish SRC as model NAME: a converted folder, an HF folder, a .safetensors file, or a
    Hugging Face hub id (downloaded and converted first).

    Symlinks inside a SRC folder are followed; one that leads out of it is refused.
    """
    from sllm.core.errors import SllmError
    from sllm.store import push_model

    parsed = _parse_device_map(device_map)
    store = open_store_from_env(store_uri)
    try:
        result = push_model(
            src,
            name,
            store,
            progress=not quiet and sys.stderr.isatty(),
            device_map=parsed,
            chunk_size=None if chunk_size is None else chunk_size * 1024 * 1024,
        )
    except SllmError as exc:
        raise click.ClickException(exc.message) from None
    echo_pushed(result)


@model.command("demo")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--seed", type=int, default=7, show_default=True, help="Seed of the random weights.")
def model_demo(folder: Path, seed: int) -> None:
    """Build a small demo Llama (random weights, a tokenizer trained on the spot) in FOLDER."""
    from transformers.utils import logging as hf_logging

    from sllm.tiny_models import build_tiny_model

    hf_logging.disable_progress_bar()
    src = build_tiny_model("llama", folder, seed=seed)
    size = sum(p.stat().st_size for p in src.iterdir())
    click.echo(f"built a demo Llama model in {src} ({size} bytes)")


@model.command("list")
@click.option("--store", "store_uri", metavar="URI", help=_STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the published records as JSON.")
def model_list(store_uri: str | None, as_json: bool) -> None:
    """List the models published in the store."""
    from sllm.core.errors import SllmError
    from sllm.store import list_models

    store = open_store_from_env(store_uri)
    try:
        models = list_models(store)
    except SllmError as exc:
        raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(json.dumps([m.to_json() for m in models], indent=2))
        return
    if not models:
        click.echo(f"no models published in {store.uri}")
        return
    rows = [("NAME", "DIGEST", "SIZE", "PUSHED")] + [
        (m.name, m.digest[:12], _human_bytes(m.total_bytes), m.pushed_at) for m in models
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        click.echo("  ".join([*cells, row[3]]))


@main.group()
def bench() -> None:
    """Benchmarks; results go to benchmarks/results/."""


@bench.command("load")
@click.option("--size-gb", type=float, default=2.0, show_default=True, help="Checkpoint size.")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved rounds.")
@click.option(
    "--workdir",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/scratch"),
    show_default=True,
    help="Where the generated checkpoints live (on the disk to test).",
)
@click.option(
    "--out",
    type=click.Path(path_type=Path),
    default=Path("benchmarks/results/load.json"),
    show_default=True,
    help="JSON results file.",
)
@click.option("--threads", type=int, default=None, help="Reader threads (default: the loader's).")
@click.option("--keep", is_flag=True, help="Keep the generated checkpoints for the next run.")
def bench_load(
    size_gb: float, rounds: int, workdir: Path, out: Path, threads: int | None, keep: bool
) -> None:
    """Checkpoint loading: ours vs fio, safetensors and torch.load, cold and warm (and CUDA)."""
    from sllm.bench.load import run

    if size_gb <= 0 or rounds < 1:
        raise click.BadParameter("--size-gb must be > 0 and --rounds >= 1")
    run(
        size_gb=size_gb,
        rounds=rounds,
        workdir=workdir,
        out=out,
        threads=threads,
        keep=keep,
        echo=lambda s: click.echo(s, file=sys.stdout),
    )


for _command in invoker_admin_commands:  # list, drain, undrain: clients of the controller
    invoker_group.add_command(_command)
main.add_command(invoker_group)
main.add_command(fn_group)
main.add_command(activation_group)
main.add_command(login_command)
main.add_command(controller_group)
main.add_command(server_group)


def _add_bench_commands() -> None:
    from sllm.bench.coldstart import command as coldstart
    from sllm.bench.decode import command as decode
    from sllm.bench.migration import command as migration
    from sllm.bench.overhead import command as overhead

    bench.add_command(coldstart)
    bench.add_command(decode)
    bench.add_command(migration)
    bench.add_command(overhead)


_add_bench_commands()

if __name__ == "__main__":
    main()
