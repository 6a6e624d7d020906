"""Knative-style HTTP triggers: CloudEvents binary and structured mode, plain JSON, host routes.

The last tests check interoperability with the CloudEvents Python SDK when it
is installed: its events parse here, and our replies parse there.
"""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from sllm.controller._cloudevents import (
    CloudEvent,
    TriggerRequest,
    error_reply,
    parse_trigger,
    reply_headers_and_body,
    route_from_host,
    unparsed_trigger,
)
from sllm.core.errors import InvalidRequest

PARAMS = {"prompt": "Hello", "max_tokens": 8}
SOURCE = "/sllm/team-a/llama"


def _binary_headers(**extra: str) -> dict[str, str]:
    return {
        "Ce-Specversion": "1.0",
        "Ce-Id": "evt-1",
        "Ce-Source": "/apis/v1/namespaces/default/pingsources/ping",
        "Ce-Type": "dev.knative.sources.ping",
        "Content-Type": "application/json",
        **extra,
    }


def _structured(**fields: Any) -> bytes:
    doc = {
        "specversion": "1.0",
        "id": "evt-2",
        "source": "https://example.com/orders",
        "type": "com.example.order.created",
        "datacontenttype": "application/json",
        "data": PARAMS,
        **fields,
    }
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


STRUCTURED = {"content-type": "application/cloudevents+json; charset=utf-8"}


# ------------------------------------------------------------------------ binary
def test_binary_mode_parses_headers_and_data() -> None:
    headers = _binary_headers(
        **{
            "ce-subject": "order%2042%20%C3%A9",  # percent-encoded, as the binding requires
            "ce-time": "2024-05-01T12:00:00Z",
            "ce-dataschema": "https://example.com/schema.json",
            "ce-traceparent": "00-abc-def-01",
            "CE-KNATIVEARRIVALTIME": "2024-05-01T12:00:01Z",
            "User-Agent": "Go-http-client/1.1",
        }
    )
    request = parse_trigger(headers, json.dumps(PARAMS).encode())
    assert request == TriggerRequest(
        "binary",
        CloudEvent(
            id="evt-1",
            source="/apis/v1/namespaces/default/pingsources/ping",
            type="dev.knative.sources.ping",
            datacontenttype="application/json",
            subject="order 42 é",
            time="2024-05-01T12:00:00Z",
            dataschema="https://example.com/schema.json",
            extensions={
                "traceparent": "00-abc-def-01",
                "knativearrivaltime": "2024-05-01T12:00:01Z",
            },
            data=PARAMS,
        ),
        PARAMS,
    )


def test_binary_mode_without_data_invokes_with_no_params() -> None:
    headers = _binary_headers()
    del headers["Content-Type"]
    request = parse_trigger(headers, b"")
    assert request.mode == "binary"
    assert request.event is not None and request.event.data is None
    assert request.payload == {}


def test_binary_reply_round_trip() -> None:
    request = parse_trigger(_binary_headers(), json.dumps(PARAMS).encode())
    result = {"text": "Hi there", "usage": {"total_tokens": 7}}
    status, headers, body = reply_headers_and_body(
        request, activation_id="a1b2", source=SOURCE, result=result, ok=True
    )
    assert status == 200
    assert headers == {
        "ce-specversion": "1.0",
        "ce-id": "a1b2",
        "ce-source": SOURCE,
        "ce-type": "dev.sllm.function.response",
        "ce-subject": "evt-1",
        "content-type": "application/json",
    }
    reply = parse_trigger(headers, body)
    assert reply.mode == "binary"
    assert reply.event == CloudEvent(
        id="a1b2",
        source=SOURCE,
        type="dev.sllm.function.response",
        datacontenttype="application/json",
        subject="evt-1",
        data=result,
    )


def test_binary_reply_percent_encodes_header_values() -> None:
    request = parse_trigger(_binary_headers(**{"ce-id": "id with%20space"}), b"{}")
    assert request.event is not None and request.event.id == "id with space"
    _, headers, body = reply_headers_and_body(
        request, activation_id="a1", source="/sllm/ns/fn", result={}, ok=True
    )
    assert headers["ce-subject"] == "id%20with%20space"
    reply = parse_trigger(headers, body)
    assert reply.event is not None and reply.event.subject == "id with space"


# ---------------------------------------------------------- errors before dispatch
NOT_FOUND = {"error": {"code": "not_found", "message": "no function 'x' in namespace 'ns'"}}


