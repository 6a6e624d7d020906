"""The `sllm` CLI as a client of the controller: `fn`, `activation`, `invoker list`, `login`.

A real controller (threaded, in this process) on SQLite, a real invoker process
registered by heartbeat, and a folder store with tiny published models. The
end-to-end cases run `python -m sllm` as a process; the quick ones use click's
CliRunner.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from sllm.cli import main
from sllm.client import Client
from sllm.store import open_store, push_model, read_published
from sllm.tiny_models import build_tiny_embedder, build_tiny_model
from tests.support.controller import (
    ADMIN_KEY,
    ControllerThread,
    registered_invoker,
    wait_for_invokers,
)
from tests.support.databases import sqlite_database_url

pytestmark = [pytest.mark.invoker]

_CLI_VARS = ("SLLM_APIHOST", "SLLM_API_KEY", "SLLM_HOME", "SLLM_STORE_URI")


@dataclass(frozen=True)
class Stack:
    """What the tests talk to."""

    url: str
    key: str  # an API key of namespace "cli"
    store_uri: str
    root: Path

    def env(self, **changes: str | None) -> dict[str, str]:
        """The environment of a CLI process: this stack, with `changes` (None removes)."""
        env = {k: v for k, v in os.environ.items() if k not in _CLI_VARS}
        env.update(
            SLLM_APIHOST=self.url,
            SLLM_API_KEY=self.key,
            SLLM_HOME=str(self.root / "home"),
            SLLM_STORE_URI=self.store_uri,
        )
        for name, value in changes.items():
            if value is None:
                env.pop(name, None)
            else:
                env[name] = value
        return env

    def api(self) -> Client:
        """A client with the namespace's key."""
        return Client(self.url, self.key)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Controller + one invoker + models "llama" and "emb" + namespace "cli" with a key."""
    root = tmp_path_factory.mktemp("cli")
    store_uri = (root / "store").as_uri()
    store = open_store(store_uri)
    push_model(
        str(build_tiny_model("llama", root / "hf-llama", seed=0)), "llama", store, progress=False
    )
    push_model(str(build_tiny_embedder(root / "hf-emb", seed=3)), "emb", store, progress=False)
    build_tiny_model("llama", root / "hf-local", seed=1)  # the CLI pushes this one
    (root / "db").mkdir()
    ctl = ControllerThread(sqlite_database_url(root / "db")).start()
    inv = registered_invoker(root / "inv", store_uri, ctl.url, "inv-a")
    try:
        inv.start()
        with ctl.admin() as admin:
            wait_for_invokers(admin, 1)
        with Client(ctl.url, ADMIN_KEY) as api:
            api.create_namespace("cli")
            key = api.create_key("cli")["key"]
        yield Stack(url=ctl.url, key=key, store_uri=store_uri, root=root)
    finally:
        inv.stop()
        ctl.stop()


def sllm(stack: Stack, *args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    """`python -m sllm ARGS` as a process, bounded in time."""
    return subprocess.run(
        [sys.executable, "-m", "sllm", *args],
        env=stack.env(**env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def run(stack: Stack, *args: str, **env: str | None) -> Result:
    """The CLI in this process (CliRunner), with the same environment as `sllm`."""
    wanted = stack.env(**env)
    changes = {name: wanted.get(name) for name in _CLI_VARS}  # None: unset
    return CliRunner().invoke(main, list(args), env=changes, catch_exceptions=False)


def ok(result: subprocess.CompletedProcess[str] | Result) -> str:
    """The stdout of a command that must have succeeded."""
    code = (
        result.returncode if isinstance(result, subprocess.CompletedProcess) else result.exit_code
    )
    assert code == 0, (code, result.stdout, result.stderr)
    return result.stdout


def wait_until_final(api: Client, activation_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """The activation's result document once it has an outcome."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        doc = api.activation_result(activation_id)
        if doc["status"] not in ("queued", "running"):
            return doc
        time.sleep(0.1)
    raise AssertionError(f"activation {activation_id} did not finish within {timeout}s")


