"""Resume after an invoker dies: a real controller (gunicorn, SQLite and PostgreSQL) and two
invoker processes whose decode steps are slowed, so a generation is mid-way when the invoker
serving it is killed with SIGKILL. The client sees a pause, then the rest: the same text as
an uninterrupted run, through the native NDJSON stream, the official `openai` client and a
blocking invocation; a function that opts out gets invoker_lost; with no invoker left the
stream ends, bounded, in a complete output or a clear error."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from sllm.cli import main
from sllm.store import open_store, push_model
from sllm.tiny_models import build_tiny_model
from tests.support.controller import ControllerProcess, client, wait_for_invokers
from tests.support.databases import fresh_postgres_database, sqlite_database_url
from tests.support.invoker import InvokerProcess, metric_value
from tests.support.process import stop_all
from tests.support.waiting import wait_until

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.invoker, pytest.mark.slow]

STEP_S = 0.03  # every decode step on both invokers sleeps this long first
HOOK = Path(__file__).resolve().parents[1] / "support" / "slow_steps"
TOKENS = 60  # about 2 s of decoding: killed after KILL_AT tokens, it is mid-way
KILL_AT = 8
PROMPT = "tell me a long story"
GREEDY = {"temperature": 0}
SEEDED = {"temperature": 1.0, "seed": 1234, "ignore_eos": True}
INVOKERS = ("inv-a", "inv-b")


def _store(root: Path) -> str:
    """A folder store with "llama" (seed 0) with a context long enough for long stories."""
    uri = (root / "store").as_uri()
    src = build_tiny_model("llama", root / "hf-llama", seed=0)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    push_model(str(src), "llama", open_store(uri), progress=False)
    return uri


class Cluster:
    """A controller process and two slowed invoker processes registered with it."""

    def __init__(
        self,
        ctl: ControllerProcess,
        store_uri: str,
        root: Path,
        invoker_env: dict[str, str] | None = None,
    ) -> None:
        self.ctl, self.store_uri, self.root = ctl, store_uri, root
        hook = os.pathsep.join(p for p in (str(HOOK), os.environ.get("PYTHONPATH", "")) if p)
        env = {"PYTHONPATH": hook, "SLLM_TEST_STEP_DELAY": str(STEP_S), **(invoker_env or {})}
        self.invs = {
            name: InvokerProcess(
                root / name,
                store_uri,
                env=env,
                extra=(
                    "--controller",
                    ctl.url,
                    "--name",
                    name,
                    "--heartbeat-interval",
                    "0.3",
                ),
            )
            for name in INVOKERS
        }
        self.admin = ctl.admin()
        self.api = httpx.Client()
        self.key = ""

    def ensure_running(self) -> None:
        """Every invoker up and active (a test may have killed or stopped some)."""
        for proc in self.invs.values():
            if not proc.running():
                proc.start()
        wait_for_invokers(self.admin, len(self.invs))

    def serving(self, fn: str, tokens: int, timeout: float = 30.0) -> str:
        """The name of the invoker running a generation of `fn` with >= `tokens` tokens."""

        def find() -> str | None:
            for name, proc in self.invs.items():
                if not proc.running():
                    continue
                try:
                    listed = proc.client(5).get("/v1/generations").json()["generations"]
                except httpx.HTTPError:
                    continue
                for g in listed:
                    mine = g["function"] == f"r/{fn}" and g["state"] == "running"
                    if mine and g["tokens"] >= tokens:
                        return name
            return None

        found = wait_until(find, timeout, f"a generation of {fn} past {tokens} tokens")
        assert found is not None
        return found

    def down(self, name: str) -> None:
        """Stop invoker `name` and wait until the controller took it out of rotation."""
        self.invs[name].stop()

        def lost() -> bool:
            found = [i for i in self.admin.get("/api/v1/invokers").json() if i["name"] == name]
            return bool(found) and found[0]["state"] == "lost"

        wait_until(lost, 30, f"{name} out of rotation")

    def kill(self, name: str) -> float:
        """SIGKILL invoker `name` (its whole process group); the wall time of the kill."""
        at = time.time()
        self.invs[name].stop(signal.SIGKILL)
        return at

    def activation(self, activation_id: str) -> dict[str, Any]:
        assert self.api is not None
        doc: dict[str, Any] = self.api.get(
            f"/api/v1/namespaces/_/activations/{activation_id}"
        ).json()
        return doc

    def metric(self, name: str, **labels: str) -> float:
        text = httpx.get(f"{self.ctl.url}/metrics", timeout=10).text
        return metric_value(text, name, **labels)


def clusters(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    env: dict[str, str] | None = None,
    invoker_env: dict[str, str] | None = None,
) -> Iterator[Cluster]:
    """A Cluster on the database `request.param` names ("sqlite" or "postgres"), with
    namespace "r" and a key for it; stopped at the end. `env` is the controller's
    environment, `invoker_env` adds to the invokers' (the slow-step hook's settings)."""
    root = tmp_path_factory.mktemp(f"{name}-{request.param}")
    store_uri = _store(root)
    with ExitStack() as cleanup:
        if request.param == "postgres":
            admin_url = request.getfixturevalue("postgres_admin_url")
            url = cleanup.enter_context(fresh_postgres_database(admin_url))
        else:
            url = sqlite_database_url(root / "db")
        ctl = ControllerProcess(url, root, env=env)
        cleanup.callback(stop_all, [ctl])
        ctl.start()
        c = Cluster(ctl, store_uri, root, invoker_env)
        cleanup.callback(stop_all, c.invs.values())
        c.ensure_running()
        assert c.admin.put("/api/v1/namespaces/r").status_code == 201
        c.key = c.admin.post("/api/v1/namespaces/r/keys").json()["key"]
        c.api = client(ctl.url, c.key, 120)
        yield c


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    # A short stall bound: the stall test below waits for it.
    yield from clusters(request, tmp_path_factory, "resume", {"SLLM_STALL_TIMEOUT": "2"})


@pytest.fixture
def c(cluster: Cluster) -> Cluster:
    """The module's cluster with both invokers up."""
    cluster.ensure_running()
    return cluster


