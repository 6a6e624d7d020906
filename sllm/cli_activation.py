"""`sllm activation ...`: activation records (list, get, result, logs) and live migration.

Split from cli_client.py; the connection and output helpers are shared from there.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import click

from sllm.cli_client import (
    _api_command,
    _client,
    _fail,
    _fields,
    _json_option,
    _ms,
    _print_json,
    _show_stream,
    _table,
    _when,
)


@click.group("activation")
def activation() -> None:
    """Inspect activations: the records of invocations."""


@activation.command("list")
@click.argument("name", required=False)
@click.option("--limit", type=click.IntRange(1, 200), help="At most this many [30].")
@click.option("--skip", type=click.IntRange(min=0), help="Skip this many first.")
@click.option("--since", type=float, metavar="EPOCH", help="Created at or after (epoch seconds).")
@click.option("--upto", type=float, metavar="EPOCH", help="Created at or before (epoch seconds).")
@click.option(
    "--status",
    type=click.Choice(
        ["queued", "running", "success", "function_error", "platform_error", "timeout"]
    ),
    help="Only activations with this status.",
)
@_json_option
@_api_command
def activation_list(
    name: str | None,
    limit: int | None,
    skip: int | None,
    since: float | None,
    upto: float | None,
    status: str | None,
    as_json: bool,
) -> None:
    """List activations (of function NAME if given), newest first."""
    with _client() as api:
        docs = api.list_activations(
            name=name, since=since, upto=upto, status=status, limit=limit, skip=skip
        )
    if as_json:
        _print_json(docs)
        return
    if not docs:
        click.echo("no activations")
        return
    _table(
        ("CREATED", "ACTIVATION ID", "NAME", "STATUS", "START", "DURATION", "TTFT", "TOKENS"),
        (
            (
                _when(a["created"]),
                a["activationId"],
                a["name"],
                a["status"],
                _start(a),
                _ms(a["duration_ms"]),
                _ms(a["ttft_ms"]),
                f"{a['tokens_in'] or 0}/{a['tokens_out'] or 0}",
            )
            for a in docs
        ),
    )


def _start(doc: Mapping[str, Any]) -> str:
    """warm, cold/TIER, or - before it ran."""
    if doc.get("cold") is None:
        return "-"
    if not doc["cold"]:
        return "warm"
    return f"cold/{doc['tier']}" if doc.get("tier") else "cold"


@activation.command("get")
@click.argument("activation_id", metavar="ID")
@_json_option
@_api_command
def activation_get(activation_id: str, as_json: bool) -> None:
    """Show activation ID: its timings, where it ran, its result or error."""
    with _client() as api:
        doc = api.get_activation(activation_id)
    if as_json:
        _print_json(doc)
        return
    _fields(
        [
            ("activation", doc["activationId"]),
            ("function", f"{doc['namespace']}/{doc['name']} (version {doc['version']})"),
            ("model", doc["model"]),
            ("status", doc["status"]),
            ("created", _when(doc["created"])),
            ("duration", _ms(doc["duration_ms"])),
            ("wait", _ms(doc["wait_ms"])),
            ("start", f"{_start(doc)}, load {_ms(doc['load_ms'])}"),
            ("ttft", _ms(doc["ttft_ms"])),
            ("tpot", _ms(doc["tpot_ms"])),
            ("tokens", f"{doc['tokens_in'] or 0} in, {doc['tokens_out'] or 0} out"),
            ("invoker", doc["invoker"] or "-"),
            *[("moved", _move(m)) for m in doc.get("moves") or []],
        ]
    )
    if doc.get("error"):
        click.echo(f"error: {doc['error'].get('message')} ({doc['error'].get('code')})")
    if doc.get("result") is not None:
        click.echo("result:")
        _print_json(doc["result"])


def _move(move: Mapping[str, Any]) -> str:
    """One move of a generation, e.g. "resume inv-a -> inv-b at token 12 (broken), pause 840 ms"."""
    pause = move.get("pause_ms")
    line = (
        f"{move.get('kind')} of choice {move.get('choice')} {move.get('from')} -> "
        f"{move.get('to')} at token {move.get('tokens')} ({move.get('reason')}), "
        f"pause {_ms(pause)}, {_when(move.get('at'))}"
    )
    if move.get("rounds") is not None:
        line += f", {move['rounds']} round(s), {move.get('tokens_recomputed')} tokens recomputed"
    if move.get("outcome") not in (None, "moved"):
        line += f", {move['outcome']}: {move.get('error')}"
    return line


@activation.command("migrate")
@click.argument("activation_id", metavar="ID")
@click.option("--to", "to", metavar="INVOKER", help="The destination (default: the best other).")
@click.option("--wait", is_flag=True, help="Wait until the activation ends, then show its moves.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="--wait's limit (s).")
@_json_option
@_api_command
def activation_migrate(
    activation_id: str, to: str | None, wait: bool, timeout: float, as_json: bool
) -> None:
    """Move running activation ID's generation to another invoker, live (admin key)."""
    from sllm.client import ApiError

    with _client() as api:
        doc = api.migrate_activation(activation_id, to)
        if not wait:
            if as_json:
                _print_json(doc)
            else:
                click.echo(f"migration of {activation_id} from {doc.get('from')} requested")
            return
        deadline = time.monotonic() + timeout
        while True:  # the moves are stored with the activation, when it ends
            try:
                done = api.get_activation(activation_id)
            except ApiError as exc:
                if exc.status != 404:
                    raise
                done = None
            if done is not None and done["status"] not in ("queued", "running"):
                break
            if time.monotonic() > deadline:
                _fail(f"activation {activation_id} still runs after {timeout:g} s", "timeout")
            time.sleep(0.5)
    if as_json:
        _print_json(done.get("moves") or [])
        return
    moves = [m for m in done.get("moves") or [] if m.get("kind") == "migrate"]
    if not moves:
        _fail(f"activation {activation_id} ended without moving", "not_moved", activation_id)
    for m in moves:
        click.echo(_move(m))


