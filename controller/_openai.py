"""The OpenAI-compatible API's translation layer: OpenAI bodies in, invoker params out, and back.

    parse_completion(body) / parse_chat(body) / parse_embedding(body)   -> OpenAIRequest
    CompletionStream(kind, model, activation_id, created).feed(event)   -> stream chunks
    completion_response, embeddings_response, models_response, model_response
    sse(obj), SSE_DONE, sse_error(exc), error_body(exc), error_from_event(event)

Errors about one field name it as `param`, in the client's terms: the invoker's
`max_tokens` is the `max_completion_tokens` a client sent, its `tokens` the `prompt`.

A parameter that would change the output in a way a single-choice text model
cannot honour (n > 1, logprobs, penalties, tools, JSON mode) is a 400 naming it
rather than silently ignored; unknown fields are ignored, since clients add new
ones. Sampling fields are checked with the ranges of the runtime's
`SamplingParams`, here rather than by importing it, so the controller never
loads torch; only the fields the client gave travel on, so the function's own
defaults apply to the rest.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sllm.core.errors import InvalidRequest, PlatformError, SllmError
from sllm.core.messages import embedding_inputs, require_object, show_value
from sllm.core.numbers import is_int, is_number

MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_STOPS = 4
MAX_STOP_CHARS = 64
_USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass(frozen=True)
class OpenAIRequest:
    """A validated OpenAI request: the function it names and the params for the invoker."""

    function: str  # the request's `model`
    kind: str  # "completion" | "chat" | "embedding"
    params: dict[str, Any]
    stream: bool = False
    include_usage: bool = False
    encoding_format: str = "float"  # embeddings only: "float" | "base64"
    user: str | None = None
    client_names: Mapping[str, str] = field(default_factory=dict, compare=False)  # param -> field

    def in_client_terms(self, exc: SllmError) -> SllmError:
        """`exc` with its `param` named as this request's client named the field."""
        if exc.param is not None:
            exc.param = self.client_names.get(exc.param, exc.param)
        return exc


# ------------------------------------------------------------------ field checks


def _int(body: Mapping[str, Any], name: str, lo: int, hi: int) -> int | None:
    value = body.get(name)
    if value is not None and (not is_int(value) or not lo <= value <= hi):
        raise InvalidRequest(
            f"{name!r} must be an integer in [{lo}, {hi}], got {show_value(value)}", param=name
        )
    return value


def _number(body: Mapping[str, Any], name: str, hi: int, *, open_lo: bool) -> float | None:
    """An optional number in [0, hi], or (0, hi] when `open_lo`."""
    value = body.get(name)
    if value is None:
        return None
    if not is_number(value) or value > hi or value < 0 or (open_lo and value == 0):
        bracket = "(" if open_lo else "["
        raise InvalidRequest(
            f"{name!r} must be a number in {bracket}0, {hi}], got {show_value(value)}",
            param=name,
        )
    return float(value)


def _bool(body: Mapping[str, Any], name: str, where: str = "") -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        param = where + name
        raise InvalidRequest(f"{param!r} must be a boolean, got {show_value(value)}", param=param)
    return bool(value)


