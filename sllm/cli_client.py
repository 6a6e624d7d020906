"""`sllm fn|activation|login`: the CLI as a client of the controller.

Modelled on `wsk`: `-p KEY VALUE` parameters (JSON when they parse, else
strings), `--blocking`, `--result`, `--stream`; readable tables by default and
`--json` for the raw answers. Every command finds the controller through
--apihost/--key, else SLLM_APIHOST/SLLM_API_KEY, else $SLLM_HOME/cli.json.
`sllm invoker list|drain|undrain` use the same plumbing (cli_invoker_admin).
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, ParamSpec

import click

from sllm.cli_store import echo_pushed, open_store_from_env

if TYPE_CHECKING:
    from sllm.client import Client

P = ParamSpec("P")

_META = "sllm.api."  # where the connection options wait in click's context meta
_PARSED = "sllm.params.parsed"  # -p KEY -> the text of a value JSON made a non-string


# --------------------------------------------------------------------------- connection
def _remember(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value is not None:
        ctx.meta[_META + str(param.name)] = value


API_OPTIONS = (
    click.option(
        "--apihost",
        metavar="URL",
        expose_value=False,
        callback=_remember,
        help="Controller URL [SLLM_APIHOST, else the one saved by `sllm login`].",
    ),
    click.option(
        "--key",
        metavar="KEY",
        expose_value=False,
        callback=_remember,
        help="API key KEY_ID:SECRET [SLLM_API_KEY, else the one saved by `sllm login`].",
    ),
    click.option(
        "--namespace",
        metavar="NS",
        expose_value=False,
        callback=_remember,
        help="Namespace to act in [_: the key's own; an admin key must name one].",
    ),
)


def _api_command(f: Callable[P, None]) -> Callable[P, None]:
    """Add the connection options; an API error prints `error: MESSAGE (CODE)` and exits 1."""

    @functools.wraps(f)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        from sllm.client import ApiError

        try:
            f(*args, **kwargs)
        except ApiError as exc:
            _fail(exc.message, exc.code, exc.activation_id)

    for option in reversed(API_OPTIONS):
        run = option(run)
    return run


def _client() -> Client:
    """A client for the controller named by the options, else the environment, else the file."""
    from sllm.client import Client, load_cli_config

    meta = click.get_current_context().meta
    try:
        config = load_cli_config(os.environ)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    apihost = meta.get(_META + "apihost") or config.apihost
    api_key = meta.get(_META + "key") or config.api_key
    if not apihost or not api_key:
        missing = " and ".join(
            what for what, value in (("controller URL", apihost), ("API key", api_key)) if not value
        )
        raise click.ClickException(
            f"no {missing} configured: run `sllm login APIHOST --key KEY` "
            "(or `sllm server start` for a local server), set SLLM_APIHOST and SLLM_API_KEY, "
            "or pass --apihost and --key"
        )
    return Client(apihost, api_key, namespace=meta.get(_META + "namespace", "_"))


def _fail(message: str, code: str, activation_id: str | None = None) -> NoReturn:
    click.echo(f"error: {message} ({code})", err=True)
    hint = _param_hint(message)
    if hint:
        click.echo(hint, err=True)
    if activation_id:
        click.echo(f"activation: {activation_id}", err=True)
    raise click.exceptions.Exit(1)


# --------------------------------------------------------------------------- output
_json_option = click.option("--json", "as_json", is_flag=True, help="Print the raw JSON answer.")


def _print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, ensure_ascii=False))


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> None:
    """Columns padded to their widest cell; the last one is not padded."""
    lines = [list(header), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    for line in lines:
        cells = [cell.ljust(width) for cell, width in zip(line, widths, strict=False)]
        click.echo("  ".join([*cells, line[-1]]).rstrip())


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f} ms" if value < 10_000 else f"{value / 1000:.1f} s"


def _seconds(value: float) -> str:
    return f"{value:g}s"


def _fields(pairs: Iterable[tuple[str, str]]) -> None:
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        click.echo(f"{key.ljust(width)}  {value}")


# --------------------------------------------------------------------------- parameters
def _json_or_string(value: str) -> Any:
    """As wsk reads `-p` values: JSON when it parses, else the string itself."""
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _read_param_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise click.BadParameter(
            f"cannot read {path}: {exc}", param_hint="'--param-file'"
        ) from None
    if not isinstance(doc, dict):
        raise click.BadParameter(f"{path} must hold a JSON object", param_hint="'--param-file'")
    return doc


def _params(pairs: Sequence[tuple[str, str]], param_file: Path | None) -> dict[str, Any]:
    """--param-file's object, then each -p KEY VALUE over it.

    The -p values that JSON turned into something other than a string are
    remembered, so an error about one of them can say how to send it as text.
    """
    params = _read_param_file(param_file)
    parsed = click.get_current_context().meta.setdefault(_PARSED, {})
    for key, text in pairs:
        params[key] = value = _json_or_string(text)
        if not isinstance(value, str):
            parsed[key] = text
    return params


_JSON_KINDS = {bool: "boolean", int: "number", float: "number", list: "array", dict: "object"}


def _param_hint(message: str) -> str | None:
    """How to send a -p value as a string, when `message` is about one JSON made a non-string."""
    ctx = click.get_current_context(silent=True)
    parsed: dict[str, str] = ctx.meta.get(_PARSED, {}) if ctx is not None else {}
    for key, text in parsed.items():
        if f"'{key}'" in message:
            kind = _JSON_KINDS.get(type(json.loads(text)), "null")
            return (
                f"hint: -p values are parsed as JSON, so -p {key} {text} sent a {kind}; "
                f"to send the text, quote it as a JSON string: -p {key} '\"{text}\"'"
            )
    return None


def _param_options(f: Callable[P, None]) -> Callable[P, None]:
    f = click.option(
        "--param-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help="A JSON object of parameters (-p entries override it).",
    )(f)
    return click.option(
        "--param",
        "-p",
        "param",
        nargs=2,
        multiple=True,
        metavar="KEY VALUE",
        help="A parameter; VALUE is parsed as JSON when it parses, else taken as a string.",
    )(f)


# --------------------------------------------------------------------------- fn
@click.group("fn")
def fn() -> None:
    """Create, update, inspect, delete and invoke functions."""


def _function_options(f: Callable[P, None]) -> Callable[P, None]:
    options = (
        click.option("--task", type=click.Choice(["generate", "embed"]), help="What it computes."),
        click.option("--timeout", type=float, metavar="SECONDS", help="Time limit per request."),
        click.option(
            "--max-tokens", type=int, metavar="N", help="Largest max_tokens a request gets."
        ),
        click.option("--concurrency", type=int, metavar="N", help="Requests per instance at once."),
        click.option("--max-payload", metavar="SIZE", help="Largest request body, e.g. 1MiB."),
        click.option("--min-instances", type=int, metavar="N", help="Instances kept warm."),
        click.option("--max-instances", type=int, metavar="N", help="Most instances at once."),
        click.option(
            "--target-concurrency", type=int, metavar="N", help="Requests per instance to scale at."
        ),
        click.option(
            "--keep-alive", type=float, metavar="SECONDS", help="Idle time before scaling down."
        ),
        click.option(
            "--on-invoker-loss",
            type=click.Choice(["resume", "fail"]),
            help="A stream whose invoker is lost mid-generation: resume it on another "
            "invoker from the tokens sent, or fail with invoker_lost [resume].",
        ),
        click.option(
            "--store",
            "store_uri",
            metavar="URI",
            help="Where to push a local --model folder [SLLM_STORE_URI, file://$SLLM_HOME/store].",
        ),
        click.option(
            "--push-as",
            metavar="MODEL",
            help="Publish a local --model folder under this name [the function's name].",
        ),
    )
    for option in reversed(options):
        f = option(f)
    return _param_options(f)


def _definition(
    name: str,
    model: str | None,
    params: dict[str, Any],
    params_given: bool,
    flags: Mapping[str, Any],
) -> dict[str, Any]:
    """The PUT body: only what was given (a local --model folder is pushed first)."""
    body: dict[str, Any] = {}
    if model is not None:
        body["model"] = _pushed(model, flags["push_as"], flags["store_uri"], name)
    elif flags["push_as"] or flags["store_uri"]:
        raise click.UsageError("--push-as and --store go with a local --model folder")
    if flags["task"] is not None:
        body["task"] = flags["task"]
    limits = {
        "timeout": flags["timeout"],
        "max_tokens": flags["max_tokens"],
        "concurrency": flags["concurrency"],
        "max_payload": _size(flags["max_payload"]),
    }
    scaling = {
        key: flags[key]
        for key in ("min_instances", "max_instances", "target_concurrency", "keep_alive")
    }
    for section, values in (("limits", limits), ("scaling", scaling)):
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            body[section] = given
    if params_given:
        body["params"] = params
    if flags.get("on_invoker_loss") is not None:
        body["on_invoker_loss"] = flags["on_invoker_loss"]
    return body


def _size(value: str | None) -> int | None:
    from sllm.core.config import parse_size

    if value is None:
        return None
    try:
        return parse_size(value, name="--max-payload")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--max-payload'") from None


def _pushed(model: str, push_as: str | None, store_uri: str | None, fn_name: str) -> str:
    """`model` itself, or, when it is a local path, the name it was just published under."""
    if not Path(model).exists():
        if push_as or store_uri:
            raise click.UsageError(
                f"--push-as and --store go with a local --model folder; {model!r} is not a path"
            )
        return model
    from sllm.core.errors import SllmError
    from sllm.store import push_model

    name = push_as or fn_name
    failure = f"cannot push {model}: "
    store = open_store_from_env(store_uri, failure=failure)
    click.echo(f"pushing {model} to {store.uri} as model {name} ...", err=True)
    try:
        pushed = push_model(str(model), name, store, progress=sys.stderr.isatty())
    except SllmError as exc:
        raise click.ClickException(f"{failure}{exc.message}") from None
    return echo_pushed(pushed, label="model ")


@fn.command("create")
@click.argument("name")
@click.option(
    "--model",
    "-m",
    required=True,
    help="A published model name, or a local model folder or file to push first.",
)
@_function_options
@_json_option
@_api_command
def fn_create(
    name: str,
    model: str,
    param: tuple[tuple[str, str], ...],
    param_file: Path | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Create function NAME serving a model; -p KEY VALUE sets default request parameters."""
    params = _params(param, param_file)
    body = _definition(name, model, params, bool(param or param_file), flags)
    with _client() as api:
        doc = api.put_function(name, body)
    if as_json:
        _print_json(doc)
    else:
        click.echo(f"ok: created function {doc['name']} (model {doc['model']}, {doc['task']})")