@pytest.mark.parametrize(
    ("headers", "mode"),
    [
        (_binary_headers(), "binary"),
        (STRUCTURED, "structured"),
        ({"content-type": "application/cloudevents-batch+json"}, "structured"),
        ({"content-type": "application/json"}, "plain"),
        ({}, "plain"),
    ],
    ids=["binary", "structured", "batch", "json", "no-content-type"],
)
def test_an_unparsed_trigger_keeps_its_mode(headers: dict[str, str], mode: str) -> None:
    assert unparsed_trigger(headers) == TriggerRequest(mode, None, {})


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_an_error_before_dispatch_is_a_cloudevent_in_the_request_mode(mode: str) -> None:
    headers = _binary_headers() if mode == "binary" else STRUCTURED
    body = json.dumps(PARAMS).encode() if mode == "binary" else _structured()
    request = parse_trigger(headers, body)

    status, reply_headers, reply_body = error_reply(request, NOT_FOUND, 404, SOURCE)

    assert status == 404
    reply = parse_trigger(reply_headers, reply_body)
    assert reply.mode == mode and reply.event is not None
    assert reply.event.type == "dev.sllm.function.error"
    assert reply.event.subject == ("evt-1" if mode == "binary" else "evt-2")
    assert reply.event.source == SOURCE
    assert reply.event.data == NOT_FOUND
    other = parse_trigger(*error_reply(request, NOT_FOUND, 404, SOURCE)[1:])
    assert other.event is not None and other.event.id != reply.event.id  # ids never repeat


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_an_unreadable_event_gets_an_error_event_without_subject(mode: str) -> None:
    headers = _binary_headers() if mode == "binary" else STRUCTURED

    _, reply_headers, reply_body = error_reply(unparsed_trigger(headers), NOT_FOUND, 400, SOURCE)

    reply = parse_trigger(reply_headers, reply_body)
    assert reply.mode == mode and reply.event is not None
    assert reply.event.type == "dev.sllm.function.error" and reply.event.subject is None
    assert reply.event.data == NOT_FOUND


def test_a_plain_caller_gets_a_plain_json_error() -> None:
    status, headers, body = error_reply(unparsed_trigger({}), NOT_FOUND, 404, SOURCE)

    assert (status, headers) == (404, {"content-type": "application/json"})
    assert json.loads(body) == NOT_FOUND


# -------------------------------------------------------------------- structured
def test_structured_mode_parses_the_event() -> None:
    body = _structured(subject="order-42", knativearrivaltime="2024-05-01T12:00:01Z", retries=3)
    request = parse_trigger(STRUCTURED, body)
    assert request == TriggerRequest(
        "structured",
        CloudEvent(
            id="evt-2",
            source="https://example.com/orders",
            type="com.example.order.created",
            datacontenttype="application/json",
            subject="order-42",
            extensions={"knativearrivaltime": "2024-05-01T12:00:01Z", "retries": "3"},
            data=PARAMS,
        ),
        PARAMS,
    )


def test_structured_mode_wins_over_stray_ce_headers() -> None:
    request = parse_trigger({**STRUCTURED, "ce-specversion": "0.3"}, _structured())
    assert request.mode == "structured"


def test_structured_extension_values_become_strings() -> None:
    body = _structured(flag=True, off=False, ratio=0.5, count=-2, gone=None)
    request = parse_trigger(STRUCTURED, body)
    assert request.event is not None
    assert request.event.extensions == {
        "flag": "true",
        "off": "false",
        "ratio": "0.5",
        "count": "-2",
    }


def test_structured_data_base64() -> None:
    raw = base64.b64encode(json.dumps(PARAMS).encode()).decode()
    request = parse_trigger(STRUCTURED, _structured(data=..., data_base64=raw))
    assert request.payload == PARAMS


def test_structured_reply_round_trip() -> None:
    request = parse_trigger(STRUCTURED, _structured())
    error = {"error": {"code": "function_error", "message": "oom"}}
    status, headers, body = reply_headers_and_body(
        request, activation_id="c3d4", source=SOURCE, result=error, ok=False, status=502
    )
    assert status == 502
    assert headers == {"content-type": "application/cloudevents+json"}
    assert json.loads(body) == {
        "specversion": "1.0",
        "id": "c3d4",
        "source": SOURCE,
        "type": "dev.sllm.function.error",
        "subject": "evt-2",
        "datacontenttype": "application/json",
        "data": error,
    }
    reply = parse_trigger(headers, body)
    assert reply.mode == "structured"
    assert reply.event is not None and reply.event.data == error


