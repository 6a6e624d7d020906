"""The OpenAI translation layer: request validation, stream chunks, responses, errors.

The last tests check compatibility with the official `openai` client without a
server: its pydantic models parse our objects, and the client itself talks to
the adapter through an in-memory HTTP transport.
"""

from __future__ import annotations

import base64
import importlib
import json
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from sllm.controller._openai import (
    SSE_DONE,
    CompletionStream,
    OpenAIRequest,
    completion_response,
    embeddings_response,
    error_body,
    error_from_event,
    model_response,
    models_response,
    parse_chat,
    parse_completion,
    parse_embedding,
    sse,
    sse_error,
)
from sllm.core.errors import (
    Conflict,
    ContextLengthExceeded,
    FunctionError,
    InvalidRequest,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    PlatformError,
    SllmError,
    StoreError,
    Unauthorized,
    Unavailable,
)
from sllm.runtime import SamplingParams

Parse = Callable[[Any], OpenAIRequest]
USAGE = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "fn", "messages": [{"role": "user", "content": "Hi"}], **fields}


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": "fn", "prompt": "Once", **fields}


def _embedding(**fields: Any) -> dict[str, Any]:
    return {"model": "emb", "input": "a", **fields}


def _events(texts: list[str], finish_reason: str = "eos") -> list[dict[str, Any]]:
    """An invoker event stream; "" is a token that completes no character, and the
    last text comes as the end-of-generation flush (token None)."""
    events: list[dict[str, Any]] = [{"event": "start", "load": {"tier": "gpu"}, "prompt_tokens": 5}]
    for i, text in enumerate(texts[:-1]):
        events.append({"event": "token", "token": 100 + i, "text": text, "index": i})
    events.append({"event": "token", "token": None, "text": texts[-1], "index": len(texts) - 1})
    usage = {**USAGE, "completion_tokens": len(texts) - 1, "total_tokens": 4 + len(texts)}
    events.append({"event": "done", "finish_reason": finish_reason, "usage": usage, "timing": {}})
    return events


