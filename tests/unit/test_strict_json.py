"""The one JSON parser of every controller endpoint: what it refuses, and that it refuses
it as a 400 naming the problem (never a RecursionError or a value that fails later)."""

from __future__ import annotations

from typing import Any

import pytest

from sllm.core.errors import InvalidRequest
from sllm.core.strict_json import MAX_DEPTH, loads

REFUSED = {
    "nan": (b'{"a": NaN}', "NaN is not a JSON number"),
    "infinity": (b'{"a": [Infinity]}', "Infinity is not a JSON number"),
    "minus-infinity": (b"-Infinity", "-Infinity is not a JSON number"),
    "nan-deep-in-messages": (
        b'{"messages": [{"role": "user", "content": "x", "extra": NaN}]}',
        "NaN",
    ),
    "float-overflow": (b"[1e999]", "out of the range of a double"),
    "nested-100000": (b"[" * 100_000 + b"]" * 100_000, f"deeper than {MAX_DEPTH}"),
    "nested-one-too-deep": (b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), "deeper than"),
    "nested-objects": (b'{"a": ' * 200 + b"1" + b"}" * 200, "deeper than"),
    "lone-high-surrogate": (b'{"prompt": "\\ud800"}', "lone UTF-16 surrogate"),
    "lone-low-surrogate-in-key": (b'{"\\uDC00": 1}', "lone UTF-16 surrogate"),
    "reversed-pair": (b'["\\udc00\\ud800"]', "lone UTF-16 surrogate"),
    "surrogate-as-utf8-bytes": (b'"\xed\xa0\x80"', "not UTF-8"),
    "not-utf8": (b'"\xff"', "not UTF-8"),
    "huge-integer": (b"1" * 5000, "not valid JSON"),
    "integer-of-400-digits": (b'{"seed": 1' + b"0" * 400 + b"}", "out of the range of a 64-bit"),
    "integer-2-to-the-63": (str(2**63).encode(), "out of the range of a 64-bit"),
    "integer-below-minus-2-to-the-63": (str(-(2**63) - 1).encode(), "64-bit"),
    "truncated": (b'{"a": ', "not valid JSON"),
}


@pytest.mark.parametrize(("data", "match"), REFUSED.values(), ids=REFUSED.keys())
def test_refused_as_a_400_naming_the_problem(data: bytes, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match) as info:
        loads(data)
    assert info.value.status == 400


ACCEPTED: dict[str, tuple[bytes, Any]] = {
    "object": (b'{"a": 1.5, "b": [1, 2, {"c": null}]}', {"a": 1.5, "b": [1, 2, {"c": None}]}),
    "surrogate-pair": (b'["\\ud83d\\ude00"]', ["\U0001f600"]),
    "escaped-backslash-u": (b'["\\\\ud800"]', ["\\ud800"]),  # text, not an escape
    "nested-to-the-limit": (b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, None),
    "largest-double": (b"1.7976931348623157e308", 1.7976931348623157e308),
    "largest-int64": (str(2**63 - 1).encode(), 2**63 - 1),
    "smallest-int64": (str(-(2**63)).encode(), -(2**63)),
    "int64-with-leading-zeros-in-the-exponent": (b"[-0, 0, 10]", [0, 0, 10]),
    "many-brackets-in-strings": (b'["' + b"[" * 1000 + b'"]', ["[" * 1000]),
}


@pytest.mark.parametrize(("data", "expected"), ACCEPTED.values(), ids=ACCEPTED.keys())
def test_accepted(data: bytes, expected: Any) -> None:
    doc = loads(data)
    if expected is not None:
        assert doc == expected
    else:
        depth = 0
        while isinstance(doc, list) and doc:
            doc, depth = doc[0], depth + 1
        assert depth == MAX_DEPTH - 1


def test_the_error_names_what_was_read() -> None:
    with pytest.raises(InvalidRequest, match=r"^the CloudEvent data is not valid JSON"):
        loads(b"{", "the CloudEvent data")