# ------------------------------------------------------------------------- plain
@pytest.mark.parametrize(
    ("headers", "body", "payload"),
    [
        ({"Content-Type": "application/json"}, b'{"prompt": "x"}', {"prompt": "x"}),
        ({"content-type": "application/json; charset=utf-8"}, b'{"a": 1}', {"a": 1}),
        ({"Content-Type": "application/vnd.example+json"}, b'{"a": 1}', {"a": 1}),
        ({}, b'  {"a": [1, 2]}\n', {"a": [1, 2]}),
        ({"Content-Type": "application/json"}, b"", {}),
        ({}, b"", {}),
    ],
    ids=["json", "charset", "json-suffix", "no-content-type", "empty-body", "nothing"],
)
def test_plain_json(headers: dict[str, str], body: bytes, payload: dict[str, Any]) -> None:
    assert parse_trigger(headers, body) == TriggerRequest("plain", None, payload)


def test_plain_reply_is_the_result_as_json() -> None:
    request = parse_trigger({"content-type": "application/json"}, b"{}")
    status, headers, body = reply_headers_and_body(
        request, activation_id="a1", source=SOURCE, result={"text": "hi"}, ok=True
    )
    assert (status, headers, json.loads(body)) == (
        200,
        {"content-type": "application/json"},
        {"text": "hi"},
    )


# ----------------------------------------------------------------- bad triggers
def _without(headers: dict[str, str], name: str) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k != name}


NOT_AN_OBJECT = "the event data must be a JSON object of invocation parameters"
BAD: dict[str, tuple[dict[str, str], bytes, str]] = {
    "binary-no-id": (_without(_binary_headers(), "Ce-Id"), b"{}", "'ce-id'"),
    "binary-empty-source": (_binary_headers(**{"Ce-Source": ""}), b"{}", "'ce-source'"),
    "binary-no-type": (_without(_binary_headers(), "Ce-Type"), b"{}", "'ce-type'"),
    "binary-specversion": (
        _binary_headers(**{"Ce-Specversion": "0.3"}),
        b"{}",
        "'ce-specversion' must be '1.0', got '0.3'",
    ),
    "binary-extension-underscore": (
        _binary_headers(**{"ce-my_ext": "x"}),
        b"{}",
        "'ce-my_ext': CloudEvents attribute names",
    ),
    "binary-extension-too-long": (
        _binary_headers(**{"ce-" + "a" * 21: "x"}),
        b"{}",
        "attribute names are 1-20",
    ),
    "binary-bad-json": (_binary_headers(), b"{nope", "binary-mode CloudEvent data is not valid"),
    "binary-list-data": (_binary_headers(), b"[1, 2]", NOT_AN_OBJECT),
    "binary-text-data": (_binary_headers(**{"Content-Type": "text/plain"}), b"hi", NOT_AN_OBJECT),
    "binary-bytes-data": (
        _binary_headers(**{"Content-Type": "application/octet-stream"}),
        b"\x00\x01",
        NOT_AN_OBJECT,
    ),
    "structured-no-id": (STRUCTURED, _structured(id=...), "needs a non-empty string 'id'"),
    "structured-no-source": (STRUCTURED, _structured(source=""), "'source'"),
    "structured-type-not-string": (STRUCTURED, _structured(type=5), "'type'"),
    "structured-specversion": (
        STRUCTURED,
        _structured(specversion="0.3"),
        "'specversion' must be '1.0', got '0.3'",
    ),
    "structured-no-specversion": (STRUCTURED, _structured(specversion=...), "'specversion'"),
    "structured-subject-not-string": (STRUCTURED, _structured(subject=1), "'subject' must be"),
    "structured-data-and-base64": (
        STRUCTURED,
        _structured(data_base64="e30="),
        "'data' or 'data_base64', not both",
    ),
    "structured-bad-base64": (STRUCTURED, _structured(data=..., data_base64="%%%"), "base64"),
    "structured-base64-not-string": (STRUCTURED, _structured(data=..., data_base64=3), "base64"),
    "structured-extension-object": (STRUCTURED, _structured(ext={"a": 1}), "'ext' must be"),
    "structured-extension-name": (STRUCTURED, _structured(Bad_Name="x"), "'Bad_Name'"),
    "structured-bad-json": (STRUCTURED, b"{", "structured-mode CloudEvent is not valid JSON"),
    "structured-not-object": (STRUCTURED, b"[]", "must be a JSON object"),
    "structured-string-data": (STRUCTURED, _structured(data="prompt"), NOT_AN_OBJECT),
    "batch": (
        {"Content-Type": "application/cloudevents-batch+json"},
        b"[]",
        "batched CloudEvents are not supported",
    ),
    "plain-text": ({"Content-Type": "text/plain"}, b"hello", "unsupported content type"),
    "plain-form": (
        {"content-type": "application/x-www-form-urlencoded"},
        b"a=1",
        "unsupported content type 'application/x-www-form-urlencoded'",
    ),
    "plain-bad-json": ({"Content-Type": "application/json"}, b"{", "request body is not valid"),
    "plain-not-utf": ({"Content-Type": "application/json"}, b"\xff\xfe\xfa", "not valid JSON"),
    "plain-list": ({"Content-Type": "application/json"}, b"[1]", "must be a JSON object"),
    "plain-no-type-not-json": ({}, b"prompt=hi", "request body is not valid JSON"),
}