def _stop(body: Mapping[str, Any]) -> list[str] | None:
    value = body.get("stop")
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if (
        not isinstance(stops, list)
        or len(stops) > MAX_STOPS
        or not all(isinstance(s, str) and 1 <= len(s) <= MAX_STOP_CHARS for s in stops)
    ):
        raise InvalidRequest(
            f"'stop' must be a string or a list of up to {MAX_STOPS} strings, "
            f"each 1-{MAX_STOP_CHARS} characters, got {show_value(value)}",
            param="stop",
        )
    return stops


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields the client gave, validated; `max_completion_tokens` (the newer
    name) wins over `max_tokens` when both are given, as with OpenAI and vLLM."""
    max_tokens = _int(body, "max_tokens", 1, MAX_INT)
    fields = {
        "max_tokens": _int(body, "max_completion_tokens", 1, MAX_INT) or max_tokens,
        "temperature": _number(body, "temperature", 2, open_lo=False),
        "top_p": _number(body, "top_p", 1, open_lo=True),
        "top_k": _int(body, "top_k", 0, MAX_INT),
        "stop": _stop(body),
        "seed": _int(body, "seed", 0, MAX_SEED),
    }
    return {name: value for name, value in fields.items() if value is not None}


def _one(value: Any) -> bool:
    return value is None or (is_int(value) and value == 1)


def _zero(value: Any) -> bool:
    return value is None or (is_number(value) and value == 0)


def _off(value: Any) -> bool:
    return value is None or value is False


def _no_tools(value: Any) -> bool:
    return value is None or value == []


def _tool_choice_none(value: Any) -> bool:
    return value is None or value == "none"


_Rule = tuple[str, Callable[[Any], bool], str]
_GENERATION_RULES: tuple[_Rule, ...] = (
    ("n", _one, "must be 1: only one choice per request is supported"),
    ("presence_penalty", _zero, "must be 0: penalties are not supported"),
    ("frequency_penalty", _zero, "must be 0: penalties are not supported"),
    ("logit_bias", lambda v: v is None or v == {}, "must be empty: logit_bias is not supported"),
)
_COMPLETION_RULES: tuple[_Rule, ...] = (
    *_GENERATION_RULES,
    ("best_of", _one, "must be 1: only one choice per request is supported"),
    ("echo", _off, "must be false: echoing the prompt is not supported"),
    ("logprobs", lambda v: _off(v) or v == 0, "must be null: logprobs are not supported"),
    ("suffix", lambda v: v is None, "must be null: suffix (insertion) is not supported"),
)
_CHAT_RULES: tuple[_Rule, ...] = (
    *_GENERATION_RULES,
    ("logprobs", _off, "must be false: logprobs are not supported"),
    ("top_logprobs", lambda v: v is None, "must be null: logprobs are not supported"),
    ("tools", _no_tools, "must be absent: tools are not supported"),
    ("functions", _no_tools, "must be absent: tools are not supported"),
    ("tool_choice", _tool_choice_none, "must be 'none': tools are not supported"),
    ("function_call", _tool_choice_none, "must be 'none': tools are not supported"),
    (
        "response_format",
        lambda v: v is None or v == {"type": "text"},
        "must be {'type': 'text'}: structured output is not supported",
    ),
)


def _check_rules(body: Mapping[str, Any], rules: tuple[_Rule, ...]) -> None:
    for name, allowed, rule in rules:
        if not allowed(body.get(name)):
            raise InvalidRequest(f"{name!r} {rule}, got {show_value(body[name])}", param=name)


def _model_and_user(body: Mapping[str, Any]) -> tuple[str, str | None]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            f"'model' must be a non-empty string (a function), got {show_value(model)}",
            param="model",
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest(f"'user' must be a string, got {show_value(user)}", param="user")
    return model, user


def _generation(body: Mapping[str, Any], kind: str, params: dict[str, Any]) -> OpenAIRequest:
    """A completion or chat request: `params` plus sampling fields, model, user, stream fields."""
    model, user = _model_and_user(body)
    stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None and not stream:
        raise InvalidRequest(
            "'stream_options' is only allowed when 'stream' is true", param="stream_options"
        )
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest(
            f"'stream_options' must be an object, got {show_value(options)}",
            param="stream_options",
        )
    include_usage = _bool(options or {}, "include_usage", "stream_options.")
    names = {"tokens": "prompt"}
    if body.get("max_completion_tokens") is not None:
        names["max_tokens"] = "max_completion_tokens"
    return OpenAIRequest(
        model,
        kind,
        {**params, **_sampling(body)},
        stream,
        include_usage,
        user=user,
        client_names=names,
    )


# ---------------------------------------------------------------------- requests
def parse_completion(body: Any) -> OpenAIRequest:
    """A `/v1/completions` body as an invoker request (`prompt` text or `tokens` ids)."""
    doc = require_object(body)
    _check_rules(doc, _COMPLETION_RULES)
    prompt = doc.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, list) and len(prompt) > 1 and not any(is_int(p) for p in prompt):
        raise InvalidRequest(
            f"'prompt': only one prompt per request is supported, got {len(prompt)}",
            param="prompt",
        )
    if isinstance(prompt, str) and prompt:
        params: dict[str, Any] = {"prompt": prompt}
    elif isinstance(prompt, list) and prompt and all(is_int(t) and t >= 0 for t in prompt):
        params = {"tokens": list(prompt)}
    else:
        raise InvalidRequest(
            "'prompt' must be a non-empty string, a list holding one such string, or a "
            f"non-empty list of token ids, got {show_value(doc.get('prompt'))}",
            param="prompt",
        )
    return _generation(doc, "completion", params)


def parse_chat(body: Any) -> OpenAIRequest:
    """A `/v1/chat/completions` body as an invoker request with text-only `messages`."""
    doc = require_object(body)
    _check_rules(doc, _CHAT_RULES)
    messages = doc.get("messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            f"'messages' must be a non-empty list of message objects, got {show_value(messages)}",
            param="messages",
        )
    checked = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    return _generation(doc, "chat", {"messages": checked})


def _message(message: Any, where: str) -> dict[str, str]:
    """One chat message as `{"role", "content"}`; developer is the newer name of system."""
    if not isinstance(message, dict):
        raise InvalidRequest(f"{where!r} must be an object, got {show_value(message)}", param=where)
    role = message.get("role")
    if role in ("tool", "function"):
        raise InvalidRequest(
            f"'{where}.role' is {role!r}: tools are not supported", param=f"{where}.role"
        )
    for name in ("tool_calls", "function_call"):
        if message.get(name):
            raise InvalidRequest(
                f"'{where}.{name}': tools are not supported", param=f"{where}.{name}"
            )
    if role not in _ROLES:
        raise InvalidRequest(
            f"'{where}.role' must be one of {list(_ROLES)}, got {show_value(role)}",
            param=f"{where}.role",
        )
    content = message.get("content")
    if isinstance(content, str):
        return {"role": _ROLES[role], "content": content}
    if not isinstance(content, list):
        raise InvalidRequest(
            f"'{where}.content' must be a string or a list of text parts, got {show_value(content)}",
            param=f"{where}.content",
        )
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            raise InvalidRequest(
                f"'{where}.content[{j}]': only text content is supported "
                f"({{'type': 'text', 'text': str}}), got {show_value(part)}",
                param=f"{where}.content[{j}]",
            )
        texts.append(part["text"])
    return {"role": _ROLES[role], "content": "".join(texts)}


def parse_embedding(body: Any) -> OpenAIRequest:
    """A `/v1/embeddings` body as an invoker request: texts or token ids, the reply encoding."""
    doc = require_object(body)
    inputs = embedding_inputs(doc.get("input"))  # at most MAX_EMBED_INPUTS, as invokers take
    encoding = doc.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise InvalidRequest(
            f"'encoding_format' must be 'float' or 'base64', got {show_value(encoding)}",
            param="encoding_format",
        )
    if doc.get("dimensions") is not None:
        raise InvalidRequest(
            f"'dimensions' must be null: shortening embeddings is not supported, "
            f"got {show_value(doc['dimensions'])}",
            param="dimensions",
        )
    model, user = _model_and_user(doc)
    return OpenAIRequest(model, "embedding", {"input": inputs}, encoding_format=encoding, user=user)


# --------------------------------------------------------------------- responses
def _finish_reason(reason: Any) -> str:
    """OpenAI knows "stop" and "length"; any other end (e.g. a stop sequence) is a stop."""
    return reason if reason in ("stop", "length") else "stop"


def _usage(usage: Mapping[str, Any], keys: tuple[str, ...] = _USAGE_KEYS) -> dict[str, int]:
    """The token counts OpenAI reports; a count the invoker left out is 0."""
    return {key: int(usage.get(key) or 0) for key in keys}


def _head(
    kind: str, model: str, activation_id: str, created: float, *, chunk: bool
) -> dict[str, Any]:
    """The fields every completion object starts with; ids are the activation's, prefixed."""
    if kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {
            "id": f"chatcmpl-{activation_id}",
            "object": obj,
            "created": int(created),
            "model": model,
            "system_fingerprint": None,
        }
    return {
        "id": f"cmpl-{activation_id}",
        "object": "text_completion",
        "created": int(created),
        "model": model,
    }


