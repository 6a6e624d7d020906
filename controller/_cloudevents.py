"""Knative-style triggers: CloudEvents v1.0 over HTTP (binary and structured mode) and plain JSON.

    parse_trigger(headers, body)             -> TriggerRequest (mode, event, payload)
    unparsed_trigger(headers)                -> TriggerRequest: the mode of one that failed to parse
    reply_headers_and_body(request, ...)     -> (status, headers, body), in the request's mode
    error_reply(request, error, status, src) -> (status, headers, body) of an error before dispatch
    route_from_host(host, domain)            -> (namespace, function) of `{fn}.{ns}.{domain}`

The mode follows the HTTP protocol binding: a `application/cloudevents+json`
body is a structured event, a `ce-specversion` header marks a binary event
(attributes in `ce-*` headers, data in the body), anything else is a plain
JSON invocation. Whatever the mode, the invocation parameters are one JSON
object: the body, or the event's data. A CloudEvents caller gets every answer as a
CloudEvent, errors found before dispatch (a bad event, an unknown function, a bad
key) as much as a function's failure.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from sllm.core import strict_json
from sllm.core.errors import InvalidRequest
from sllm.core.names import is_dns_label

SPECVERSION = "1.0"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
RESPONSE_TYPE = "dev.sllm.function.response"
ERROR_TYPE = "dev.sllm.function.error"
_REQUIRED = ("id", "source", "type")
_OPTIONAL = ("subject", "time", "dataschema", "datacontenttype")
_CONTEXT = {"specversion", *_REQUIRED, *_OPTIONAL}
_EXTENSION_NAME = re.compile(r"[a-z0-9]{1,20}")
# Header values keep printable ASCII as is, except space, '"' and '%' (binding §3.1.3.2).
_HEADER_SAFE = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '"%')


@dataclass(frozen=True)
class CloudEvent:
    """A CloudEvent's context attributes (extensions as strings) and its decoded data."""

    id: str
    source: str
    type: str
    specversion: str = SPECVERSION
    datacontenttype: str | None = None
    subject: str | None = None
    time: str | None = None
    dataschema: str | None = None
    extensions: dict[str, str] = field(default_factory=dict)
    data: Any = None  # parsed JSON for a JSON content type, str for text/*, else bytes


@dataclass(frozen=True)
class TriggerRequest:
    """An HTTP trigger: its mode ("binary" | "structured" | "plain"), event and parameters."""

    mode: str
    event: CloudEvent | None
    payload: dict[str, Any]


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _json(raw: bytes | str, what: str) -> Any:
    return strict_json.loads(raw, what)


def _decode_data(raw: bytes, content_type: str | None, what: str) -> Any:
    """Event data by its content type; an absent type means JSON, as Knative sends it."""
    if not raw:
        return None
    media_type = _media_type(content_type)
    if not media_type or _is_json(media_type):
        return _json(raw, what)
    if media_type.startswith("text/"):
        return raw.decode("utf-8", errors="replace")
    return raw


def _payload(data: Any) -> dict[str, Any]:
    """An event's data as invocation parameters; an event without data invokes with none."""
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InvalidRequest("the event data must be a JSON object of invocation parameters")
    return data


def _mode(lower: Mapping[str, str]) -> str:
    """The binding's mode of a request with lower-case header names ("batch" is structured's
    batched form)."""
    media_type = _media_type(lower.get("content-type"))
    if media_type == STRUCTURED:
        return "structured"
    if media_type == BATCH:
        return "batch"
    return "binary" if "ce-specversion" in lower else "plain"


def unparsed_trigger(headers: Mapping[str, str]) -> TriggerRequest:
    """What is known of a trigger that was not (or could not be) parsed: its mode.

    A batch is answered as one structured event: there is no event to answer per item.
    """
    mode = _mode({name.lower(): value for name, value in headers.items()})
    return TriggerRequest("structured" if mode == "batch" else mode, None, {})


def parse_trigger(headers: Mapping[str, str], body: bytes) -> TriggerRequest:
    """Read an HTTP trigger in whichever mode it arrives; a bad one is an InvalidRequest."""
    lower = {name.lower(): value for name, value in headers.items()}
    mode = _mode(lower)
    if mode == "structured":
        event = _structured(body)
        return TriggerRequest("structured", event, _payload(event.data))
    if mode == "batch":
        raise InvalidRequest("batched CloudEvents are not supported; send one event per request")
    if mode == "binary":
        event = _binary(lower, body)
        return TriggerRequest("binary", event, _payload(event.data))
    media_type = _media_type(lower.get("content-type"))
    if media_type and not _is_json(media_type):
        raise InvalidRequest(
            f"unsupported content type {media_type!r}: send application/json, "
            "or a CloudEvent in binary or structured mode"
        )
    if not body.strip():
        return TriggerRequest("plain", None, {})
    payload = _json(body, "the request body")
    if not isinstance(payload, dict):
        raise InvalidRequest("the request body must be a JSON object of invocation parameters")
    return TriggerRequest("plain", None, payload)