@pytest.mark.parametrize(("headers", "body", "match"), BAD.values(), ids=BAD.keys())
def test_bad_triggers_are_400_naming_the_problem(
    headers: dict[str, str], body: bytes, match: str
) -> None:
    with pytest.raises(InvalidRequest, match=match) as info:
        parse_trigger(headers, body)
    assert info.value.status == 400


# ------------------------------------------------------------------- host routes
ROUTES: dict[str, tuple[str, tuple[str, str] | None]] = {
    "plain": ("llama.team-a.fn.example.com", ("team-a", "llama")),
    "port": ("llama.team-a.fn.example.com:8080", ("team-a", "llama")),
    "uppercase": ("LLaMA.Team-A.FN.Example.COM", ("team-a", "llama")),
    "trailing-dot": ("llama.team-a.fn.example.com.", ("team-a", "llama")),
    "trailing-dot-port": ("llama.team-a.fn.example.com.:80", ("team-a", "llama")),
    "digits": ("m7.ns0.fn.example.com", ("ns0", "m7")),
    "the-domain-itself": ("fn.example.com", None),
    "one-label": ("team-a.fn.example.com", None),
    "three-labels": ("v1.llama.team-a.fn.example.com", None),
    "other-domain": ("llama.team-a.other.com", None),
    "domain-suffix-only": ("llama.team-a.xfn.example.com", None),
    "leading-dash": ("-llama.team-a.fn.example.com", None),
    "trailing-dash": ("llama.team-a-.fn.example.com", None),
    "underscore": ("my_fn.team-a.fn.example.com", None),
    "empty-label": (".team-a.fn.example.com", None),
    "label-too-long": ("a" * 64 + ".team-a.fn.example.com", None),
    "ipv6": ("[::1]:8080", None),
    "ip": ("127.0.0.1:8080", None),
    "empty": ("", None),
}


@pytest.mark.parametrize(("host", "route"), ROUTES.values(), ids=ROUTES.keys())
def test_route_from_host(host: str, route: tuple[str, str] | None) -> None:
    assert route_from_host(host, "fn.example.com") == route


def test_route_from_host_domain_spelling() -> None:
    assert route_from_host("a.b.example.com", "Example.COM.") == ("b", "a")
    assert route_from_host("a" * 63 + ".b.example.com", "example.com") == ("b", "a" * 63)


# ------------------------------------------------------- the CloudEvents Python SDK
def _sdk() -> Any:
    return pytest.importorskip(
        "cloudevents.core.bindings.http", reason="the cloudevents SDK (>= 2.0) is not installed"
    )


def _sdk_event(**attributes: Any) -> Any:
    from cloudevents.core.v1.event import CloudEvent as SdkEvent

    base = {"id": "sdk-1", "source": "/sdk/test", "type": "com.example.sdk"}
    return SdkEvent(attributes={**base, **attributes}, data=PARAMS)


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_sdk_events_parse_here(mode: str) -> None:
    http = _sdk()
    event = _sdk_event(datacontenttype="application/json", subject="ünï code", myext="a b")
    message = http.to_binary_event(event) if mode == "binary" else http.to_structured_event(event)
    request = parse_trigger(message.headers, message.body)
    assert request.mode == mode
    assert request.payload == PARAMS
    assert request.event is not None
    assert (request.event.id, request.event.source, request.event.type) == (
        "sdk-1",
        "/sdk/test",
        "com.example.sdk",
    )
    assert request.event.subject == "ünï code"
    assert request.event.extensions == {"myext": "a b"}
    assert request.event.time is not None  # the SDK stamps one


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_our_replies_parse_in_the_sdk(mode: str) -> None:
    http = _sdk()
    event = _sdk_event(datacontenttype="application/json", id="req id é")
    message = http.to_binary_event(event) if mode == "binary" else http.to_structured_event(event)
    request = parse_trigger(message.headers, message.body)
    result = {"text": "Hi", "usage": {"total_tokens": 3}}
    _, headers, body = reply_headers_and_body(
        request, activation_id="a1b2", source=SOURCE, result=result, ok=True
    )
    reply = http.from_http_event(http.HTTPMessage(headers=headers, body=body))
    assert reply.get_id() == "a1b2"
    assert reply.get_source() == SOURCE
    assert reply.get_type() == "dev.sllm.function.response"
    assert reply.get_subject() == "req id é"
    assert reply.get_datacontenttype() == "application/json"
    assert reply.get_data() == result