def _choice(body: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason}


class CompletionStream:
    """Turns one generation's invoker events into OpenAI stream chunks, in order.

    For chat, the first chunk carries the assistant role; token text follows as
    content deltas; "done" gives a chunk with only the finish reason and, with
    `include_usage`, a last chunk with no choices and the usage (every other
    chunk then carries `"usage": null`, as OpenAI sends them).
    """

    def __init__(
        self,
        kind: str,
        model: str,
        activation_id: str,
        created: float,
        *,
        include_usage: bool = False,
    ) -> None:
        self._kind = kind
        self._head = _head(kind, model, activation_id, created, chunk=True)
        self._usage: dict[str, Any] = {"usage": None} if include_usage else {}
        self._started = False

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The chunks for one invoker event; an "error" event raises its SllmError."""
        name = event.get("event")
        if name == "error":
            raise error_from_event(event)
        if name not in ("start", "token", "done"):
            return []
        chunks = []
        if not self._started and self._kind == "chat":
            chunks.append(self._chunk({"delta": {"role": "assistant", "content": ""}}, None))
        self._started = True
        if name == "token" and event.get("text"):
            chunks.append(self._chunk(self._text(event["text"]), None))
        elif name == "done":
            reason = _finish_reason(event.get("finish_reason"))
            chunks.append(self._chunk(self._text(""), reason))
            if self._usage:
                usage = _usage(event.get("usage") or {})
                chunks.append({**self._head, "choices": [], "usage": usage})
        return chunks

    def _text(self, text: str) -> dict[str, Any]:
        if self._kind != "chat":
            return {"text": text}
        return {"delta": {"content": text} if text else {}}

    def _chunk(self, body: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {**self._head, "choices": [_choice(body, finish_reason)], **self._usage}


def completion_response(
    kind: str,
    model: str,
    activation_id: str,
    created: float,
    text: str,
    finish_reason: str | None,
    usage: Mapping[str, Any],
) -> dict[str, Any]:
    """A whole `chat.completion` (kind "chat") or `text_completion` object."""
    head = _head(kind, model, activation_id, created, chunk=False)
    body = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"text": text}
    choice = _choice(body, _finish_reason(finish_reason))
    return {**head, "choices": [choice], "usage": _usage(usage)}


def embeddings_response(
    model: str, result: Mapping[str, Any], encoding_format: str
) -> dict[str, Any]:
    """The invoker's embeddings as an OpenAI list; base64 is little-endian float32 bytes."""
    data = []
    for item in sorted(result["data"], key=lambda d: d["index"]):
        vector = [float(x) for x in item["embedding"]]
        embedding: list[float] | str = vector
        if encoding_format == "base64":
            embedding = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")
        data.append({"object": "embedding", "index": item["index"], "embedding": embedding})
    usage = _usage(result.get("usage") or {}, ("prompt_tokens", "total_tokens"))
    return {"object": "list", "data": data, "model": model, "usage": usage}