# ------------------------------------------------------------------- bad requests
BAD: dict[str, tuple[Parse, Any, str]] = {
    "body-not-object": (parse_chat, [1], "request body must be a JSON object"),
    "model-missing": (parse_chat, {"messages": [{"role": "user", "content": "x"}]}, "'model'"),
    "model-empty": (parse_completion, _completion(model=""), "'model' must be a non-empty"),
    "model-not-string": (parse_embedding, _embedding(model=3), "'model'"),
    "user-not-string": (parse_chat, _chat(user=5), "'user' must be a string"),
    "prompt-missing": (parse_completion, {"model": "fn"}, "'prompt' must be"),
    "prompt-empty": (parse_completion, _completion(prompt=""), "'prompt' must be"),
    "prompt-empty-list": (parse_completion, _completion(prompt=[]), "'prompt' must be"),
    "prompt-several": (parse_completion, _completion(prompt=["a", "b"]), "only one prompt"),
    "prompt-several-token-lists": (
        parse_completion,
        _completion(prompt=[[1], [2]]),
        "only one prompt",
    ),
    "prompt-negative-token": (parse_completion, _completion(prompt=[1, -2]), "'prompt' must be"),
    "prompt-bool-tokens": (parse_completion, _completion(prompt=[True]), "'prompt' must be"),
    "prompt-number": (parse_completion, _completion(prompt=3), "'prompt' must be"),
    "n-over-cap": (parse_chat, _chat(n=9), r"'n' must be an integer in \[1, 8\]"),
    "n-true": (parse_completion, _completion(n=True), "'n' must be an integer"),
    "best-of": (parse_completion, _completion(best_of=3), "'best_of' must equal 'n'"),
    "echo-with-logprobs": (
        parse_completion,
        _completion(echo=True, logprobs=1),
        "'echo' with 'logprobs' needs prompt logprobs",
    ),
    "echo-token-prompt": (parse_completion, _completion(echo=True, prompt=[1, 2]), "'echo'"),
    "completion-logprobs-over-5": (parse_completion, _completion(logprobs=6), "'logprobs'"),
    "chat-logprobs-not-bool": (parse_chat, _chat(logprobs=2), "'logprobs' must be a boolean"),
    "top-logprobs-without-logprobs": (
        parse_chat,
        _chat(top_logprobs=2),
        "'top_logprobs' needs 'logprobs': true",
    ),
    "top-logprobs-over-20": (
        parse_chat,
        _chat(logprobs=True, top_logprobs=21),
        "'top_logprobs' must be an integer",
    ),
    "suffix": (parse_completion, _completion(suffix="end"), "'suffix' must be null"),
    "presence-penalty-range": (parse_chat, _chat(presence_penalty=2.5), "'presence_penalty'"),
    "frequency-penalty-type": (
        parse_completion,
        _completion(frequency_penalty="1"),
        "'frequency_penalty' must be a number in",
    ),
    "repetition-penalty-zero": (parse_chat, _chat(repetition_penalty=0), "'repetition_penalty'"),
    "min-p-range": (parse_chat, _chat(min_p=1.5), "'min_p'"),
    "min-tokens-negative": (parse_chat, _chat(min_tokens=-1), "'min_tokens'"),
    "ignore-eos-not-bool": (parse_chat, _chat(ignore_eos="yes"), "'ignore_eos' must be"),
    "logit-bias-key": (parse_chat, _chat(logit_bias={"x": 1}), "'logit_bias' keys"),
    "logit-bias-value": (parse_chat, _chat(logit_bias={"5": 200}), "'logit_bias' values"),
    "logit-bias-too-many": (
        parse_chat,
        _chat(logit_bias={str(i): 1 for i in range(10**6)}),
        "at most 300",
    ),
    "response-format-type": (
        parse_completion,
        _completion(response_format={"type": "yaml"}),
        "'response_format' must be an object whose 'type'",
    ),
    "response-format-huge": (
        parse_chat,
        _chat(
            response_format={
                "type": "json_schema",
                "json_schema": {"schema": {"enum": ["x" * 100] * 1000}},
            }
        ),
        "at most 32768",
    ),
    "prompt-logprobs": (parse_completion, _completion(prompt_logprobs=1), "'prompt_logprobs'"),
    "beam-search": (parse_chat, _chat(use_beam_search=True), "'use_beam_search'"),
    "stop-token-ids": (parse_chat, _chat(stop_token_ids=[2]), "'stop_token_ids'"),
    "whitespace-pattern": (parse_chat, _chat(guided_whitespace_pattern=" "), "'guided_whitespace"),
    "tools": (
        parse_chat,
        _chat(tools=[{"type": "function", "function": {"name": "f"}}]),
        "'tools' must be absent: tools are not supported",
    ),
    "functions": (parse_chat, _chat(functions=[{"name": "f"}]), "tools are not supported"),
    "tool-choice": (parse_chat, _chat(tool_choice="auto"), "'tool_choice'.*tools are not"),
    "stream-not-bool": (parse_chat, _chat(stream="yes"), "'stream' must be a boolean"),
    "stream-options-without-stream": (
        parse_chat,
        _chat(stream_options={"include_usage": True}),
        "'stream_options' is only allowed when 'stream' is true",
    ),
    "stream-options-not-object": (
        parse_completion,
        _completion(stream=True, stream_options=True),
        "'stream_options' must be an object",
    ),
    "include-usage-not-bool": (
        parse_chat,
        _chat(stream=True, stream_options={"include_usage": "yes"}),
        "'stream_options.include_usage' must be a boolean",
    ),
    "temperature-high": (
        parse_chat,
        _chat(temperature=5),
        r"'temperature' must be a number in \[0, 2\], got 5",
    ),
    "temperature-string": (parse_completion, _completion(temperature="0.5"), "'temperature'"),
    "temperature-nan": (parse_chat, _chat(temperature=float("nan")), "'temperature'"),
    "top-p-zero": (parse_chat, _chat(top_p=0), r"'top_p' must be a number in \(0, 1\]"),
    "top-p-high": (parse_chat, _chat(top_p=1.5), "'top_p'"),
    "top-k-negative": (parse_chat, _chat(top_k=-1), "'top_k' must be an integer"),
    "max-tokens-zero": (parse_completion, _completion(max_tokens=0), "'max_tokens'"),
    "max-tokens-float": (parse_chat, _chat(max_tokens=1.5), "'max_tokens' must be an integer"),
    "max-completion-tokens": (
        parse_chat,
        _chat(max_completion_tokens=-3),
        "'max_completion_tokens' must be an integer",
    ),
    "seed-negative": (parse_chat, _chat(seed=-1), "'seed' must be an integer"),
    "stop-too-many": (parse_chat, _chat(stop=["a", "b", "c", "d", "e"]), "'stop' must be"),
    "stop-empty-string": (parse_completion, _completion(stop=""), "'stop' must be"),
    "stop-too-long": (parse_chat, _chat(stop=["x" * 65]), "'stop' must be"),
    "messages-missing": (parse_chat, {"model": "fn"}, "'messages' must be a non-empty list"),
    "messages-empty": (parse_chat, _chat(messages=[]), "'messages' must be a non-empty list"),
    "message-not-object": (parse_chat, _chat(messages=["hi"]), r"'messages\[0\]' must be"),
    "role-unknown": (
        parse_chat,
        _chat(messages=[{"role": "bot", "content": "x"}]),
        r"'messages\[0\].role' must be one of",
    ),
    "role-tool": (
        parse_chat,
        _chat(messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}]),
        r"'messages\[0\].role' is 'tool': tools are not supported",
    ),
    "assistant-tool-calls": (
        parse_chat,
        _chat(
            messages=[
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            ]
        ),
        r"'messages\[1\].tool_calls': tools are not supported",
    ),
    "content-null": (
        parse_chat,
        _chat(messages=[{"role": "user", "content": None}]),
        r"'messages\[0\].content' must be a string or a list of text parts",
    ),
    "content-image": (
        parse_chat,
        _chat(
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                    ],
                }
            ]
        ),
        r"'messages\[0\].content\[1\]': only text content is supported",
    ),
    "content-text-not-string": (
        parse_chat,
        _chat(messages=[{"role": "user", "content": [{"type": "text", "text": 3}]}]),
        "only text content is supported",
    ),
    "input-missing": (parse_embedding, {"model": "emb"}, "'input' must be"),
    "input-empty-string": (parse_embedding, _embedding(input=""), "'input' must be"),
    "input-empty-list": (parse_embedding, _embedding(input=[]), "'input' must be"),
    "input-empty-item": (parse_embedding, _embedding(input=["a", ""]), "'input' must be"),
    "input-too-many": (parse_embedding, _embedding(input=["a"] * 257), "1-256"),
    "input-empty-token-list": (parse_embedding, _embedding(input=[[]]), r"'input\[0\]' is \[\]"),
    "input-negative-token": (parse_embedding, _embedding(input=[[1, -2]]), r"'input\[0\]'"),
    "input-float-token": (parse_embedding, _embedding(input=[1.5]), r"'input\[0\]' is 1.5"),
    "input-bool-token": (parse_embedding, _embedding(input=[True]), r"'input\[0\]' is True"),
    "input-nested-text": (parse_embedding, _embedding(input=[["a"]]), r"'input\[0\]'"),
    "encoding-format": (
        parse_embedding,
        _embedding(encoding_format="int8"),
        "'encoding_format' must be 'float' or 'base64'",
    ),
    "dimensions": (parse_embedding, _embedding(dimensions=256), "'dimensions' must be null"),
}


