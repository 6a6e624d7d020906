"""`sllm invoker list|drain|undrain`: the invokers as the controller sees them (admin key).

$ sllm invoker drain local-2 --wait
draining local-2: 2 generations, 1 instance left (4 s; cut after 60 s)
drained local-2 in 9.1 s
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

import click

from sllm.cli_client import _api_command, _client, _fail, _json_option, _print_json, _table

POLL_S = 0.5
WAIT_MARGIN_S = 30.0  # past the drain's deadline, a maintenance pass ends it at the latest


@click.command("list")
@_json_option
@_api_command
def invoker_list(as_json: bool) -> None:
    """List the invokers registered with the controller (needs an admin key).

    STATE is active, draining, drained or lost; RUNNING counts the generations
    running there; HEARTBEAT is the age of its last report.
    """
    with _client() as api:
        docs = api.list_invokers()
    if as_json:
        _print_json(docs)
        return
    if not docs:
        click.echo("no invokers")
        return
    _table(
        ("NAME", "STATE", "DEVICE", "URL", "INSTANCES", "RUNNING", "HEARTBEAT"),
        (
            (
                v["name"],
                v["state"],
                v["device"] or "-",
                v["url"],
                str(v["instances"]),
                str(v.get("running_generations", "-")),
                _age(v),
            )
            for v in docs
        ),
    )


@click.command("drain")
@click.argument("name")
@click.option(
    "--grace",
    type=click.FloatRange(0, 86_400),
    metavar="S",
    help="Seconds running generations get before they are cut [the longest timeout of the "
    "functions placed there, at least the default function timeout].",
)
@click.option("--wait", is_flag=True, help="Show the progress until the invoker is drained.")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0),
    metavar="S",
    help="With --wait: give up waiting after S seconds (the drain goes on) [its grace + 30].",
)
@_json_option
@_api_command
def invoker_drain(
    name: str, grace: float | None, wait: bool, timeout: float | None, as_json: bool
) -> None:
    """Drain invoker NAME: no new work goes there, running generations migrate live to
    another invoker (or, when none can take them, finish, or are cut after the grace), then
    its instances are unloaded. Undo with `sllm invoker undrain`."""
    with _client() as api:
        doc: Mapping[str, Any] = api.drain_invoker(name, grace)
        if wait and doc["state"] != "drained":
            doc = _wait_drained(api, name, doc, timeout, quiet=as_json)
    if as_json:
        _print_json(doc)
    elif not wait:
        click.echo(f"{doc['state']} {name}: {_progress(doc)}")


@click.command("undrain")
@click.argument("name")
@_json_option
@_api_command
def invoker_undrain(name: str, as_json: bool) -> None:
    """Put invoker NAME back to work after a drain: new instances may be placed there."""
    with _client() as api:
        doc = api.undrain_invoker(name)
    if as_json:
        _print_json(doc)
        return
    click.echo(f"invoker {name} is {doc['state']}")


COMMANDS = (invoker_list, invoker_drain, invoker_undrain)  # added to `sllm invoker`


def _wait_drained(
    api: Any, name: str, doc: Mapping[str, Any], timeout: float | None, *, quiet: bool
) -> Mapping[str, Any]:
    """Poll until `name` is drained, printing its progress; exit 1 when it will not be."""
    started = time.monotonic()
    if timeout is None:
        drain = doc.get("drain") or {}
        left = float(drain.get("deadline", time.time())) - time.time()
        timeout = max(0.0, left) + WAIT_MARGIN_S
    tty = sys.stdout.isatty()
    shown = ""
    while doc["state"] == "draining":
        elapsed = time.monotonic() - started
        if elapsed > timeout:
            _end_line(tty, shown)
            _fail(f"invoker {name} is still draining after {timeout:.0f} s", "timeout")
        line = f"draining {name}: {_progress(doc)} ({elapsed:.0f} s)"
        if not quiet and line != shown:
            click.echo(("\r" + line.ljust(len(shown))) if tty else line, nl=not tty)
            shown = line
        time.sleep(POLL_S)
        doc = api.get_invoker(name)
    _end_line(tty, shown)
    if doc["state"] != "drained":
        _fail(
            f"invoker {name} is {doc['state']} now: the drain ended before it finished", "conflict"
        )
    if not quiet:
        forced = (doc.get("drain") or {}).get("forced")
        cut = " (the grace ran out: what still ran was cut)" if forced else ""
        click.echo(f"drained {name} in {time.monotonic() - started:.1f} s{cut}")
    return doc


def _progress(doc: Mapping[str, Any]) -> str:
    drain = doc.get("drain") or {}
    generations = drain.get("generations_left", doc.get("running_generations", 0))
    instances = drain.get("instances_left", doc.get("instances", 0))
    grace = drain.get("grace_s")
    cut = f"; cut after {grace:g} s" if isinstance(grace, (int, float)) else ""
    return (
        f"{generations} generation{'s' * (generations != 1)}, "
        f"{instances} instance{'s' * (instances != 1)} left{cut}"
    )


def _end_line(tty: bool, shown: str) -> None:
    if tty and shown:
        click.echo("")


def _age(doc: Mapping[str, Any]) -> str:
    age = doc.get("heartbeat_age_s")
    if not isinstance(age, (int, float)):
        last = doc.get("last_heartbeat")
        age = None if last is None else time.time() - last
    return "-" if age is None else f"{age:.1f}s ago"
