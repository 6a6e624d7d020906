"""What the controller does with bad or unusual input, on SQLite and PostgreSQL: every case is a
JSON 4xx before anything reaches the database. No invoker is needed: nothing here runs."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

import sllm.controller._service as controller_service
from tests.support.controller import ControllerThread, client
from tests.support.databases import fresh_postgres_database, sqlite_database_url

MAX_BODY = 256 * 1024


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def ctl(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    """A controller without invokers, a namespace `alpha` with its key, and two functions."""
    if request.param == "postgres":
        db_cm = fresh_postgres_database(request.getfixturevalue("postgres_admin_url"))
        url = db_cm.__enter__()
    else:
        db_cm = None
        url = sqlite_database_url(tmp_path_factory.mktemp("input-db"))
    server = ControllerThread(url, max_body_bytes=MAX_BODY).start()
    try:
        admin = server.admin(timeout=30)
        assert admin.put("/api/v1/namespaces/alpha").status_code == 201
        key = admin.post("/api/v1/namespaces/alpha/keys", json={}).json()["key"]
        c = client(server.url, key, timeout=30)
        for name, body in (
            ("gen", {"model": "llama", "limits": {"timeout": 1, "max_payload": 1000}}),
            ("emb", {"model": "emb", "task": "embed", "limits": {"timeout": 1}}),
        ):
            assert c.put(f"/api/v1/namespaces/_/functions/{name}", json=body).status_code == 201
        yield {"server": server, "admin": admin, "api": c}
    finally:
        server.stop()
        if db_cm is not None:
            db_cm.__exit__(None, None, None)


def _assert_4xx(r: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    doc = r.json()
    if r.headers["content-type"].startswith("application/cloudevents+json"):
        # A structured CloudEvent caller gets its error as a CloudEvent (Knative's contract).
        assert doc["type"] == "dev.sllm.function.error", doc
        doc = doc["data"]
    else:
        assert r.headers["content-type"].startswith("application/json"), r.text
    error: dict[str, Any] = doc["error"]
    assert error["message"] and error["code"], error
    if code is not None:
        assert error["code"] == code, error
    return error


def _activations(c: httpx.Client) -> list[Any]:
    r = c.get("/api/v1/namespaces/_/activations?limit=200")
    assert r.status_code == 200, r.text
    found: list[Any] = r.json()
    return found


JSON = {"content-type": "application/json"}
NATIVE = "/api/v1/namespaces/_/functions/gen/invocations"

# (method, path, raw JSON body): a non-finite number somewhere in what each JSON endpoint reads.
NON_FINITE = [
    pytest.param(
        "POST",
        NATIVE + "?blocking=true",
        b'{"messages": [{"role": "user", "content": "hi", "x": NaN}]}',
        id="native-extra-field-in-messages",
    ),
    pytest.param("POST", NATIVE, b'{"prompt": "hi", "temperature": Infinity}', id="native-async"),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        b'{"model": "gen", "messages": [{"role": "user", "content": "hi", "n": -Infinity}]}',
        id="openai-chat",
    ),
    pytest.param(
        "POST", "/v1/completions", b'{"model": "gen", "prompt": "hi", "top_p": 1e999}', id="1e999"
    ),
    pytest.param(
        "POST", "/v1/embeddings", b'{"model": "emb", "input": "hi", "x": [NaN]}', id="embeddings"
    ),
    pytest.param("POST", "/t/_/gen", b'{"prompt": "hi", "seed": NaN}', id="trigger"),
    pytest.param(
        "POST",
        "/t/_/gen",
        b'{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": {"x": NaN}}',
        id="cloudevent-structured",
    ),
    pytest.param(
        "PUT",
        "/api/v1/namespaces/_/functions/nanfn",
        b'{"model": "llama", "params": {"temperature": NaN}}',
        id="function-definition",
    ),
    pytest.param("POST", "/api/v1/namespaces/alpha/keys", b'{"label": NaN}', id="new-key"),
    # An integer far past 64 bits: math.isfinite() and float() overflow on it.
    pytest.param(
        "POST",
        NATIVE + "?blocking=true",
        b'{"prompt": "hi", "seed": 1' + b"0" * 400 + b"}",
        id="huge-int-native",
    ),
    pytest.param(
        "POST",
        "/v1/completions",
        b'{"model": "gen", "prompt": "hi", "temperature": 1' + b"0" * 400 + b"}",
        id="huge-int-openai",
    ),
    pytest.param(
        "PUT",
        "/api/v1/namespaces/_/functions/hugefn",
        b'{"model": "llama", "limits": {"timeout": 1' + b"0" * 400 + b"}}",
        id="huge-int-function-timeout",
    ),
    pytest.param(
        "PUT",
        "/api/v1/namespaces/_/functions/hugefn",
        b'{"model": "llama", "params": {"temperature": -1' + b"0" * 400 + b"}}",
        id="huge-int-function-params",
    ),
]


@pytest.mark.parametrize(("method", "path", "body"), NON_FINITE)
def test_non_finite_numbers_are_refused_at_the_door(
    ctl: dict[str, Any], method: str, path: str, body: bytes
) -> None:
    c = ctl["admin"] if path.endswith("/keys") else ctl["api"]
    content_type = "application/cloudevents+json" if b"specversion" in body else "application/json"
    before = len(_activations(ctl["api"]))
    r = c.request(method, path, content=body, headers={"content-type": content_type})
    assert "JSON" in _assert_4xx(r, 400)["message"]
    assert len(_activations(ctl["api"])) == before  # nothing stored


def test_more_embedding_inputs_than_an_invoker_runs_are_refused_at_the_door(
    ctl: dict[str, Any],
) -> None:
    """Regression: the OpenAI boundary took 2048 inputs, which every invoker refused (256)."""
    before = len(_activations(ctl["api"]))
    r = ctl["api"].post("/v1/embeddings", json={"model": "emb", "input": ["a"] * 257})
    assert "1-256" in _assert_4xx(r, 400)["message"]
    assert len(_activations(ctl["api"])) == before  # nothing dispatched


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("a bug")


# (method, path, admin?, body, headers, the Controller method that fails): a bug anywhere.
BUGS = [
    pytest.param("GET", "/api/v1/namespaces", True, None, JSON, "list_namespaces", id="native"),
    pytest.param("GET", "/v1/models", False, None, JSON, "list_functions", id="openai"),
    pytest.param(
        "POST",
        "/t/_/gen",
        False,
        b'{"specversion": "1.0", "id": "1", "source": "s", "type": "t", "data": {}}',
        {"content-type": "application/cloudevents+json"},
        "function_for",
        id="trigger-cloudevent",
    ),
]


@pytest.mark.parametrize(("method", "path", "admin", "body", "headers", "broken"), BUGS)
def test_an_unexpected_exception_is_a_json_500(
    ctl: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    admin: bool,
    body: bytes | None,
    headers: dict[str, str],
    broken: str,
) -> None:
    monkeypatch.setattr(ctl["server"].controller, broken, _boom)
    c = ctl["admin"] if admin else ctl["api"]
    with caplog.at_level("ERROR", logger="sllm.controller"):
        r = c.request(method, path, content=body, headers=headers)
    error = _assert_4xx(r, 500, "internal")
    assert "a bug" not in error["message"]  # the details are for the log
    if path.startswith("/v1/"):
        assert error["type"] == "server_error", error
    logged = [rec.exc_info[1] for rec in caplog.records if rec.exc_info]
    assert any(str(exc) == "a bug" for exc in logged), caplog.records


def _chunks(data: bytes, size: int = 7) -> Iterator[bytes]:
    """`data` as an iterator, which httpx sends with Transfer-Encoding: chunked."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_a_chunked_body_is_read_like_a_sized_one(ctl: dict[str, Any]) -> None:
    c = ctl["api"]
    body = b'{"prompt": "the caller\'s prompt", "max_tokens": 3}'
    r = c.post(NATIVE, content=_chunks(body), headers=JSON)
    assert r.status_code == 202, r.text
    assert r.request.headers.get("transfer-encoding") == "chunked"
    stored = c.get(f"/api/v1/namespaces/_/activations/{r.json()['activationId']}").json()
    assert stored["request"] == {"prompt": "the caller's prompt", "max_tokens": 3}
    bad = c.post(NATIVE, content=_chunks(b'{"prompt": "x", "colour": 1}'), headers=JSON)
    assert "colour" in _assert_4xx(bad, 400)["message"]