@pytest.mark.parametrize(("parse", "body", "match"), BAD.values(), ids=BAD.keys())
def test_bad_requests_are_400_naming_the_field(parse: Parse, body: Any, match: str) -> None:
    with pytest.raises(InvalidRequest, match=match) as info:
        parse(body)
    assert info.value.status == 400


PARAMS: dict[str, tuple[Parse, Any, str]] = {
    "model": (parse_chat, _chat(model=""), "model"),
    "max-tokens": (parse_chat, _chat(max_tokens=0), "max_tokens"),
    "max-completion-tokens": (parse_chat, _chat(max_completion_tokens=0), "max_completion_tokens"),
    "temperature": (parse_completion, _completion(temperature=9), "temperature"),
    "top-p": (parse_chat, _chat(top_p=0), "top_p"),
    "stop": (parse_chat, _chat(stop=[""]), "stop"),
    "n": (parse_chat, _chat(n=9), "n"),
    "top-logprobs": (parse_chat, _chat(logprobs=True, top_logprobs=99), "top_logprobs"),
    "logit-bias": (parse_completion, _completion(logit_bias=[]), "logit_bias"),
    "guided-choice": (parse_chat, _chat(guided_choice="x" * 40000), "guided_choice"),
    "tools": (parse_chat, _chat(tools=[{"type": "function"}]), "tools"),
    "stream": (parse_chat, _chat(stream="yes"), "stream"),
    "include-usage": (
        parse_chat,
        _chat(stream=True, stream_options={"include_usage": 1}),
        "stream_options.include_usage",
    ),
    "messages": (parse_chat, _chat(messages=[]), "messages"),
    "message-role": (
        parse_chat,
        _chat(messages=[{"role": "x", "content": ""}]),
        "messages[0].role",
    ),
    "prompt": (parse_completion, _completion(prompt=3), "prompt"),
    "input": (parse_embedding, _embedding(input=[[]]), "input"),
    "encoding-format": (parse_embedding, _embedding(encoding_format="int8"), "encoding_format"),
}