def _fn(c: Cluster, name: str, **body: Any) -> None:
    doc = {"model": "llama", "limits": {"max_tokens": 4000, "timeout": 60}, **body}
    r = c.api.put(f"/api/v1/namespaces/_/functions/{name}", json=doc)
    assert r.status_code == 201, r.text


def _reference(c: Cluster, fn: str, sampling: dict[str, Any]) -> dict[str, Any]:
    """The uninterrupted result of the test prompt (a blocking invocation)."""
    r = c.api.post(
        f"/api/v1/namespaces/_/functions/{fn}/invocations?blocking=true",
        json={"prompt": PROMPT, "max_tokens": TOKENS, **sampling},
    )
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    n = sampling.get("n", 1)
    assert doc["status"] == "success"
    assert doc["result"]["usage"]["completion_tokens"] == n * TOKENS
    return doc


def _stamp(line: str) -> float:
    """The epoch time of an activation log line ("2026-11-30T10:00:00.123Z message")."""
    return datetime.fromisoformat(line.split(" ", 1)[0].replace("Z", "+00:00")).timestamp()


def _check_resumed(
    c: Cluster, act: dict[str, Any], killed: str, killed_at: float, tokens_before: int
) -> dict[str, Any]:
    """One resume recorded, away from the killed invoker, detected within a second."""
    assert act["status"] == "success", act
    moves = act["moves"]
    assert len(moves) == 1, moves
    move = moves[0]
    survivor = next(n for n in INVOKERS if n != killed)
    assert (move["kind"], move["from"], move["to"]) == ("resume", killed, survivor), move
    assert move["choice"] == 0 and move["reason"] == "broken"
    assert move["tokens"] >= tokens_before
    assert move["pause_ms"] is not None and 0 < move["pause_ms"] < 30_000, move
    assert act["migrations"] == 1 and act["attempts"] == 2 and act["invoker"] == survivor
    lost = [line for line in act["logs"] if "broke the stream" in line]
    assert lost, act["logs"]
    assert _stamp(lost[0]) - killed_at < 1.0, (lost[0], killed_at)  # kill -9 seen at once
    return move