def test_function_lifecycle(stack: Stack) -> None:
    created = sllm(
        stack,
        *("fn", "create", "chat", "--model", "llama", "--max-tokens", "16"),
        *("--keep-alive", "60", "-p", "temperature", "0", "--json"),
    )
    doc = json.loads(ok(created))
    assert (doc["namespace"], doc["model"], doc["task"]) == ("cli", "llama", "generate")
    assert doc["limits"]["max_tokens"] == 16 and doc["scaling"]["keep_alive"] == 60
    assert doc["params"] == {"temperature": 0}

    again = sllm(stack, "fn", "create", "chat", "--model", "llama")
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.startswith("error: function 'chat' exists") and "(conflict)" in again.stderr

    assert doc["on_invoker_loss"] == "resume"  # the default

    updated = ok(sllm(stack, "fn", "update", "chat", "--max-tokens", "32"))
    assert updated == "ok: updated function chat (version 2)\n"
    got = json.loads(ok(run(stack, "fn", "get", "chat", "--json")))
    assert got["limits"]["max_tokens"] == 32 and got["scaling"]["keep_alive"] == 60
    assert got["model"] == "llama" and got["params"] == {"temperature": 0}  # left as they were

    ok(run(stack, "fn", "update", "chat", "--on-invoker-loss", "fail"))  # alone, it is an update
    shown = ok(run(stack, "fn", "get", "chat"))
    assert re.search(r"^name +cli/chat$", shown, re.M)
    assert "max_tokens 32" in shown and "keep-alive 60s" in shown
    assert re.search(r"^on invoker loss +fail$", shown, re.M)
    bad = run(stack, "fn", "update", "chat", "--on-invoker-loss", "retry")
    assert bad.exit_code == 2 and "--on-invoker-loss" in bad.stderr

    table = ok(sllm(stack, "fn", "list")).splitlines()
    assert table[0].split()[:3] == ["NAME", "MODEL", "TASK"]
    assert any(line.split()[:3] == ["chat", "llama", "generate"] for line in table[1:])

    assert ok(sllm(stack, "fn", "delete", "chat")) == "ok: deleted function chat\n"
    gone = sllm(stack, "fn", "get", "chat")
    assert gone.returncode == 1
    assert gone.stderr == "error: no function 'chat' in namespace 'cli' (not_found)\n"


def test_create_from_a_local_folder_pushes_it_first(stack: Stack) -> None:
    folder = stack.root / "hf-local"
    out = ok(sllm(stack, "fn", "create", "local-fn", "--model", str(folder), "--max-tokens", "8"))
    published = read_published(open_store(stack.store_uri), "local-fn")
    assert f"pushed local-fn digest={published.digest}" in out
    assert out.endswith("ok: created function local-fn (model local-fn, generate)\n")
    # The invoker loads it from the same store.
    result = sllm(
        stack, "fn", "invoke", "local-fn", "-p", "prompt", "hi", "-p", "max_tokens", "3", "-r"
    )
    assert json.loads(ok(result))["usage"]["completion_tokens"] >= 1
    again = ok(run(stack, "fn", "update", "local-fn", "--model", str(folder)))
    assert again.splitlines()[0] == f"model local-fn unchanged (digest {published.digest})"


def test_non_blocking_invoke_then_activation_commands(stack: Stack) -> None:
    with stack.api() as api:
        api.put_function("later", {"model": "llama"})
        out = ok(
            sllm(stack, "fn", "invoke", "later", "-p", "prompt", "hello", "-p", "max_tokens", "4")
        )
        match = re.fullmatch(r"ok: invoked later with id ([0-9a-f]{32})\n", out)
        assert match, out
        activation_id = match.group(1)
        assert wait_until_final(api, activation_id)["status"] == "success"

    result = json.loads(ok(sllm(stack, "activation", "result", activation_id)))
    assert set(result) >= {"text", "finish_reason", "usage"}
    doc = json.loads(ok(sllm(stack, "activation", "get", activation_id, "--json")))
    assert doc["status"] == "success" and doc["request"]["prompt"] == "hello"
    assert doc["result"] == result and doc["invoker"] == "inv-a"
    shown = ok(run(stack, "activation", "get", activation_id))
    assert re.search(r"^status +success$", shown, re.M) and "result:" in shown

    logs = ok(sllm(stack, "activation", "logs", activation_id)).splitlines()
    assert any(line.endswith(" queued") for line in logs) and logs[-1].endswith(" success")

    table = ok(sllm(stack, "activation", "list", "later")).splitlines()
    assert table[0].split()[:3] == ["CREATED", "ACTIVATION", "ID"]
    assert activation_id in table[1] and "success" in table[1]
    listed = json.loads(ok(run(stack, "activation", "list", "--status", "success", "--json")))
    assert activation_id in [a["activationId"] for a in listed]