@pytest.mark.parametrize(("parse", "body", "param"), PARAMS.values(), ids=PARAMS.keys())
def test_bad_requests_name_the_field_as_param(parse: Parse, body: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse(body)
    assert info.value.param == param
    assert error_body(info.value)["error"]["param"] == param


def test_invoker_params_are_named_as_the_client_named_them() -> None:
    by_tokens = parse_completion(_completion(prompt=[1, 2], max_completion_tokens=3))
    by_text = parse_completion(_completion(max_tokens=3))

    renamed = by_tokens.in_client_terms(ContextLengthExceeded("too long", param="max_tokens"))
    assert renamed.param == "max_completion_tokens"
    assert by_tokens.in_client_terms(InvalidRequest("bad", param="tokens")).param == "prompt"
    assert by_text.in_client_terms(InvalidRequest("bad", param="max_tokens")).param == "max_tokens"
    assert by_text.in_client_terms(InvalidRequest("bad")).param is None


def test_error_messages_cut_huge_values_short() -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_chat(_chat(stop="x" * 10_000))
    assert len(info.value.message) < 300


# ------------------------------------------------------------------ good requests
GOOD: dict[str, tuple[Parse, Any, OpenAIRequest]] = {
    "completion-minimal": (
        parse_completion,
        _completion(),
        OpenAIRequest("fn", "completion", {"prompt": "Once"}),
    ),
    "completion-one-prompt-in-list": (
        parse_completion,
        _completion(prompt=["Once"]),
        OpenAIRequest("fn", "completion", {"prompt": "Once"}),
    ),
    "completion-token-ids": (
        parse_completion,
        _completion(prompt=[1, 2, 3]),
        OpenAIRequest("fn", "completion", {"tokens": [1, 2, 3]}),
    ),
    "completion-one-token-list": (
        parse_completion,
        _completion(prompt=[[7, 8]]),
        OpenAIRequest("fn", "completion", {"tokens": [7, 8]}),
    ),
    "completion-defaults-spelled-out": (
        parse_completion,
        _completion(
            n=1,
            best_of=None,
            echo=False,
            logprobs=0,
            suffix=None,
            presence_penalty=0,
            frequency_penalty=0.0,
            logit_bias={},
            stream=False,
            stream_options=None,
            user="u1",
            brand_new_field={"clients": "add these"},
        ),
        OpenAIRequest(
            "fn",
            "completion",
            {
                "prompt": "Once",
                "n": 1,
                "presence_penalty": 0,
                "frequency_penalty": 0.0,
                "logprobs": 0,
            },
            user="u1",
            logprobs=True,
        ),
    ),
    "completion-sampling": (
        parse_completion,
        _completion(max_tokens=20, temperature=0, top_p=0.9, top_k=40, stop="\n", seed=7),
        OpenAIRequest(
            "fn",
            "completion",
            {
                "prompt": "Once",
                "max_tokens": 20,
                "temperature": 0.0,
                "top_p": 0.9,
                "top_k": 40,
                "stop": ["\n"],
                "seed": 7,
            },
        ),
    ),
    "completion-stream-with-usage": (
        parse_completion,
        _completion(stream=True, stream_options={"include_usage": True}),
        OpenAIRequest("fn", "completion", {"prompt": "Once"}, stream=True, include_usage=True),
    ),
    "chat-minimal": (
        parse_chat,
        _chat(),
        OpenAIRequest("fn", "chat", {"messages": [{"role": "user", "content": "Hi"}]}),
    ),
    "chat-roles-parts-names": (
        parse_chat,
        _chat(
            messages=[
                {"role": "developer", "content": "Be brief."},
                {"role": "system", "content": [{"type": "text", "text": "Be kind."}]},
                {
                    "role": "user",
                    "name": "ann",
                    "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}],
                },
                {"role": "assistant", "content": "Hi!", "tool_calls": []},
                {"role": "user", "content": ""},
            ],
            logprobs=False,
            top_logprobs=None,
            tools=None,
            tool_choice="none",
            response_format={"type": "text"},
        ),
        OpenAIRequest(
            "fn",
            "chat",
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "system", "content": "Be kind."},
                    {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Hi!"},
                    {"role": "user", "content": ""},
                ]
            },
        ),
    ),
    "chat-max-completion-tokens": (
        parse_chat,
        _chat(max_completion_tokens=64, stop=["a", "b"]),
        OpenAIRequest(
            "fn",
            "chat",
            {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_tokens": 64,
                "stop": ["a", "b"],
            },
        ),
    ),
    "chat-max-completion-tokens-wins": (
        parse_chat,
        _chat(max_tokens=8, max_completion_tokens=64),
        OpenAIRequest(
            "fn", "chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}
        ),
    ),
    "chat-stream-without-usage": (
        parse_chat,
        _chat(stream=True, stream_options={}),
        OpenAIRequest("fn", "chat", {"messages": [{"role": "user", "content": "Hi"}]}, True),
    ),
    "embedding-string": (
        parse_embedding,
        _embedding(),
        OpenAIRequest("emb", "embedding", {"input": ["a"]}),
    ),
    "embedding-list-base64": (
        parse_embedding,
        _embedding(input=["a", "b"], encoding_format="base64", dimensions=None, user="u"),
        OpenAIRequest(
            "emb", "embedding", {"input": ["a", "b"]}, encoding_format="base64", user="u"
        ),
    ),
    # Token ids, as LangChain's OpenAIEmbeddings sends them by default.
    "embedding-token-ids": (
        parse_embedding,
        _embedding(input=[0, 17, 3]),
        OpenAIRequest("emb", "embedding", {"input": [[0, 17, 3]]}),
    ),
    "embedding-token-id-lists": (
        parse_embedding,
        _embedding(input=[[5, 6], [7]]),
        OpenAIRequest("emb", "embedding", {"input": [[5, 6], [7]]}),
    ),
}


