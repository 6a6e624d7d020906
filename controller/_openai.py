"""The OpenAI-compatible API's translation layer: OpenAI bodies in, invoker params out, and back.

    parse_completion(body) / parse_chat(body) / parse_embedding(body)   -> OpenAIRequest
    CompletionStream(kind, model, activation_id, created).feed(event)   -> stream chunks
    completion_response, embeddings_response, models_response, model_response
    sse(obj), SSE_DONE, sse_error(exc), error_body(exc), error_from_event(event)

Errors about one field name it as `param`, in the client's terms: the invoker's
`max_tokens` is the `max_completion_tokens` a client sent, its `tokens` the `prompt`.

Supported beyond text in, text out: `n` (1-MAX_N choices), logprobs (chat:
`logprobs` + `top_logprobs` 0-20; completions: `logprobs` 0-5), presence /
frequency / repetition penalties, `logit_bias`, `min_p`, `min_tokens`,
`ignore_eos`, `response_format` (json_object / json_schema, on both endpoints),
vLLM's `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`, and
`echo` on completions. A parameter that would change the output in a way we
cannot honour (tools, suffix, best_of != n, prompt logprobs, beam search, ...) is
a 400 naming it rather than silently ignored; unknown fields are ignored, since
clients add new ones. Sampling fields are checked with the ranges of the runtime's
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

from sllm.core.errors import InvalidRequest, SllmError
from sllm.core.messages import embedding_inputs, require_object, show_value
from sllm.core.numbers import is_int, is_number

from ._openai_responses import (
    CompletionStream,
    completion_response,
    error_from_event,
    usage_of,
)

__all__ = [
    "SSE_DONE",
    "CompletionStream",
    "OpenAIRequest",
    "completion_response",
    "embeddings_response",
    "error_body",
    "error_from_event",
    "model_response",
    "models_response",
    "parse_chat",
    "parse_completion",
    "parse_embedding",
    "sse",
    "sse_error",
]

MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_STOPS = 4
MAX_STOP_CHARS = 64
MAX_N = 8  # choices per request (the runtime's MAX_N)
MAX_TOP_LOGPROBS = 20  # chat's top_logprobs, as OpenAI
MAX_COMPLETION_LOGPROBS = 5  # completions' logprobs, as OpenAI
MAX_LOGIT_BIAS = 300
MAX_SPEC_CHARS = 32 * 1024  # a schema, regex or grammar (the runtime's _formats.MAX_SPEC_CHARS)
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
    echo: str = ""  # completions with echo: the prompt text that starts each choice
    logprobs: bool = False  # whether responses carry logprobs
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


def _signed(body: Mapping[str, Any], name: str, lo: float, hi: float) -> float | None:
    value = body.get(name)
    if value is not None and (not is_number(value) or not lo <= value <= hi):
        raise InvalidRequest(
            f"{name!r} must be a number in [{lo:g}, {hi:g}], got {show_value(value)}", param=name
        )
    return value


def _logit_bias(body: Mapping[str, Any]) -> dict[str, float] | None:
    value = body.get("logit_bias")
    if value is None or value == {}:
        return None
    rule = f"an object of at most {MAX_LOGIT_BIAS} token ids (as strings) to numbers in [-100, 100]"
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        shown = f"{len(value)} entries" if isinstance(value, dict) else show_value(value)
        raise InvalidRequest(f"'logit_bias' must be {rule}, got {shown}", param="logit_bias")
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10):
            raise InvalidRequest(
                f"'logit_bias' keys must be token ids, got {show_value(key)}", param="logit_bias"
            )
        if not is_number(bias) or not -100 <= bias <= 100:
            raise InvalidRequest(
                f"'logit_bias' values must be numbers in [-100, 100], got {show_value(bias)}",
                param="logit_bias",
            )
    return dict(value)


def _spec_size(body: Mapping[str, Any]) -> None:
    """Structured-output fields: passed on as given, but never larger than a runtime compiles."""
    for name in ("response_format", *_GUIDED):
        value = body.get(name)
        if value is None:
            continue
        if name == "response_format" and (
            not isinstance(value, dict) or value.get("type") not in _FORMATS
        ):
            raise InvalidRequest(
                f"'response_format' must be an object whose 'type' is one of {list(_FORMATS)}, "
                f"got {show_value(value)}",
                param=name,
            )
        size = len(value) if isinstance(value, str) else len(json.dumps(value))
        if size > MAX_SPEC_CHARS:
            raise InvalidRequest(
                f"{name!r} is {size} characters of JSON; at most {MAX_SPEC_CHARS} are supported",
                param=name,
            )


_GUIDED = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
_FORMATS = ("text", "json_object", "json_schema")


def _sampling(body: Mapping[str, Any]) -> dict[str, Any]:
    """The sampling fields the client gave, validated; `max_completion_tokens` (the newer
    name) wins over `max_tokens` when both are given, as with OpenAI and vLLM."""
    max_tokens = _int(body, "max_tokens", 1, MAX_INT)
    _spec_size(body)
    fields = {
        "max_tokens": _int(body, "max_completion_tokens", 1, MAX_INT) or max_tokens,
        "temperature": _number(body, "temperature", 2, open_lo=False),
        "top_p": _number(body, "top_p", 1, open_lo=True),
        "top_k": _int(body, "top_k", 0, MAX_INT),
        "stop": _stop(body),
        "seed": _int(body, "seed", 0, MAX_SEED),
        "n": _int(body, "n", 1, MAX_N),
        "min_p": _number(body, "min_p", 1, open_lo=False),
        "presence_penalty": _signed(body, "presence_penalty", -2, 2),
        "frequency_penalty": _signed(body, "frequency_penalty", -2, 2),
        "repetition_penalty": _number(body, "repetition_penalty", 2, open_lo=True),
        "logit_bias": _logit_bias(body),
        "min_tokens": _int(body, "min_tokens", 0, MAX_INT),
        "ignore_eos": _bool(body, "ignore_eos") or None,
    }
    for name in ("response_format", *_GUIDED):
        fields[name] = body.get(name)
    if fields["response_format"] == {"type": "text"}:
        fields["response_format"] = None
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


def _absent(value: Any) -> bool:
    return value is None


def _empty(value: Any) -> bool:
    return value is None or value in ([], {})


_Rule = tuple[str, Callable[[Any], bool], str]
# Fields that would change the output in a way we do not implement: a 400, never ignored.
_GENERATION_RULES: tuple[_Rule, ...] = (
    ("prompt_logprobs", _absent, "must be null: prompt logprobs are not supported"),
    ("use_beam_search", _off, "must be false: beam search is not supported"),
    ("length_penalty", lambda v: v is None or v == 1, "must be 1: beam search is not supported"),
    ("stop_token_ids", _empty, "must be empty: use 'stop' strings or 'logit_bias'"),
    ("bad_words", _empty, "must be empty: use 'logit_bias'"),
    ("allowed_token_ids", _empty, "must be empty: use 'logit_bias' or guided_choice"),
    ("logits_processors", _empty, "must be empty: custom logits processors are not supported"),
    ("structured_outputs", _absent, "must be null: use 'response_format' or guided_*"),
    ("guided_whitespace_pattern", _absent, "must be null: JSON is written compactly"),
    ("include_stop_str_in_output", _off, "must be false: the stop string is never included"),
    ("skip_special_tokens", lambda v: v is None or v is True, "must be true"),
    ("truncate_prompt_tokens", _absent, "must be null: prompts are never truncated"),
    ("prediction", _absent, "must be null: predicted outputs are not supported"),
)
_COMPLETION_RULES: tuple[_Rule, ...] = (
    *_GENERATION_RULES,
    ("suffix", lambda v: v is None, "must be null: suffix (insertion) is not supported"),
)
_CHAT_RULES: tuple[_Rule, ...] = (
    *_GENERATION_RULES,
    ("tools", _no_tools, "must be absent: tools are not supported"),
    ("functions", _no_tools, "must be absent: tools are not supported"),
    ("tool_choice", _tool_choice_none, "must be 'none': tools are not supported"),
    ("function_call", _tool_choice_none, "must be 'none': tools are not supported"),
    ("audio", _absent, "must be null: audio output is not supported"),
    (
        "modalities",
        lambda v: v is None or v == ["text"],
        "must be ['text']: only text output is supported",
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


def _generation(
    body: Mapping[str, Any],
    kind: str,
    params: dict[str, Any],
    *,
    logprobs: int | None = None,
    echo: str = "",
    names: Mapping[str, str] | None = None,
) -> OpenAIRequest:
    """A completion or chat request: `params` plus sampling fields, model, user, stream fields.

    `logprobs` is how many alternatives per token the invoker reports (None: no logprobs).
    """
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
    client_names = {"tokens": "prompt", **(names or {})}
    if body.get("max_completion_tokens") is not None:
        client_names["max_tokens"] = "max_completion_tokens"
    sampling = _sampling(body)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    return OpenAIRequest(
        model,
        kind,
        {**params, **sampling},
        stream,
        include_usage,
        user=user,
        echo=echo,
        logprobs=logprobs is not None,
        client_names=client_names,
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
    logprobs = _int(doc, "logprobs", 0, MAX_COMPLETION_LOGPROBS)
    _best_of(doc)
    echo = _bool(doc, "echo")
    if echo and logprobs is not None:
        raise InvalidRequest(
            "'echo' with 'logprobs' needs prompt logprobs, which are not supported", param="echo"
        )
    if echo and "prompt" not in params:
        raise InvalidRequest(
            "'echo' needs the prompt as text; a prompt of token ids cannot be echoed",
            param="echo",
        )
    text = params["prompt"] if echo else ""
    return _generation(doc, "completion", params, logprobs=logprobs, echo=text)


def _best_of(doc: Mapping[str, Any]) -> None:
    best_of, n = doc.get("best_of"), doc.get("n")
    if best_of is not None and not (is_int(best_of) and best_of == (1 if n is None else n)):
        raise InvalidRequest(
            f"'best_of' must equal 'n' (choosing the best of more candidates is not "
            f"supported), got {show_value(best_of)}",
            param="best_of",
        )


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
    wanted = _bool(doc, "logprobs")
    top = _int(doc, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not wanted:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    logprobs = (top or 0) if wanted else None
    names = {"logprobs": "top_logprobs"} if top else {}
    return _generation(doc, "chat", {"messages": checked}, logprobs=logprobs, names=names)


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
    usage = usage_of(result.get("usage") or {}, ("prompt_tokens", "total_tokens"))
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


# --------------------------------------------------------------------------- SSE
SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: Mapping[str, Any], event_id: str | None = None) -> bytes:
    """One server-sent event carrying `obj` as JSON (with `event_id` as its id: line)."""
    data = b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    return data if event_id is None else b"id: " + event_id.encode() + b"\n" + data


def sse_error(exc: SllmError) -> bytes:
    """An error once the stream has started: an event with OpenAI's error body, as OpenAI does."""
    return sse(error_body(exc))