@fn.command("update")
@click.argument("name")
@click.option(
    "--model", "-m", help="A published model name, or a local model folder or file to push first."
)
@_function_options
@_json_option
@_api_command
def fn_update(
    name: str,
    model: str | None,
    param: tuple[tuple[str, str], ...],
    param_file: Path | None,
    as_json: bool,
    **flags: Any,
) -> None:
    """Change function NAME: only the options given change; -p replaces all default parameters."""
    params = _params(param, param_file)
    params_given = bool(param or param_file)
    body = _definition(name, model, params, params_given, flags)
    if not body:
        raise click.UsageError(
            "nothing to update: give --model, -p, a limit or scaling option or --on-invoker-loss"
        )
    with _client() as api:
        doc = api.put_function(name, body, overwrite=True)
    if as_json:
        _print_json(doc)
    else:
        click.echo(f"ok: updated function {doc['name']} (version {doc['version']})")


@fn.command("get")
@click.argument("name")
@_json_option
@_api_command
def fn_get(name: str, as_json: bool) -> None:
    """Show function NAME: its model, limits, scaling policy and default parameters."""
    with _client() as api:
        doc = api.get_function(name)
    if as_json:
        _print_json(doc)
        return
    limits, scaling = doc["limits"], doc["scaling"]
    from sllm.core.config import format_bytes

    failed = doc.get("load_error")
    _fields(
        [
            ("name", f"{doc['namespace']}/{doc['name']}"),
            ("model", doc["model"]),
            ("task", doc["task"]),
            (
                "limits",
                f"timeout {_seconds(limits['timeout'])}, max_tokens {limits['max_tokens']}, "
                f"concurrency {limits['concurrency']}, "
                f"max_payload {format_bytes(limits['max_payload'])}",
            ),
            (
                "scaling",
                f"instances {scaling['min_instances']}-{scaling['max_instances']}, "
                f"target concurrency {scaling['target_concurrency']}, "
                f"keep-alive {_seconds(scaling['keep_alive'])}",
            ),
            ("params", json.dumps(doc["params"])),
            ("on invoker loss", str(doc.get("on_invoker_loss", "resume"))),
            ("version", str(doc["version"])),
            ("created", _when(doc["created"])),
            ("updated", _when(doc["updated"])),
            *(
                [
                    (
                        "load error",
                        f"{failed['message']} ({failed['code']}; {failed['failures']} failed "
                        f"load(s), last {_when(failed['at'])}, next try {_when(failed['retry_at'])})",
                    )
                ]
                if failed
                else []
            ),
        ]
    )