@pytest.mark.parametrize(("parse", "body", "expected"), GOOD.values(), ids=GOOD.keys())
def test_good_requests_map_to_invoker_params(
    parse: Parse, body: Any, expected: OpenAIRequest
) -> None:
    assert parse(body) == expected


SAMPLING: dict[str, dict[str, Any]] = {
    "temperature-0": {"temperature": 0},
    "temperature-2": {"temperature": 2.0},
    "temperature-over": {"temperature": 2.0001},
    "temperature-bool": {"temperature": True},
    "top-p-1": {"top_p": 1},
    "top-p-0": {"top_p": 0.0},
    "top-p-negative": {"top_p": -0.1},
    "top-k-0": {"top_k": 0},
    "top-k-big": {"top_k": 2**31},
    "max-tokens-1": {"max_tokens": 1},
    "max-tokens-0": {"max_tokens": 0},
    "max-completion-tokens-0": {"max_completion_tokens": 0},
    "seed-max": {"seed": 2**63 - 1},
    "seed-over": {"seed": 2**63},
    "seed-float": {"seed": 1.0},
    "stop-four": {"stop": ["a", "b", "c", "d"]},
    "stop-64": {"stop": "y" * 64},
    "stop-list-of-int": {"stop": [1]},
    "stop-dict": {"stop": {"a": 1}},
    "min-p-0": {"min_p": 0},
    "min-p-over": {"min_p": 1.01},
    "presence-2": {"presence_penalty": -2},
    "presence-over": {"presence_penalty": 2.1},
    "frequency-bool": {"frequency_penalty": True},
    "repetition-2": {"repetition_penalty": 2},
    "repetition-0": {"repetition_penalty": 0},
    "min-tokens-3": {"min_tokens": 3},
    "min-tokens-float": {"min_tokens": 3.0},
    "ignore-eos": {"ignore_eos": True},
    "ignore-eos-int": {"ignore_eos": 1},
}


@pytest.mark.parametrize("fields", SAMPLING.values(), ids=SAMPLING.keys())
def test_sampling_checks_agree_with_the_runtime(fields: dict[str, Any]) -> None:
    """What the controller accepts, the invoker's SamplingParams accepts with the same values."""
    try:
        runtime = SamplingParams.from_request(fields, max_tokens_limit=2**31 - 1)
    except InvalidRequest as exc:
        with pytest.raises(InvalidRequest) as ours:
            parse_chat(_chat(**fields))
        assert ours.value.message.split()[0] == exc.message.split()[0]  # names the same field
        return
    params = parse_chat(_chat(**fields)).params
    for name, value in params.items():
        if name != "messages":
            assert getattr(runtime, name) == (tuple(value) if name == "stop" else value)


# ------------------------------------------------------------------------ streams
def _chunk(delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-a1b2",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "fn",
        "system_fingerprint": None,
        "choices": [{"index": 0, "delta": delta, **_end(finish_reason)}],
    }


def _end(finish_reason: str | None) -> dict[str, Any]:
    """A choice's tail: finishing chunks carry vLLM's stop_reason too (null unless a stop string)."""
    end = {"logprobs": None, "finish_reason": finish_reason}
    return {"stop_reason": None, **end} if finish_reason else end


def _feed(stream: CompletionStream, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk for event in events for chunk in stream.feed(event)]


def test_chat_stream_gives_openai_chunks_in_order() -> None:
    stream = CompletionStream("chat", "fn", "a1b2", 1700000000.7)
    chunks = _feed(stream, _events(["Hel", "", "lo", " wor", "ld"], finish_reason="eos"))
    assert chunks == [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "Hel"}),
        _chunk({"content": "lo"}),
        _chunk({"content": " wor"}),
        _chunk({"content": "ld"}),
        _chunk({}, "stop"),
    ]


def test_chat_stream_usage_chunk_only_with_include_usage() -> None:
    events = _events(["Hi", "!"], finish_reason="length")
    with_usage = _feed(
        CompletionStream("chat", "fn", "a1b2", 1700000000, include_usage=True), events
    )
    assert [c["usage"] for c in with_usage[:-1]] == [None] * (len(with_usage) - 1)
    last = with_usage[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}
    assert with_usage[-2]["choices"][0]["finish_reason"] == "length"
    without = _feed(CompletionStream("chat", "fn", "a1b2", 1700000000), events)
    assert len(without) == len(with_usage) - 1
    assert all("usage" not in c for c in without)