def test_blocking_result_and_stream_print_the_same_text(stack: Stack) -> None:
    with stack.api() as api:
        api.put_function("greedy", {"model": "llama"})
    params = ("-p", "prompt", "tell me a story", "-p", "max_tokens", "6", "-p", "temperature", "0")

    blocking = ok(sllm(stack, "fn", "invoke", "greedy", *params, "--blocking"))
    first, rest = blocking.split("\n", 1)
    activation = json.loads(rest)
    assert first == f"ok: invoked greedy with id {activation['activationId']}"
    assert activation["status"] == "success" and activation["tokens_out"] >= 1

    result = json.loads(ok(sllm(stack, "fn", "invoke", "greedy", *params, "--result")))
    assert result["text"] == activation["result"]["text"]  # greedy: the same text

    streamed = sllm(stack, "fn", "invoke", "greedy", *params, "--stream")
    assert ok(streamed) == result["text"] + "\n"
    summary = re.fullmatch(
        r"ok: activation ([0-9a-f]{32}): (\d+) tokens \(\w+\), ttft \d+ ms, warm\n", streamed.stderr
    )
    assert summary, streamed.stderr
    assert int(summary.group(2)) == result["usage"]["completion_tokens"]

    events = [
        json.loads(line)
        for line in ok(run(stack, "fn", "invoke", "greedy", *params, "-s", "--json")).splitlines()
    ]
    assert events[0]["event"] == "start" and events[-1]["event"] == "done"
    assert "".join(e["text"] for e in events if e["event"] == "token") == result["text"]