@fn.command("list")
@click.option("--limit", type=click.IntRange(1, 200), help="At most this many [30].")
@click.option("--skip", type=click.IntRange(min=0), help="Skip this many first.")
@_json_option
@_api_command
def fn_list(limit: int | None, skip: int | None, as_json: bool) -> None:
    """List functions, by name."""
    with _client() as api:
        docs = api.list_functions(limit=limit, skip=skip)
    if as_json:
        _print_json(docs)
        return
    if not docs:
        click.echo("no functions")
        return
    _table(
        ("NAME", "MODEL", "TASK", "INSTANCES", "CONCURRENCY", "VERSION", "UPDATED"),
        (
            (
                d["name"],
                d["model"],
                d["task"],
                f"{d['scaling']['min_instances']}-{d['scaling']['max_instances']}",
                str(d["limits"]["concurrency"]),
                str(d["version"]),
                _when(d["updated"]),
            )
            for d in docs
        ),
    )


@fn.command("delete")
@click.argument("name")
@_json_option
@_api_command
def fn_delete(name: str, as_json: bool) -> None:
    """Delete function NAME; its instances are unloaded."""
    with _client() as api:
        doc = api.delete_function(name)
    if as_json:
        _print_json(doc)
    else:
        click.echo(f"ok: deleted function {doc['name']}")