def test_completion_stream_gives_text_chunks() -> None:
    stream = CompletionStream("completion", "fn", "ff00", 1700000000, include_usage=True)
    chunks = _feed(stream, _events(["Once", " upon", ""], finish_reason="length"))

    def chunk(text: str, finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, **_end(finish_reason)}
        head = {"id": "cmpl-ff00", "object": "text_completion", "created": 1700000000}
        return {**head, "model": "fn", "choices": [choice], "usage": None}

    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    assert chunks == [
        chunk("Once"),
        chunk(" upon"),
        chunk("", "length"),
        {**chunk(""), "choices": [], "usage": usage},
    ]


def test_stream_ignores_unknown_events_and_sends_the_role_once() -> None:
    stream = CompletionStream("chat", "fn", "a1b2", 1700000000)
    assert stream.feed({"event": "migrated", "to": "invoker-2"}) == []
    first = stream.feed({"event": "start", "load": {}, "prompt_tokens": 1})
    assert first == [_chunk({"role": "assistant", "content": ""})]
    assert stream.feed({"event": "start", "load": {}, "prompt_tokens": 1}) == []


@pytest.mark.parametrize(
    ("code", "cls"),
    [
        ("invalid_request", InvalidRequest),
        ("overloaded", Overloaded),
        ("function_error", FunctionError),
        ("store_unavailable", StoreError),
        ("unavailable", Unavailable),
        ("something_new", PlatformError),
        (None, PlatformError),
    ],
    ids=["invalid", "overloaded", "function", "store", "unavailable", "unknown", "no-code"],
)
def test_error_event_raises_its_error(code: str | None, cls: type[SllmError]) -> None:
    stream = CompletionStream("chat", "fn", "a1b2", 1700000000)
    stream.feed({"event": "start", "load": {}, "prompt_tokens": 1})
    with pytest.raises(SllmError) as info:
        stream.feed({"event": "error", "error": {"code": code, "message": "CUDA OOM"}})
    assert type(info.value) is cls
    assert info.value.message == "CUDA OOM"


def test_error_event_without_details_is_a_platform_error() -> None:
    exc = error_from_event({"event": "error"})
    assert type(exc) is PlatformError
    assert exc.message


def test_sse_framing() -> None:
    assert sse({"a": "x\ny"}) == b'data: {"a":"x\\ny"}\n\n'
    assert SSE_DONE == b"data: [DONE]\n\n"
    frame = sse_error(Overloaded("too many requests"))
    assert frame.startswith(b"data: ") and frame.endswith(b"\n\n")
    assert json.loads(frame[6:]) == {
        "error": {
            "message": "too many requests",
            "type": "rate_limit_error",
            "param": None,
            "code": "overloaded",
        }
    }


# -------------------------------------------------------------- whole responses
def test_chat_completion_response() -> None:
    doc = completion_response("chat", "fn", "a1b2", 1700000000.9, "Hello", "eos", USAGE)
    assert doc == {
        "id": "chatcmpl-a1b2",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "fn",
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello"},
                "logprobs": None,
                "finish_reason": "stop",
                "stop_reason": None,
            }
        ],
        "usage": USAGE,
    }


def test_text_completion_response() -> None:
    doc = completion_response("completion", "fn", "ff", 1700000000, " upon", "length", USAGE)
    assert doc == {
        "id": "cmpl-ff",
        "object": "text_completion",
        "created": 1700000000,
        "model": "fn",
        "choices": [
            {
                "index": 0,
                "text": " upon",
                "logprobs": None,
                "finish_reason": "length",
                "stop_reason": None,
            }
        ],
        "usage": USAGE,
    }


VECTORS = [[0.1, -2.5, 3.0e-8, 1.0 / 3.0], [7.0, 0.0, -0.0, 1e30]]
EMBED_RESULT = {
    "data": [{"index": 1, "embedding": VECTORS[1]}, {"index": 0, "embedding": VECTORS[0]}],
    "usage": {"prompt_tokens": 6, "total_tokens": 6},
    "load": {"tier": "dram"},
}


def test_embeddings_response_float() -> None:
    doc = embeddings_response("emb", EMBED_RESULT, "float")
    assert doc == {
        "object": "list",
        "data": [
            {"object": "embedding", "index": 0, "embedding": VECTORS[0]},
            {"object": "embedding", "index": 1, "embedding": VECTORS[1]},
        ],
        "model": "emb",
        "usage": {"prompt_tokens": 6, "total_tokens": 6},
    }


def test_embeddings_response_base64_decodes_to_the_same_floats() -> None:
    doc = embeddings_response("emb", EMBED_RESULT, "base64")
    for item, vector in zip(doc["data"], VECTORS, strict=True):
        decoded = np.frombuffer(base64.b64decode(item["embedding"]), dtype="<f4")
        np.testing.assert_array_equal(decoded, np.array(vector, dtype=np.float32))


