"""Structured-output requests: OpenAI's `response_format` and vLLM's `guided_*` fields, normalized.

    parse_format(body) -> GrammarSpec | None      what the request asks the output to match
    GrammarSpec(kind, text)                       kind in GRAMMAR_KINDS; text is the spec

Every form becomes one `GrammarSpec`:

    {"type": "text"}                                        -> None (no constraint)
    {"type": "json_object"}                                 -> ("json_object", "")
    {"type": "json_schema", "json_schema": {"schema": S}}   -> ("json_schema", json.dumps(S))
    guided_json: S (object or JSON text)                    -> ("json_schema", ...)
    guided_regex: "[a-z]+"                                  -> ("regex", "[a-z]+")
    guided_choice: ["yes", "no"]                            -> ("choice", '["yes", "no"]')
    guided_grammar: "start: ..." (Lark or GBNF)             -> ("grammar", ...)

At most one of them per request. Specs are capped at MAX_SPEC_CHARS, so compiling one
(runtime/_grammar.py) stays bounded in time; whether it compiles is only known there,
with the model's tokenizer. No torch here: the controller validates with this module too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sllm.core.errors import InvalidRequest
from sllm.core.messages import show_value

GRAMMAR_KINDS = ("json_object", "json_schema", "regex", "choice", "grammar")
MAX_SPEC_CHARS = 32 * 1024  # a schema, regex or grammar, as JSON text
MAX_CHOICES = 256
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


@dataclass(frozen=True)
class GrammarSpec:
    """A normalized structured-output constraint: `kind` (one of GRAMMAR_KINDS) and its text."""

    kind: str
    text: str = ""

    def to_json(self) -> dict[str, str]:
        """`{"kind", "text"}`, what `from_json` reads."""
        return {"kind": self.kind, "text": self.text}

    @classmethod
    def from_json(cls, doc: Any) -> GrammarSpec:
        """Parse `to_json`'s form (it may come from another host); InvalidRequest if bad."""
        if not isinstance(doc, Mapping) or doc.get("kind") not in GRAMMAR_KINDS:
            raise InvalidRequest(
                f"'response_format' must be {{'kind': one of {list(GRAMMAR_KINDS)}, 'text': str}}"
                f", got {show_value(doc)}",
                param="response_format",
            )
        text = doc.get("text", "")
        _check_text(text, "response_format")
        spec = cls(doc["kind"], text)
        if spec.kind in ("json_schema", "choice"):
            # The text is re-read as JSON so a hostile state cannot smuggle what a request cannot.
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise InvalidRequest(
                    f"'response_format' text of kind {spec.kind!r} is not JSON: {exc}",
                    param="response_format",
                ) from None
            if spec.kind == "choice":
                return _choice(value, "response_format")
            return _schema(value, "response_format")
        return spec


def _check_text(text: Any, param: str) -> str:
    if not isinstance(text, str):
        raise InvalidRequest(f"{param!r} must be a string, got {show_value(text)}", param=param)
    if len(text) > MAX_SPEC_CHARS:
        raise InvalidRequest(
            f"{param!r} is {len(text)} characters; at most {MAX_SPEC_CHARS} are supported",
            param=param,
        )
    return text


def _schema(value: Any, param: str) -> GrammarSpec:
    if isinstance(value, str):
        _check_text(value, param)
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise InvalidRequest(f"{param!r} is not valid JSON: {exc}", param=param) from None
    if not isinstance(value, (Mapping, bool)):
        raise InvalidRequest(
            f"{param!r} must be a JSON schema (an object), got {show_value(value)}", param=param
        )
    text = json.dumps(value, separators=(",", ":"), sort_keys=True)
    return GrammarSpec("json_schema", _check_text(text, param))


def _choice(value: Any, param: str) -> GrammarSpec:
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_CHOICES
        or not all(isinstance(c, str) and c for c in value)
    ):
        raise InvalidRequest(
            f"{param!r} must be a list of 1-{MAX_CHOICES} non-empty strings, "
            f"got {show_value(value)}",
            param=param,
        )
    return GrammarSpec("choice", _check_text(json.dumps(value), param))


def _response_format(value: Any) -> GrammarSpec | None:
    param = "response_format"
    kind = value.get("type") if isinstance(value, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object")
    if kind == "json_schema":
        inner = value.get("json_schema")
        if not isinstance(inner, Mapping) or "schema" not in inner:
            raise InvalidRequest(
                "'response_format.json_schema' must be an object with a 'schema', "
                f"got {show_value(inner)}",
                param="response_format.json_schema",
            )
        strict = inner.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise InvalidRequest(
                f"'response_format.json_schema.strict' must be a boolean, got {show_value(strict)}",
                param="response_format.json_schema.strict",
            )
        return _schema(inner["schema"], "response_format.json_schema.schema")
    raise InvalidRequest(
        "'response_format' must be {'type': 'text'}, {'type': 'json_object'} or "
        f"{{'type': 'json_schema', 'json_schema': {{'schema': ...}}}}, got {show_value(value)}",
        param=param,
    )


def parse_format(body: Mapping[str, Any]) -> GrammarSpec | None:
    """The output constraint a request body asks for (None: free text); 400 naming the field."""
    given = [k for k in ("response_format", *GUIDED_FIELDS) if body.get(k) is not None]
    if len(given) > 1:
        raise InvalidRequest(
            f"give at most one of 'response_format' and the guided_* fields, got {given}",
            param=given[1],
        )
    if not given:
        return None
    name = given[0]
    value = body[name]
    if name == "response_format":
        return _response_format(value)
    if name == "guided_json":
        return _schema(value, name)
    if name == "guided_choice":
        return _choice(value, name)
    kind = "regex" if name == "guided_regex" else "grammar"
    if not _check_text(value, name):
        raise InvalidRequest(f"{name!r} must not be empty", param=name)
    return GrammarSpec(kind, value)