@fn.command("invoke")
@click.argument("name")
@_param_options
@click.option("--blocking", "-b", is_flag=True, help="Wait and print the activation.")
@click.option("--result", "-r", is_flag=True, help="Wait and print only the result.")
@click.option("--stream", "-s", is_flag=True, help="Print the generated text as it comes.")
@_json_option
@_api_command
def fn_invoke(
    name: str,
    param: tuple[tuple[str, str], ...],
    param_file: Path | None,
    blocking: bool,
    result: bool,
    stream: bool,
    as_json: bool,
) -> None:
    """Invoke function NAME with -p parameters (prompt, messages, max_tokens, ...; input to embed).

    Without a flag it returns at once with the activation id; fetch the outcome
    with `sllm activation result ID`.
    """
    if stream and (blocking or result):
        raise click.UsageError("--stream cannot be combined with --blocking or --result")
    params = _params(param, param_file)
    with _client() as api:
        if stream:
            _stream(api, name, params, as_json)
            return
        doc = api.invoke(name, params, blocking=blocking, result=result)
    if set(doc) == {"activationId"}:
        if as_json:
            _print_json(doc)
        else:
            click.echo(f"ok: invoked {name} with id {doc['activationId']}")
        if blocking or result:
            click.echo(
                "it is still running; fetch its outcome with: "
                f"sllm activation result {doc['activationId']}",
                err=True,
            )
        return
    if blocking and not result and not as_json:
        click.echo(f"ok: invoked {name} with id {doc['activationId']}")
    _print_json(doc)


def _stream(api: Client, name: str, params: dict[str, Any], as_json: bool) -> None:
    """Tokens to stdout as they come; a summary (or the error) to stderr."""
    _show_stream(api.invoke_stream(name, params), as_json)


def _show_stream(events: Iterator[dict[str, Any]], as_json: bool) -> None:
    """A stream's tokens to stdout as they come; a summary (or the error) to stderr."""
    sent = time.monotonic()
    ttft: float | None = None
    tokens = 0
    load: Mapping[str, Any] = {}
    for event in events:
        kind = event.get("event")
        if as_json:
            click.echo(json.dumps(event, ensure_ascii=False))
        if kind == "start":
            load = event.get("load") or {}
        elif kind == "token":
            tokens += 1
            if ttft is None:
                ttft = (time.monotonic() - sent) * 1000
            if not as_json:
                click.echo(event.get("text", ""), nl=False)
                sys.stdout.flush()
        elif kind == "error":
            error = event.get("error") or {}
            if not as_json and tokens:
                click.echo()
            _fail(
                str(error.get("message", "the stream failed")),
                str(error.get("code", "error")),
                event.get("activationId"),
            )
        elif kind == "done":
            if as_json:
                return
            click.echo()
            usage = event.get("usage") or {}
            count = usage.get("completion_tokens", tokens)
            how = "warm"
            if load.get("cold"):
                where = f" from {load['tier']}" if load.get("tier") else ""
                how = f"cold start{where} in {float(load.get('load_seconds') or 0):.2f} s"
            click.echo(
                f"ok: activation {event.get('activationId')}: {count} tokens "
                f"({event.get('finish_reason')}), ttft {_ms(ttft)}, {how}",
                err=True,
            )
            return
    _fail("the stream ended without a done event (only generate functions stream)", "incomplete")


# --------------------------------------------------------------------------- login
@click.command("login")
@click.argument("apihost")
@click.option(
    "--key", prompt="API key", hide_input=True, help="API key KEY_ID:SECRET (prompted if left out)."
)
def login(apihost: str, key: str) -> None:
    """Save the controller's URL and an API key for later commands.

    The key is checked against the controller at APIHOST first; the file
    ($SLLM_HOME/cli.json) is readable by its owner only.
    """
    from sllm.client import ApiError, Client, normalize_apihost, save_cli_config

    apihost = normalize_apihost(apihost)
    try:
        with Client(apihost, key) as api:
            api.list_functions(limit=1)
    except ApiError as exc:
        if exc.status != 403:  # 403: a valid admin key, which has no namespace of its own
            _fail(exc.message, exc.code)
    path = save_cli_config(apihost, key, os.environ)
    click.echo(f"ok: logged in to {apihost}; saved to {path}")