def test_models_responses() -> None:
    assert model_response("llama", 1700000000.5, "team-a") == {
        "id": "llama",
        "object": "model",
        "created": 1700000000,
        "owned_by": "team-a",
    }
    doc = models_response([("a", 1.0, "ns"), ("b", 2.0, "ns")])
    assert doc["object"] == "list"
    assert [m["id"] for m in doc["data"]] == ["a", "b"]
    assert models_response([]) == {"object": "list", "data": []}


def test_missing_usage_counts_are_zero() -> None:
    doc = completion_response("chat", "fn", "a1", 1700000000, "", "stop", {})
    assert doc["usage"] == {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    embeddings = embeddings_response("emb", {"data": []}, "float")
    assert embeddings["usage"] == {"prompt_tokens": 0, "total_tokens": 0}


@pytest.mark.parametrize(
    ("exc", "type_", "code"),
    [
        (InvalidRequest("bad"), "invalid_request_error", "invalid_request"),
        (PayloadTooLarge("big"), "invalid_request_error", "payload_too_large"),
        (Conflict("busy"), "invalid_request_error", "conflict"),
        (NotFound("function 'x' does not exist"), "invalid_request_error", "model_not_found"),
        (Unauthorized("no key"), "authentication_error", "unauthorized"),
        (Overloaded("later", retry_after=2), "rate_limit_error", "overloaded"),
        (FunctionError("oom"), "server_error", "function_error"),
        (Unavailable("draining"), "server_error", "unavailable"),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, SllmError) else None,
)
def test_error_body_has_openai_shape(exc: SllmError, type_: str, code: str) -> None:
    assert error_body(exc) == {
        "error": {"message": exc.message, "type": type_, "param": None, "code": code}
    }


def test_context_length_error_has_openais_code_and_param() -> None:
    assert error_body(ContextLengthExceeded("too long", param="messages")) == {
        "error": {
            "message": "too long",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }


# ------------------------------------------------ compatibility with the openai client
def _openai() -> Any:
    return pytest.importorskip("openai", reason="the openai client is not installed")


def test_openai_models_parse_our_chat_objects() -> None:
    from_openai = _openai().types.chat
    doc = completion_response("chat", "fn", "a1b2", 1700000000, "Hello", "length", USAGE)
    parsed = from_openai.ChatCompletion.model_validate(doc)
    assert parsed.choices[0].message.content == "Hello"
    assert parsed.choices[0].message.role == "assistant"
    assert parsed.choices[0].finish_reason == "length"
    assert parsed.usage is not None and parsed.usage.total_tokens == 8
    stream = CompletionStream("chat", "fn", "a1b2", 1700000000, include_usage=True)
    chunks = [
        from_openai.ChatCompletionChunk.model_validate(c)
        for c in _feed(stream, _events(["Hel", "lo", ""]))
    ]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 2


def test_openai_models_parse_our_other_objects() -> None:
    types = _openai().types
    doc = completion_response("completion", "fn", "ff", 1700000000, "Once", "stop", USAGE)
    assert types.Completion.model_validate(doc).choices[0].text == "Once"
    stream = CompletionStream("completion", "fn", "ff", 1700000000, include_usage=True)
    chunks = _feed(stream, _events(["a", "b"]))
    # The model types finish_reason as never null, yet OpenAI streams null until the
    # end (the client builds chunks without validating); so only the end validates.
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-2])
    assert types.Completion.model_validate(chunks[-2]).choices[0].finish_reason == "stop"
    assert types.Completion.model_validate(chunks[-1]).usage.completion_tokens == 1
    embeddings = types.CreateEmbeddingResponse.model_validate(
        embeddings_response("emb", EMBED_RESULT, "float")
    )
    assert embeddings.data[1].embedding == VECTORS[1]
    assert embeddings.usage.prompt_tokens == 6
    model = types.Model.model_validate(model_response("fn", 1700000000, "ns"))
    assert (model.id, model.created, model.owned_by) == ("fn", 1700000000, "ns")


class FakeController:
    """The adapter behind an in-memory transport, answering with a canned generation."""

    def __init__(self, texts: list[str], *, fail_midway: bool = False) -> None:
        self.texts = texts
        self.fail_midway = fail_midway
        self.requests: list[OpenAIRequest] = []

    def handle(self, path: str, body: Any) -> tuple[int, Any]:
        """(status, JSON document or SSE frames) for one request."""
        try:
            if path.endswith("/models"):
                return 200, models_response([("fn", 1700000000, "ns")])
            if path.endswith("/models/fn"):
                return 200, model_response("fn", 1700000000, "ns")
            if path.endswith("/models/nope"):
                raise NotFound("function 'nope' does not exist")
            parse = {
                "/chat/completions": parse_chat,
                "/completions": parse_completion,
                "/embeddings": parse_embedding,
            }
            request = next(p for suffix, p in parse.items() if path.endswith(suffix))(body)
        except SllmError as exc:
            return exc.status, error_body(exc)
        self.requests.append(request)
        if request.kind == "embedding":
            result = {"data": [{"index": 0, "embedding": VECTORS[0]}], "usage": USAGE}
            return 200, embeddings_response(request.function, result, request.encoding_format)
        events = _events(self.texts)
        if request.stream:
            return 200, self._frames(request, events)
        text = "".join(e["text"] for e in events if e["event"] == "token")
        doc = completion_response(
            request.kind, request.function, "a1b2", 1700000000, text, "eos", events[-1]["usage"]
        )
        return 200, doc

    def _frames(self, request: OpenAIRequest, events: list[dict[str, Any]]) -> Iterator[bytes]:
        stream = CompletionStream(
            request.kind, request.function, "a1b2", 1700000000, include_usage=request.include_usage
        )
        try:
            for i, event in enumerate(events):
                if self.fail_midway and i == 2:
                    event = {
                        "event": "error",
                        "error": {"code": "function_error", "message": "oom"},
                    }
                for chunk in stream.feed(event):
                    yield sse(chunk)
            yield SSE_DONE
        except SllmError as exc:
            yield sse_error(exc)