def _binary(headers: Mapping[str, str], body: bytes) -> CloudEvent:
    """Binary mode: attributes in percent-encoded `ce-*` headers, `Content-Type` for the data."""
    attrs = {name[3:]: unquote(value) for name, value in headers.items() if name[:3] == "ce-"}
    if attrs["specversion"] != SPECVERSION:
        raise InvalidRequest(
            f"'ce-specversion' must be {SPECVERSION!r}, got {attrs['specversion']!r}"
        )
    for name in _REQUIRED:
        if not attrs.get(name):
            raise InvalidRequest(f"a binary-mode CloudEvent needs a non-empty 'ce-{name}' header")
    extensions = {}
    for name, value in attrs.items():
        if name in _CONTEXT:  # ce-datacontenttype is not a binary-mode header: Content-Type is
            continue
        if not _EXTENSION_NAME.fullmatch(name):
            raise InvalidRequest(
                f"'ce-{name}': CloudEvents attribute names are 1-20 lowercase letters or digits"
            )
        extensions[name] = value
    content_type = headers.get("content-type")
    return CloudEvent(
        id=attrs["id"],
        source=attrs["source"],
        type=attrs["type"],
        datacontenttype=content_type,
        subject=attrs.get("subject"),
        time=attrs.get("time"),
        dataschema=attrs.get("dataschema"),
        extensions=extensions,
        data=_decode_data(body, content_type, "the binary-mode CloudEvent data"),
    )


def _structured(body: bytes) -> CloudEvent:
    """Structured mode: the whole event as one JSON object (the JSON event format)."""
    doc = _json(body, "the structured-mode CloudEvent")
    if not isinstance(doc, dict):
        raise InvalidRequest("a structured-mode CloudEvent must be a JSON object")
    if doc.get("specversion") != SPECVERSION:
        raise InvalidRequest(
            f"'specversion' must be {SPECVERSION!r}, got {doc.get('specversion')!r}"
        )
    for name in (*_REQUIRED, *_OPTIONAL):
        value = doc.get(name)
        if name in _REQUIRED and not (isinstance(value, str) and value):
            raise InvalidRequest(f"a CloudEvent needs a non-empty string {name!r}, got {value!r}")
        if value is not None and not isinstance(value, str):
            raise InvalidRequest(f"CloudEvent attribute {name!r} must be a string, got {value!r}")
    extensions = {}
    for name, value in doc.items():
        if name in _CONTEXT or name in ("data", "data_base64") or value is None:
            continue
        if not _EXTENSION_NAME.fullmatch(name):
            raise InvalidRequest(
                f"{name!r}: CloudEvents attribute names are 1-20 lowercase letters or digits"
            )
        if not isinstance(value, (str, int, float)):  # bool is an int
            raise InvalidRequest(
                f"CloudEvent extension {name!r} must be a string, number or boolean, got {value!r}"
            )
        extensions[name] = json.dumps(value) if isinstance(value, bool) else str(value)
    content_type = doc.get("datacontenttype")
    if doc.get("data") is not None and doc.get("data_base64") is not None:
        raise InvalidRequest("a CloudEvent carries 'data' or 'data_base64', not both")
    data = doc.get("data")
    if doc.get("data_base64") is not None:
        data = _decode_data(_base64(doc["data_base64"]), content_type, "the CloudEvent data")
    return CloudEvent(
        id=doc["id"],
        source=doc["source"],
        type=doc["type"],
        datacontenttype=content_type,
        subject=doc.get("subject"),
        time=doc.get("time"),
        dataschema=doc.get("dataschema"),
        extensions=extensions,
        data=data,
    )


def _base64(value: Any) -> bytes:
    try:
        if not isinstance(value, str):
            raise ValueError(f"got {type(value).__name__}")
        return base64.b64decode(value, validate=True)
    except (ValueError, binascii.Error) as exc:
        raise InvalidRequest(f"'data_base64' must be a base64 string: {exc}") from exc


def reply_headers_and_body(
    request: TriggerRequest,
    *,
    activation_id: str,
    source: str,
    result: Any,
    ok: bool,
    status: int = 200,
) -> tuple[int, dict[str, str], bytes]:
    """The HTTP reply to a trigger: plain JSON, or a CloudEvent in the request's mode.

    The reply event's id is the activation's, its subject the request event's
    id (when it could be read), its type says whether the function succeeded,
    and its data is `result`.
    """
    data = json.dumps(result).encode()
    if request.mode == "plain":
        return status, {"content-type": "application/json"}, data
    attrs = {
        "specversion": SPECVERSION,
        "id": activation_id,
        "source": source,
        "type": RESPONSE_TYPE if ok else ERROR_TYPE,
    }
    if request.event is not None:
        attrs["subject"] = request.event.id
    if request.mode == "structured":
        doc = {**attrs, "datacontenttype": "application/json", "data": result}
        return status, {"content-type": STRUCTURED}, json.dumps(doc).encode()
    headers = {f"ce-{name}": quote(value, safe=_HEADER_SAFE) for name, value in attrs.items()}
    return status, {**headers, "content-type": "application/json"}, data


def error_reply(
    request: TriggerRequest, error: Mapping[str, Any], status: int, source: str
) -> tuple[int, dict[str, str], bytes]:
    """The reply to a trigger that failed before it ran: `status` and the `{"error": ...}`
    body, in the request's mode (an error event with a fresh id: no activation exists)."""
    return reply_headers_and_body(
        request,
        activation_id=uuid.uuid4().hex,
        source=source,
        result=error,
        ok=False,
        status=status,
    )


def route_from_host(host: str, domain: str) -> tuple[str, str] | None:
    """`(namespace, function)` of a Knative-style `Host: {fn}.{ns}.{domain}`, else None.

    The port and a trailing dot are ignored, case too; both labels must be DNS labels.
    """
    name = host.strip().lower()
    if name.startswith("["):  # an IPv6 literal is never a route
        return None
    name = name.rsplit(":", 1)[0].rstrip(".")
    suffix = "." + domain.strip().lower().rstrip(".")
    if not name.endswith(suffix):
        return None
    labels = name[: -len(suffix)].split(".")
    if len(labels) != 2 or not all(is_dns_label(label) for label in labels):
        return None
    function, namespace = labels
    return namespace, function
