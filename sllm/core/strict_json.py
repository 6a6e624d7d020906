"""Strict JSON for what clients send: UTF-8, finite numbers, bounded nesting, whole characters.

Python's `json` reads NaN and Infinity (and 1e999 as inf), integers of
thousands of digits, lone surrogates ("\\ud800"), and nesting as deep as the
interpreter's stack allows. Each is accepted at the door and fails later, far
from the request: PostgreSQL refuses NaN in a JSON column when the activation
is written, 10**400 overflows `float()` and `math.isfinite()`, a lone surrogate
cannot be encoded for a tokenizer or a database, deep nesting overflows a
recursive encoder. `loads` refuses all of them as an InvalidRequest (400);
integers outside the 64-bit range are refused too.
"""

from __future__ import annotations

import json
import math
from typing import Any, NoReturn

from .errors import InvalidRequest

MAX_DEPTH = 128  # arrays and objects inside each other (serde_json's default limit)
MIN_INT, MAX_INT = -(2**63), 2**63 - 1  # a 64-bit integer, as serde_json and PostgreSQL take


def loads(data: bytes | str, what: str = "the request body") -> Any:
    """The JSON document in `data`, or InvalidRequest saying what is wrong with it."""
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"{what} is not valid JSON: not UTF-8 text ({exc})") from None
    else:
        text = data
    try:
        doc = json.loads(text, parse_constant=_non_finite, parse_float=_finite, parse_int=_bounded)
    except RecursionError:
        raise InvalidRequest(f"{what} nests arrays and objects deeper than {MAX_DEPTH}") from None
    except ValueError as exc:  # JSONDecodeError, a non-finite number, an int past 64 bits
        raise InvalidRequest(f"{what} is not valid JSON: {exc}") from None
    # Cheap tests on the text spare most documents the walk: depth needs as many
    # brackets, a lone surrogate a \\uD800-\\uDFFF escape (UTF-8 text cannot hold one).
    deep = text.count("[") + text.count("{") > MAX_DEPTH
    surrogates = "\\ud" in text.lower()
    if deep or surrogates:
        _walk(doc, what, surrogates)
    return doc


def _non_finite(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number (only finite numbers are)")


def _finite(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):
        raise ValueError(f"{literal} is out of the range of a double")
    return value


def _bounded(literal: str) -> int:
    # A long literal is refused before int() spends time on its digits.
    value = int(literal) if len(literal) <= 20 else None
    if value is None or not MIN_INT <= value <= MAX_INT:
        shown = literal if len(literal) <= 24 else f"{literal[:20]}... ({len(literal)} digits)"
        raise ValueError(f"the integer {shown} is out of the range of a 64-bit integer")
    return value


def _walk(doc: Any, what: str, surrogates: bool) -> None:
    """Check nesting depth and (when `surrogates`) every string; iterative, so any depth is safe."""
    kinds = (dict, list, str) if surrogates else (dict, list)
    stack: list[tuple[Any, int]] = [(doc, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: Any = value.values()
            if surrogates:
                for key in value:
                    _whole(key, what)
        elif isinstance(value, list):
            children = value
        else:
            if surrogates and isinstance(value, str):
                _whole(value, what)
            continue
        if depth >= MAX_DEPTH:
            raise InvalidRequest(f"{what} nests arrays and objects deeper than {MAX_DEPTH}")
        stack.extend((child, depth + 1) for child in children if isinstance(child, kinds))


def _whole(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(
            f"{what} has a lone UTF-16 surrogate (\\u{ord(text[exc.start]):04x}) in a string: "
            "a character beyond U+FFFF is escaped as a surrogate pair"
        ) from None