def test_embed_function(stack: Stack, tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text(json.dumps({"input": ["a cat", "a dog"]}))
    ok(run(stack, "fn", "create", "embedder", "-m", "emb", "--task", "embed"))
    result = json.loads(
        ok(run(stack, "fn", "invoke", "embedder", "--param-file", str(params), "-r"))
    )
    assert len(result["data"]) == 2
    one = json.loads(
        ok(
            run(
                stack,
                "fn",
                "invoke",
                "embedder",
                "--param-file",
                str(params),
                "-p",
                "input",
                "solo",
                "-r",
            )
        )
    )
    assert len(one["data"]) == 1  # -p overrides the file


def test_bad_input_is_a_clear_error(stack: Stack, tmp_path: Path) -> None:
    missing = sllm(stack, "fn", "invoke", "nope", "-p", "prompt", "x", "-r")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == "error: no function 'nope' in namespace 'cli' (not_found)\n"

    with stack.api() as api:
        api.put_function("strict", {"model": "llama", "limits": {"max_tokens": 8}})
    # A -p value that is not JSON is a string; one that is, is JSON (max_tokens 2, an int).
    lenient = run(
        stack,
        "fn",
        "invoke",
        "strict",
        "-p",
        "prompt",
        "{oops",
        "-p",
        "max_tokens",
        "2",
        "-b",
        "--json",
    )
    activation = json.loads(ok(lenient))
    assert activation["request"]["prompt"] == "{oops" and activation["request"]["max_tokens"] == 2

    unknown = run(stack, "fn", "invoke", "strict", "-p", "prompt", "x", "-p", "colour", "red", "-b")
    assert unknown.exit_code == 1 and "unknown parameter(s) ['colour']" in unknown.stderr
    assert unknown.stderr.rstrip().endswith("(invalid_request)")

    too_many = run(
        stack, "fn", "invoke", "strict", "-p", "prompt", "x", "-p", "max_tokens", "9", "-s"
    )
    assert too_many.exit_code == 1 and "(invalid_request)" in too_many.stderr

    both = run(stack, "fn", "invoke", "strict", "-s", "-r")
    assert both.exit_code == 2 and "--stream cannot be combined" in both.stderr
    (tmp_path / "list.json").write_text("[1, 2]")
    bad_file = run(stack, "fn", "invoke", "strict", "--param-file", str(tmp_path / "list.json"))
    assert bad_file.exit_code == 2 and "must hold a JSON object" in bad_file.stderr
    not_a_folder = run(stack, "fn", "update", "strict", "-m", "llama", "--push-as", "x")
    assert not_a_folder.exit_code == 2 and "'llama' is not a path" in not_a_folder.stderr
    nothing = run(stack, "fn", "update", "strict")
    assert nothing.exit_code == 2 and "nothing to update" in nothing.stderr
    bad_size = run(stack, "fn", "update", "strict", "--max-payload", "lots")
    assert bad_size.exit_code == 2 and "--max-payload" in bad_size.stderr


def test_missing_or_broken_config_says_how_to_fix_it(stack: Stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    bare = run(stack, "fn", "list", SLLM_APIHOST=None, SLLM_API_KEY=None, SLLM_HOME=str(home))
    assert bare.exit_code == 1
    assert "no controller URL and API key configured" in bare.stderr
    assert "sllm login" in bare.stderr and "sllm server start" in bare.stderr

    no_key = run(stack, "fn", "list", SLLM_API_KEY=None, SLLM_HOME=str(home))
    assert no_key.exit_code == 1 and "no API key configured" in no_key.stderr

    home.mkdir()
    (home / "cli.json").write_text("{not json")
    broken = run(stack, "fn", "list", SLLM_APIHOST=None, SLLM_API_KEY=None, SLLM_HOME=str(home))
    assert broken.exit_code == 1 and str(home / "cli.json") in broken.stderr

    unreachable = run(stack, "fn", "list", "--apihost", "http://127.0.0.1:9")
    assert unreachable.exit_code == 1 and "(unreachable)" in unreachable.stderr


def test_login_saves_a_private_config_used_by_later_commands(stack: Stack, tmp_path: Path) -> None:
    home = tmp_path / "home"
    host = stack.url.removeprefix("http://")  # a bare host:port gets http://
    wrong = run(stack, "login", host, "--key", "nobody:nothing", SLLM_HOME=str(home))
    assert wrong.exit_code == 1 and "(unauthorized)" in wrong.stderr
    assert not (home / "cli.json").exists()

    out = ok(run(stack, "login", host, "--key", stack.key, SLLM_HOME=str(home)))
    path = home / "cli.json"
    assert out == f"ok: logged in to {stack.url}; saved to {path}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text()) == {"apihost": stack.url, "api_key": stack.key}

    listed = sllm(
        stack, "fn", "list", "--json", SLLM_APIHOST=None, SLLM_API_KEY=None, SLLM_HOME=str(home)
    )
    assert isinstance(json.loads(ok(listed)), list)
    # The environment beats the file, and options beat the environment.
    env_wins = run(stack, "fn", "list", SLLM_API_KEY="nobody:nothing", SLLM_HOME=str(home))
    assert env_wins.exit_code == 1 and "(unauthorized)" in env_wins.stderr
    flag_wins = run(stack, "fn", "list", "--key", stack.key, SLLM_API_KEY="nobody:nothing")
    ok(flag_wins)


def test_invoker_list_needs_an_admin_key(stack: Stack) -> None:
    table = ok(run(stack, "invoker", "list", "--key", ADMIN_KEY)).splitlines()
    assert table[0].split()[:2] == ["NAME", "STATE"]
    assert table[1].split()[:2] == ["inv-a", "active"]
    invokers = json.loads(ok(run(stack, "invoker", "list", "--key", ADMIN_KEY, "--json")))
    assert [i["name"] for i in invokers] == ["inv-a"]

    refused = run(stack, "invoker", "list")
    assert (
        refused.exit_code == 1 and refused.stderr == "error: this needs an admin key (forbidden)\n"
    )
    # An admin key names the namespace it acts in.
    ok(run(stack, "fn", "list", "--key", ADMIN_KEY, "--namespace", "cli"))
    own = run(stack, "fn", "list", "--key", ADMIN_KEY)
    assert own.exit_code == 1 and "(forbidden)" in own.stderr


def test_a_failed_invocation_exits_1_naming_its_activation(stack: Stack) -> None:
    with stack.api() as api:
        api.put_function("ghost", {"model": "never-published"})
    for flag in ("--stream", "--blocking"):  # an error answer either way (before any token)
        failed = run(stack, "fn", "invoke", "ghost", "-p", "prompt", "x", flag)
        assert failed.exit_code == 1 and failed.stdout == ""
        message, activation = failed.stderr.splitlines()
        assert message.startswith("error: model 'never-published' is not published")
        assert message.endswith("(not_found)")
        activation_id = activation.removeprefix("activation: ")
        shown = ok(run(stack, "activation", "get", activation_id))
        assert "error: model 'never-published' is not published" in shown
        result = run(stack, "activation", "result", activation_id)
        assert result.exit_code == 1 and result.stderr.startswith(message)


def test_connection_options_work_before_the_subcommand_too(stack: Stack) -> None:
    unset: dict[str, str | None] = {"SLLM_APIHOST": None, "SLLM_API_KEY": None}
    before = run(stack, "--apihost", stack.url, "--key", stack.key, "fn", "list", "--json", **unset)
    assert isinstance(json.loads(ok(before)), list)

    # Given on both sides, the one after the subcommand wins.
    both = run(
        stack,
        *("--apihost", stack.url, "--key", "nobody:nothing"),
        *("fn", "list", "--key", stack.key, "--json"),
        **unset,
    )
    assert isinstance(json.loads(ok(both)), list)
    wrong = run(stack, "--key", "nobody:nothing", "fn", "list", SLLM_API_KEY=None)
    assert wrong.exit_code == 1 and "(unauthorized)" in wrong.stderr


@pytest.mark.parametrize(
    ("value", "kind"), [("42", "number"), ("true", "boolean"), ("[1]", "array")], ids=str
)
def test_a_p_value_json_made_a_non_string_gets_a_hint(stack: Stack, value: str, kind: str) -> None:
    with stack.api() as api:
        api.put_function("hinted", {"model": "llama"}, overwrite=True)

    failed = run(stack, "fn", "invoke", "hinted", "-p", "prompt", value, "-r")

    assert failed.exit_code == 1
    assert "'prompt'" in failed.stderr and "(invalid_request)" in failed.stderr
    assert (
        f"hint: -p values are parsed as JSON, so -p prompt {value} sent a {kind}; "
        f"to send the text, quote it as a JSON string: -p prompt '\"{value}\"'"
    ) in failed.stderr


def test_no_hint_when_the_error_is_about_another_parameter(stack: Stack) -> None:
    with stack.api() as api:
        api.put_function("hinted", {"model": "llama"}, overwrite=True)

    failed = run(stack, "fn", "invoke", "hinted", "-p", "max_tokens", "2", "-r")

    assert failed.exit_code == 1 and "'prompt'" in failed.stderr
    assert "hint:" not in failed.stderr


def test_fn_create_of_an_unpublished_model_fails_naming_the_store(
    stack: Stack, tmp_path: Path
) -> None:
    (tmp_path / "db").mkdir()
    ctl = ControllerThread(sqlite_database_url(tmp_path / "db"), store_uri=stack.store_uri).start()
    try:
        with Client(ctl.url, ADMIN_KEY) as admin:
            admin.create_namespace("cli")
            key = admin.create_key("cli")["key"]
        env: dict[str, str | None] = {"SLLM_APIHOST": ctl.url, "SLLM_API_KEY": key}

        missing = run(stack, "fn", "create", "f", "--model", "nope", **env)
        assert missing.exit_code == 1
        assert missing.stderr == (
            f"error: model 'nope' is not published in {stack.store_uri}; "
            "publish it first with `sllm model push` (not_found)\n"
        )
        with Client(ctl.url, key) as api:
            assert [f["name"] for f in api.list_functions()] == []
            ok(run(stack, "fn", "create", "f", "--model", "llama", **env))
            update = run(stack, "fn", "update", "f", "--model", "nope", **env)
            assert update.exit_code == 1 and "(not_found)" in update.stderr
            assert api.get_function("f")["model"] == "llama"
    finally:
        ctl.stop()