def model_response(name: str, created: float, owned_by: str) -> dict[str, Any]:
    """One function as an OpenAI model object."""
    return {"id": name, "object": "model", "created": int(created), "owned_by": owned_by}


def models_response(models: list[tuple[str, float, str]]) -> dict[str, Any]:
    """Functions as `(name, created epoch, owner namespace)` in OpenAI's model list."""
    return {"object": "list", "data": [model_response(*m) for m in models]}


# ------------------------------------------------------------------------ errors
def _error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(exc: SllmError) -> dict[str, Any]:
    """OpenAI's error shape; on this API the only thing a 404 can name is a model."""
    code = "model_not_found" if exc.status == 404 else exc.code
    return {
        "error": {
            "message": exc.message,
            "type": _error_type(exc.status),
            "param": exc.param,
            "code": code,
        }
    }


def error_from_event(event: Mapping[str, Any]) -> SllmError:
    """The SllmError an invoker's `{"event": "error", "error": {code, message}}` stands for.

    The class is found by its `code`; an unknown code is a PlatformError.
    """
    default = "the invoker reported an error without a message"
    return PlatformError.from_json(event.get("error"), default)


# --------------------------------------------------------------------------- SSE
SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying `obj` as JSON."""
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def sse_error(exc: SllmError) -> bytes:
    """An error once the stream has started: an event with OpenAI's error body, as OpenAI does."""
    return sse(error_body(exc))