@activation.command("stream")
@click.argument("activation_id", metavar="ID")
@click.option(
    "--from",
    "after",
    default="0",
    show_default=True,
    help="The last token index you have (one per choice for n > 1: 12.9).",
)
@_json_option
@_api_command
def activation_stream(activation_id: str, after: str, as_json: bool) -> None:
    """Reconnect to streaming activation ID: the tokens after --from, as they come (the
    generation keeps running a while after its client's connection dropped)."""
    with _client() as api:
        _show_stream(api.activation_stream(activation_id, after), as_json)


@activation.command("cancel")
@click.argument("activation_id", metavar="ID")
@_json_option
@_api_command
def activation_cancel(activation_id: str, as_json: bool) -> None:
    """Stop running activation ID now (a stream whose client left runs on a while for a
    reconnect; this ends it at once)."""
    with _client() as api:
        doc = api.cancel_activation(activation_id)
    if as_json:
        _print_json(doc)
    else:
        where = ", ".join(sorted({c["invoker"] for c in doc["cancelled"]}))
        click.echo(f"ok: cancelled activation {activation_id} on {where}")


@activation.command("result")
@click.argument("activation_id", metavar="ID")
@_json_option
@_api_command
def activation_result(activation_id: str, as_json: bool) -> None:
    """Print the result of activation ID (exit 1 if it failed or has not finished)."""
    with _client() as api:
        doc = api.activation_result(activation_id)
    if as_json:
        _print_json(doc)
    elif doc["status"] in ("queued", "running"):
        _fail(f"activation {activation_id} is {doc['status']}; try again later", doc["status"])
    elif doc.get("error"):
        _fail(str(doc["error"].get("message")), str(doc["error"].get("code")), activation_id)
    else:
        _print_json(doc["result"])


@activation.command("logs")
@click.argument("activation_id", metavar="ID")
@_json_option
@_api_command
def activation_logs(activation_id: str, as_json: bool) -> None:
    """Print the log lines of activation ID."""
    with _client() as api:
        doc = api.activation_logs(activation_id)
    if as_json:
        _print_json(doc)
        return
    for line in doc["logs"] or []:
        click.echo(line)