@pytest.fixture
def client_for() -> Callable[[FakeController], Any]:
    """An `openai.OpenAI` client whose HTTP goes to a FakeController in memory."""
    openai = _openai()
    # The transport must come from the HTTP library this openai version is built on.
    base = next(c for c in openai.DefaultHttpxClient.__mro__ if c.__module__.startswith("httpx"))
    httpx = importlib.import_module(base.__module__.split(".")[0])

    def make(controller: FakeController) -> Any:
        def handler(request: Any) -> Any:
            body = json.loads(request.content) if request.content else None
            status, doc = controller.handle(request.url.path, body)
            if isinstance(doc, dict):
                return httpx.Response(status, json=doc)
            headers = {"content-type": "text/event-stream"}
            return httpx.Response(status, headers=headers, content=b"".join(doc))

        http_client = httpx.Client(transport=httpx.MockTransport(handler))
        return openai.OpenAI(
            api_key="sk-test",
            base_url="http://sllm.test/v1",
            http_client=http_client,
            max_retries=0,
        )

    return make


def test_openai_client_chat(client_for: Callable[[FakeController], Any]) -> None:
    controller = FakeController(["Hel", "", "lo"])
    client = client_for(controller)
    reply = client.chat.completions.create(
        model="fn",
        messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        max_completion_tokens=8,
        temperature=0,
    )
    assert reply.id == "chatcmpl-a1b2"
    assert reply.choices[0].message.content == "Hello"
    assert reply.usage is not None and reply.usage.completion_tokens == 2
    assert controller.requests[0].params == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 8,
        "temperature": 0.0,
    }


def test_openai_client_chat_stream_with_usage(client_for: Callable[[FakeController], Any]) -> None:
    client = client_for(FakeController(["Hel", "lo", " there"]))
    chunks = list(
        client.chat.completions.create(
            model="fn",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello there"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 7


def test_openai_client_error_midway_through_a_stream(
    client_for: Callable[[FakeController], Any],
) -> None:
    openai = _openai()
    client = client_for(FakeController(["a", "b", "c"], fail_midway=True))
    stream = client.chat.completions.create(
        model="fn", messages=[{"role": "user", "content": "Hi"}], stream=True
    )
    with pytest.raises(openai.APIError, match="oom"):
        list(stream)


def test_openai_client_completions(client_for: Callable[[FakeController], Any]) -> None:
    controller = FakeController(["Once", " upon"])
    client = client_for(controller)
    assert client.completions.create(model="fn", prompt="Tell").choices[0].text == "Once upon"
    chunks = list(client.completions.create(model="fn", prompt=[1, 2], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "Once upon"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert controller.requests[1].params == {"tokens": [1, 2]}


def test_openai_client_embeddings(client_for: Callable[[FakeController], Any]) -> None:
    controller = FakeController([""])
    client = client_for(controller)
    default = client.embeddings.create(model="emb", input="hello")
    floats = client.embeddings.create(model="emb", input=["hello"], encoding_format="float")
    assert controller.requests[0].encoding_format == "base64"  # the client's default
    assert controller.requests[1].encoding_format == "float"
    expected = np.array(VECTORS[0], dtype=np.float32)
    np.testing.assert_array_equal(np.array(default.data[0].embedding, dtype=np.float32), expected)
    assert floats.data[0].embedding == VECTORS[0]


def test_openai_client_models_and_errors(client_for: Callable[[FakeController], Any]) -> None:
    openai = _openai()
    client = client_for(FakeController(["x"]))
    assert [m.id for m in client.models.list()] == ["fn"]
    assert client.models.retrieve("fn").owned_by == "ns"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("nope")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError, match="'n' must be an integer in") as bad:
        client.chat.completions.create(model="fn", messages=[{"role": "user", "content": "x"}], n=9)
    assert bad.value.type == "invalid_request_error"