@pytest.mark.parametrize(
    ("path", "make"),
    [
        pytest.param(NATIVE, lambda pad: {"prompt": pad}, id="native"),
        pytest.param("/t/_/gen", lambda pad: {"prompt": pad}, id="trigger"),
        pytest.param(
            "/v1/completions", lambda pad: {"model": "gen", "prompt": pad}, id="openai-completions"
        ),
    ],
)
@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "chunked"])
def test_max_payload_holds_whatever_the_framing(
    ctl: dict[str, Any], path: str, make: Any, chunked: bool
) -> None:
    data = json.dumps(make("x" * 2000)).encode()  # the function takes at most 1000 bytes
    content: Any = _chunks(data, 512) if chunked else data
    r = ctl["api"].post(path, content=content, headers=JSON)
    _assert_4xx(r, 413, "payload_too_large")


@pytest.mark.parametrize("chunked", [False, True], ids=["sized", "chunked"])
def test_the_controller_body_limit_holds_whatever_the_framing(
    ctl: dict[str, Any], chunked: bool
) -> None:
    data = b'{"model": "llama", "params": {"prompt": "' + b"x" * MAX_BODY + b'"}}'
    content: Any = _chunks(data, 4096) if chunked else data
    r = ctl["api"].put("/api/v1/namespaces/_/functions/big", content=content, headers=JSON)
    _assert_4xx(r, 413, "payload_too_large")