@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_native_stream_survives_kill_9_of_its_invoker(c: Cluster, sampling: dict[str, Any]) -> None:
    fn = f"native-{'greedy' if sampling is GREEDY else 'seeded'}"
    _fn(c, fn)
    reference = _reference(c, fn, sampling)
    resumed_before = c.metric("sllm_resumes_total", outcome="resumed")
    events: list[dict[str, Any]] = []
    killed, killed_at = "", 0.0
    url = f"/api/v1/namespaces/_/functions/{fn}/invocations?stream=true"
    body = {"prompt": PROMPT, "max_tokens": TOKENS, **sampling}
    started = time.monotonic()
    with c.api.stream("POST", url, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                continue
            events.append(json.loads(line))
            tokens = [e for e in events if e["event"] == "token"]
            if len(tokens) == KILL_AT and not killed:
                killed = events[0]["invoker"]
                killed_at = c.kill(killed)
    assert time.monotonic() - started < 60
    assert killed, events[-3:]
    assert events[-1]["event"] == "done", events[-3:]
    tokens = [e for e in events if e["event"] == "token"]
    assert [e["index"] for e in tokens] == list(range(1, TOKENS + 1))  # no duplicate, no gap
    assert "".join(e["text"] for e in tokens) == reference["result"]["text"]
    assert events[-1]["usage"]["completion_tokens"] == TOKENS
    assert [e["event"] for e in events].count("start") == 1
    act = c.activation(events[0]["activationId"])
    _check_resumed(c, act, killed, killed_at, KILL_AT)
    assert act["result"]["text"] == reference["result"]["text"]
    assert c.metric("sllm_resumes_total", outcome="resumed") == resumed_before + 1


def test_every_choice_of_n_resumes_and_the_stream_ends_once(c: Cluster) -> None:
    """n = 2, seeded: both choices continue (one resumed stream each, one after the
    other), each identical to its uninterrupted self; one done with the whole usage."""
    _fn(c, "two")
    sampling = {**SEEDED, "n": 2}
    reference = _reference(c, "two", sampling)["result"]
    events: list[dict[str, Any]] = []
    killed = ""
    url = "/api/v1/namespaces/_/functions/two/invocations?stream=true"
    with c.api.stream("POST", url, json={"prompt": PROMPT, "max_tokens": TOKENS, **sampling}) as r:
        for line in r.iter_lines():
            if not line:
                continue
            events.append(json.loads(line))
            if len(events) == 1 + 2 * KILL_AT and not killed:
                killed = events[0]["invoker"]
                c.kill(killed)
    assert killed and events[-1]["event"] == "done", events[-3:]
    assert [e["event"] for e in events].count("done") == 1
    for i in (0, 1):
        mine = [e for e in events if e["event"] == "token" and e["choice"] == i]
        assert [e["index"] for e in mine] == list(range(1, TOKENS + 1)), i
        assert "".join(e["text"] for e in mine) == reference["choices"][i]["text"], i
    assert reference["choices"][0]["text"] != reference["choices"][1]["text"]
    assert events[-1]["usage"]["completion_tokens"] == 2 * TOKENS
    act = c.activation(events[0]["activationId"])
    assert [m["choice"] for m in act["moves"]] == [0, 1]
    assert all(m["from"] == killed and m["to"] != killed for m in act["moves"])
    assert act["attempts"] == 3 and act["migrations"] == 2
    assert [ch["text"] for ch in act["result"]["choices"]] == [
        ch["text"] for ch in reference["choices"]
    ]


def test_openai_streaming_chat_survives_kill_9_of_its_invoker(c: Cluster) -> None:
    _fn(c, "chat")
    oai = openai.OpenAI(base_url=c.ctl.url + "/v1", api_key=c.key, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": PROMPT}]
    whole = oai.chat.completions.create(
        model="chat", messages=messages, max_tokens=TOKENS, temperature=0
    )
    assert whole.usage is not None and whole.usage.completion_tokens == TOKENS
    expected = whole.choices[0].message.content
    stream = oai.chat.completions.create(
        model="chat", messages=messages, max_tokens=TOKENS, temperature=0, stream=True
    )
    parts: list[str] = []
    killed = ""
    ends = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta.content:
                parts.append(choice.delta.content)
            if choice.finish_reason:
                ends.append(choice.finish_reason)
        if len(parts) >= KILL_AT and not killed:
            killed = c.serving("chat", KILL_AT)
            c.kill(killed)
    assert killed
    assert "".join(parts) == expected
    assert ends == ["length"]


def test_blocking_invocation_survives_kill_9_of_its_invoker(c: Cluster) -> None:
    _fn(c, "blocking")
    reference = _reference(c, "blocking", GREEDY)
    answer: dict[str, Any] = {}

    def invoke() -> None:
        r = c.api.post(
            "/api/v1/namespaces/_/functions/blocking/invocations?blocking=true",
            json={"prompt": PROMPT, "max_tokens": TOKENS, **GREEDY},
        )
        answer.update(status=r.status_code, doc=r.json())

    t = threading.Thread(target=invoke)
    t.start()
    killed = c.serving("blocking", KILL_AT)
    killed_at = c.kill(killed)
    t.join(60)
    assert not t.is_alive()
    assert answer["status"] == 200, answer
    doc = answer["doc"]
    assert doc["result"]["text"] == reference["result"]["text"]
    assert doc["result"]["usage"]["completion_tokens"] == TOKENS
    move = _check_resumed(c, c.activation(doc["activationId"]), killed, killed_at, KILL_AT)
    # The CLI shows the move.
    env = {"SLLM_APIHOST": c.ctl.url, "SLLM_API_KEY": c.key, "SLLM_HOME": str(c.root / "home")}
    shown = CliRunner().invoke(main, ["activation", "get", doc["activationId"]], env=env)
    assert shown.exit_code == 0, shown.output
    assert f"resume of choice 0 {killed} -> {move['to']} at token {move['tokens']}" in shown.output


def test_a_function_that_opts_out_gets_invoker_lost(c: Cluster) -> None:
    _fn(c, "fragile", on_invoker_loss="fail")
    events: list[dict[str, Any]] = []
    url = "/api/v1/namespaces/_/functions/fragile/invocations?stream=true"
    with c.api.stream("POST", url, json={"prompt": PROMPT, "max_tokens": TOKENS, **GREEDY}) as r:
        for line in r.iter_lines():
            if line:
                events.append(json.loads(line))
                if len(events) == 4:
                    c.kill(events[0]["invoker"])
    assert events[-1]["event"] == "error", events[-3:]
    assert events[-1]["error"]["code"] == "invoker_lost"
    assert "does not resume" in events[-1]["error"]["message"]
    act = c.activation(events[0]["activationId"])
    assert act["status"] == "platform_error" and act["moves"] == [] and act["migrations"] == 0


def test_with_no_invoker_left_it_resumes_on_the_restarted_one(c: Cluster) -> None:
    """Kill -9 while the other invoker is down: the stream waits for the first to come back
    (its restart, a cold start from its tiers) and then completes, token for token."""
    serving, other = INVOKERS
    c.down(other)
    _fn(c, "alone")
    reference = _reference(c, "alone", GREEDY)
    events: list[dict[str, Any]] = []
    url = "/api/v1/namespaces/_/functions/alone/invocations?stream=true"
    restart = threading.Thread(target=c.invs[serving].start)
    with c.api.stream("POST", url, json={"prompt": PROMPT, "max_tokens": TOKENS, **GREEDY}) as r:
        for line in r.iter_lines():
            if not line:
                continue
            events.append(json.loads(line))
            if len(events) == 1 + KILL_AT:
                assert events[0]["invoker"] == serving
                c.kill(serving)
                restart.start()
    restart.join(60)
    tokens = [e for e in events if e["event"] == "token"]
    assert events[-1]["event"] == "done", events[-3:]
    assert [e["index"] for e in tokens] == list(range(1, TOKENS + 1))
    assert "".join(e["text"] for e in tokens) == reference["result"]["text"]
    act = c.activation(events[0]["activationId"])
    assert [(m["from"], m["to"]) for m in act["moves"]] == [(serving, serving)]


def test_with_no_invoker_ever_it_ends_with_a_clear_error_in_bounded_time(c: Cluster) -> None:
    serving, other = INVOKERS
    c.down(other)
    timeout = 8.0
    _fn(c, "orphan", limits={"max_tokens": 4000, "timeout": timeout})
    events: list[dict[str, Any]] = []
    url = "/api/v1/namespaces/_/functions/orphan/invocations?stream=true"
    started = time.monotonic()
    with c.api.stream("POST", url, json={"prompt": PROMPT, "max_tokens": 150, **GREEDY}) as r:
        for line in r.iter_lines():
            if not line:
                continue
            events.append(json.loads(line))
            if len(events) == 1 + KILL_AT:
                c.kill(serving)
    took = time.monotonic() - started
    assert events[-1]["event"] == "error", events[-3:]
    assert events[-1]["error"]["code"] == "invoker_lost"
    assert "no invoker could resume it" in events[-1]["error"]["message"]
    assert took < timeout + 5, took
    tokens = [e for e in events if e["event"] == "token"]
    assert [e["index"] for e in tokens] == list(range(1, len(tokens) + 1))
    act = c.activation(events[0]["activationId"])
    assert act["status"] == "platform_error" and act["moves"] == []


def test_a_stalled_invoker_is_left_after_the_stall_bound(c: Cluster) -> None:
    """SIGSTOP: the connection stays open, nothing comes; after SLLM_STALL_TIMEOUT (2 s
    here) the generation resumes elsewhere and the stopped one's copy is never relayed."""
    _fn(c, "stall")
    reference = _reference(c, "stall", GREEDY)
    events: list[dict[str, Any]] = []
    stopped = ""
    url = "/api/v1/namespaces/_/functions/stall/invocations?stream=true"
    try:
        body = {"prompt": PROMPT, "max_tokens": TOKENS, **GREEDY}
        with c.api.stream("POST", url, json=body) as r:
            for line in r.iter_lines():
                if not line:
                    continue
                events.append(json.loads(line))
                if len(events) == 1 + KILL_AT:
                    stopped = events[0]["invoker"]
                    c.invs[stopped].send_signal(signal.SIGSTOP)
    finally:
        if stopped:
            c.invs[stopped].send_signal(signal.SIGCONT)
    tokens = [e for e in events if e["event"] == "token"]
    assert events[-1]["event"] == "done", events[-3:]
    assert [e["index"] for e in tokens] == list(range(1, TOKENS + 1))
    assert "".join(e["text"] for e in tokens) == reference["result"]["text"]
    act = c.activation(events[0]["activationId"])
    [move] = act["moves"]
    assert move["reason"] == "stalled" and move["from"] == stopped and move["to"] != stopped
    assert move["pause_ms"] >= 2000


def test_on_invoker_loss_is_validated_and_shown(c: Cluster) -> None:
    base = "/api/v1/namespaces/_/functions"
    for bad in ("retry", 1, None, ["fail"]):
        r = c.api.put(f"{base}/bad-loss", json={"model": "llama", "on_invoker_loss": bad})
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == "on_invoker_loss"
        assert "on_invoker_loss" in r.json()["error"]["message"]
    r = c.api.put(f"{base}/loss", json={"model": "llama"})
    assert r.json()["on_invoker_loss"] == "resume"
    r = c.api.put(f"{base}/loss?overwrite=true", json={"on_invoker_loss": "fail"})
    assert r.status_code == 200 and r.json()["on_invoker_loss"] == "fail"
    assert c.api.get(f"{base}/loss").json()["on_invoker_loss"] == "fail"
