"""Reading what a request carries: its body, JSON, query arguments and path names.

Every endpoint reads through here, so one set of rules holds everywhere:
- the body is read the same way whatever its framing (Content-Length or
  chunked) and never past the controller's body limit (413); its size is the
  bytes read, so a function's `max_payload` holds for chunked bodies too;
- JSON is parsed strictly (sllm.core.strict_json): no NaN or Infinity, no
  lone surrogates, bounded nesting;
- query arguments take ASCII digits only (`str.isdigit` also accepts '²');
- path names are checked before any of them reaches the database (PostgreSQL
  refuses NUL characters in a query; a name with a newline must not exist).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from flask import g, request
from werkzeug.exceptions import RequestEntityTooLarge

from sllm.core import strict_json
from sllm.core.errors import InvalidRequest, PayloadTooLarge
from sllm.core.messages import show_value
from sllm.core.names import DNS_LABEL_RULE, is_dns_label

from ._auth import KEY_ID, KEY_ID_RULE
from ._invokers import INVOKER_NAME_RULE, is_invoker_name

MAX_PAGE = 200
READ_BLOCK = 64 * 1024
MAX_SKIP = 10**9
_DIGITS = re.compile(r"[0-9]{1,12}")
_EPOCH = re.compile(r"[0-9]{1,20}(?:\.[0-9]{0,20})?(?:[eE][-+]?[0-9]{1,3})?")
_ACTIVATION_ID = re.compile(r"[0-9a-f]{32}")


def body_bytes() -> bytes:
    """The raw body (read once, whatever the framing); 413 past the controller's limit."""
    data = g.get("body")
    if data is None:
        data = g.body = _read_body(request.max_content_length)
    assert isinstance(data, bytes)
    return data


def _read_body(limit: int | None) -> bytes:
    if request.content_length is not None:  # werkzeug reads exactly Content-Length bytes
        try:
            return request.get_data(cache=False)
        except RequestEntityTooLarge:
            raise _too_large(limit) from None
    if not request.environ.get("wsgi.input_terminated"):
        return b""  # no length and no framing the server ends: HTTP/1.0 without a body
    # Chunked: read the server's de-chunked stream ourselves. werkzeug's stream for this
    # case stops at the limit without a word, and a cut body would read as another one.
    stream = request.environ["wsgi.input"]
    bound = (limit if limit is not None else 1 << 40) + 1
    parts: list[bytes] = []
    size = 0
    while size < bound:  # every pass reads at least a byte, or ends
        part = stream.read(min(READ_BLOCK, bound - size))
        if not part:
            break
        parts.append(part)
        size += len(part)
    if limit is not None and size > limit:
        raise _too_large(limit)
    return b"".join(parts)


def _too_large(limit: int | None) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"the request body exceeds the controller's limit of {limit} bytes (SLLM_MAX_BODY)"
    )


def body_length() -> int:
    """The size of the body in bytes, as read (a chunked body has no Content-Length)."""
    return len(body_bytes())


def json_body(*, empty: Any = None) -> Any:
    """The body as JSON; `empty` for a body with nothing in it when given, else a 400."""
    data = body_bytes()
    if empty is not None and not data.strip():
        return empty
    if not request.is_json:
        raise InvalidRequest("the request body must be JSON (Content-Type: application/json)")
    return strict_json.loads(data)


def flag(name: str, default: bool) -> bool:
    """A true/false query argument (a bare `?name` is true)."""
    raw = request.args.get(name)
    if raw is None:
        return default
    value = raw.lower()
    if value in ("true", "1", "yes", ""):
        return True
    if value in ("false", "0", "no"):
        return False
    raise InvalidRequest(f"query argument {name!r} must be true or false, got {raw!r}")


def time_arg(name: str) -> float | None:
    """An epoch-seconds query argument, or None when absent."""
    raw = request.args.get(name)
    if raw is None:
        return None
    if not _EPOCH.fullmatch(raw) or not float(raw) < 1e11:
        raise InvalidRequest(f"{name!r} must be epoch seconds, got {raw!r}")
    return float(raw)


def page(args: Mapping[str, str]) -> tuple[int, int]:
    """`limit` and `skip` query arguments, validated."""
    return _int_arg(args, "limit", 30, 1, MAX_PAGE), _int_arg(args, "skip", 0, 0, MAX_SKIP)


def _int_arg(args: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    raw = args.get(name)
    if raw is None:
        return default
    if not _DIGITS.fullmatch(raw) or not lo <= int(raw) <= hi:
        raise InvalidRequest(f"{name!r} must be an integer in [{lo}, {hi}], got {raw!r}")
    return int(raw)


def check_path_names(values: Mapping[str, Any]) -> None:
    """400 for a path segment that cannot name anything (checked before any lookup)."""
    for key, value in values.items():
        if key == "ns":
            ok, what, rule = value == "_" or is_dns_label(value), "namespace", DNS_LABEL_RULE
        elif key == "name":
            ok, what, rule = is_dns_label(value), "function name", DNS_LABEL_RULE
        elif key == "invoker":
            ok, what, rule = is_invoker_name(value), "invoker name", INVOKER_NAME_RULE
        elif key == "activation_id":
            ok = bool(_ACTIVATION_ID.fullmatch(value))
            what, rule = "activation id", "32 lowercase hex digits"
        elif key == "key_id":
            ok, what, rule = bool(KEY_ID.fullmatch(value)), "key id", KEY_ID_RULE
        else:
            continue
        if not ok:
            raise InvalidRequest(f"the {what} in the path must be {rule}; got {show_value(value)}")