def _basic(raw: bytes) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(raw).decode()}


# (method, path, admin?, body, extra headers): input that once came back as a 500 traceback.
CRASHERS = [
    pytest.param(
        "GET",
        "/api/v1/namespaces/_/functions?limit=%C2%B2",
        False,
        None,
        {},
        id="limit-superscript-2",
    ),
    pytest.param(
        "GET",
        "/api/v1/namespaces/_/activations?skip=%C2%B2",
        False,
        None,
        {},
        id="skip-superscript-2",
    ),
    pytest.param(
        "GET",
        "/api/v1/namespaces/_/functions?skip=" + "9" * 5000,
        False,
        None,
        {},
        id="skip-5000-digits",
    ),
    pytest.param(
        "GET",
        "/api/v1/namespaces/_/activations?since=%D9%A1",
        False,
        None,
        {},
        id="since-arabic-digit",
    ),
    pytest.param("POST", NATIVE, False, b"[" * 100_000 + b"]" * 100_000, {}, id="nested-100000"),
    pytest.param(
        "POST", NATIVE, False, b'{"prompt": ' + b"[" * 200 + b"]" * 200 + b"}", {}, id="nested-200"
    ),
    pytest.param("POST", NATIVE, False, b'{"prompt": "\\ud800"}', {}, id="lone-surrogate-native"),
    pytest.param(
        "POST",
        "/v1/completions",
        False,
        b'{"model": "gen", "prompt": "a\\udfffb"}',
        {},
        id="lone-surrogate-openai",
    ),
    pytest.param(
        "POST",
        "/v1/chat/completions",
        False,
        b'{"model": "g\\u0000en", "messages": [{"role": "user", "content": "hi"}]}',
        {},
        id="nul-in-model",
    ),
    pytest.param("GET", "/api/v1/namespaces/_/functions/a%00b", False, None, {}, id="nul-function"),
    pytest.param(
        "POST",
        "/api/v1/namespaces/_/functions/a%00b/invocations",
        False,
        b"{}",
        {},
        id="nul-invoke",
    ),
    pytest.param("GET", "/api/v1/namespaces/a%00b/functions", True, None, {}, id="nul-namespace"),
    pytest.param(
        "GET", "/api/v1/namespaces/_/activations/a%00b", False, None, {}, id="nul-activation"
    ),
    pytest.param("DELETE", "/api/v1/namespaces/alpha/keys/a%00b", True, None, {}, id="nul-key-id"),
    pytest.param("GET", "/api/v1/invokers/a%00b/metrics", True, None, {}, id="nul-invoker"),
    pytest.param("POST", "/t/alpha/a%00b", False, b"{}", {}, id="nul-trigger"),
    pytest.param(
        "GET", "/api/v1/namespaces/_/activations?name=a%00b", False, None, {}, id="nul-query-name"
    ),
    pytest.param(
        "POST",
        "/api/v1/namespaces/alpha/keys",
        True,
        b'{"label": "a\\u0000b"}',
        {},
        id="nul-key-label",
    ),
    pytest.param(
        "GET", "/api/v1/namespaces", None, None, _basic(b"ab\x00c:secret"), id="nul-basic-key-id"
    ),
    pytest.param(
        "GET", "/api/v1/namespaces", None, None, _basic(b"\x00:\x00"), id="nul-basic-only"
    ),
    pytest.param("GET", "/api/v1/namespaces", None, None, _basic(b"\x00"), id="nul-basic-no-colon"),
    pytest.param(
        "GET", "/api/v1/namespaces", None, None, _basic(b"\xff\xfe:x"), id="basic-not-utf8"
    ),
]


@pytest.mark.parametrize(("method", "path", "admin", "body", "headers"), CRASHERS)
def test_bad_input_is_a_clean_4xx(
    ctl: dict[str, Any],
    method: str,
    path: str,
    admin: bool | None,
    body: bytes | None,
    headers: dict[str, str],
) -> None:
    if admin is None:  # the request's own Authorization header, no key of ours
        c = httpx.Client(base_url=ctl["server"].url, timeout=30)
    else:
        c = ctl["admin"] if admin else ctl["api"]
    r = c.request(method, path, content=body, headers={**JSON, **headers})
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    _assert_4xx(r, r.status_code)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/api/v1/namespaces/_/functions/fa%0A", {"model": "llama"}, id="function"),
        pytest.param("/api/v1/namespaces/nsd%0A", None, id="namespace"),
        pytest.param("/api/v1/namespaces/_/functions/nlmodel", {"model": "nl\n"}, id="model"),
    ],
)
def test_names_ending_in_a_newline_are_refused(
    ctl: dict[str, Any], path: str, body: dict[str, Any] | None
) -> None:
    c = ctl["admin"] if body is None else ctl["api"]
    _assert_4xx(c.put(path, json=body) if body is not None else c.put(path), 400)
    names = [n["name"] for n in ctl["admin"].get("/api/v1/namespaces").json()]
    names += [f["name"] for f in ctl["api"].get("/api/v1/namespaces/_/functions").json()]
    assert not [n for n in names if n != n.strip() or n == "nlmodel"], names


def test_a_deleted_namespace_key_never_works_in_its_namesake(
    ctl: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(controller_service, "AUTH_TTL", 3600.0)  # cached for all of the test
    admin, server = ctl["admin"], ctl["server"]
    assert admin.put("/api/v1/namespaces/reborn").status_code == 201
    old_key = admin.post("/api/v1/namespaces/reborn/keys", json={}).json()["key"]
    old = client(server.url, old_key, timeout=30)
    fn = {"model": "llama", "limits": {"timeout": 1}}
    assert old.put("/api/v1/namespaces/_/functions/f", json=fn).status_code == 201
    assert old.get("/api/v1/namespaces/_/functions/f").status_code == 200  # key (and fn) cached
    assert old.post("/api/v1/namespaces/_/functions/f/invocations", json={}).status_code == 400
    assert admin.delete("/api/v1/namespaces/reborn").status_code == 200
    assert admin.put("/api/v1/namespaces/reborn").status_code == 201
    new_key = admin.post("/api/v1/namespaces/reborn/keys", json={}).json()["key"]
    new = client(server.url, new_key, timeout=30)
    assert new.put("/api/v1/namespaces/_/functions/f", json=fn).status_code == 201
    calls = [
        ("GET", "/api/v1/namespaces/_/functions"),
        ("GET", "/api/v1/namespaces/reborn/functions/f"),
        ("GET", "/api/v1/namespaces/_/activations"),
        ("GET", "/v1/models"),
        ("POST", "/api/v1/namespaces/_/functions/f/invocations"),
        ("POST", "/t/reborn/f"),
    ]
    for method, path in calls:
        r = old.request(method, path, json={"prompt": "x"} if method == "POST" else None)
        _assert_4xx(r, 401, "unauthorized")
    assert new.get("/api/v1/namespaces/_/functions/f").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        pytest.param({"scaling": {"keep_alive": -0.5}}, id="negative-keep-alive"),
        pytest.param({"scaling": {"keep_alive": -1}}, id="keep-alive-minus-one"),
        pytest.param({"limits": {"timeout": 1e-300}}, id="timeout-1e-300"),
        pytest.param({"limits": {"timeout": 0.05}}, id="timeout-below-100ms"),
        pytest.param({"limits": {"timeout": 0}}, id="timeout-zero"),
        pytest.param({"params": {"colour": "red"}}, id="params-unknown-key"),
        pytest.param({"params": {"stream": True}}, id="params-stream"),
        pytest.param({"params": {"input": "x"}}, id="params-of-another-task"),
        pytest.param({"params": {"temperature": 5}}, id="params-temperature-out-of-range"),
        pytest.param({"params": {"top_p": "high"}}, id="params-top-p-not-a-number"),
        pytest.param(
            {"params": {"max_tokens": 100}, "limits": {"max_tokens": 50}},
            id="params-max-tokens-over-the-limit",
        ),
    ],
)
def test_bad_function_definitions_are_refused(ctl: dict[str, Any], body: dict[str, Any]) -> None:
    r = ctl["api"].put("/api/v1/namespaces/_/functions/baddef", json={"model": "llama", **body})
    _assert_4xx(r, 400, "invalid_request")


def test_an_update_cannot_leave_params_every_call_would_fail(ctl: dict[str, Any]) -> None:
    c = ctl["api"]
    path = "/api/v1/namespaces/_/functions/upd"
    good = {
        "model": "llama",
        "params": {"temperature": 0, "max_tokens": 40},
        "scaling": {"keep_alive": 0},
    }
    r = c.put(path, json=good)
    assert r.status_code == 201, r.text
    assert r.json()["scaling"]["keep_alive"] == 0.0 and r.json()["params"]["max_tokens"] == 40
    for update in ({"task": "embed"}, {"limits": {"max_tokens": 39}}):
        _assert_4xx(c.put(path + "?overwrite=true", json=update), 400, "invalid_request")
    assert c.get(path).json()["version"] == 1
    ok = c.put(path + "?overwrite=true", json={"task": "embed", "model": "emb", "params": {}})
    assert ok.status_code == 200 and ok.json()["task"] == "embed", ok.text
