"""n choices, logprobs, stop_reason and echo in OpenAI responses, built from fed invoker events
(the event format of issue 11: token events name their choice; one finish event per choice)."""

from __future__ import annotations

import importlib
from typing import Any

import pytest

from sllm.controller._choices import Choices
from sllm.controller._openai import (
    CompletionStream,
    completion_response,
    parse_chat,
    parse_completion,
)

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def _events(n: int = 2, *, logprobs: bool = False) -> list[dict[str, Any]]:
    """Two interleaved choices: 0 writes "ab" and ends by eos; 1 writes "xy" and hits stop "!"."""
    events: list[dict[str, Any]] = [{"event": "start", "load": {}, "prompt_tokens": 3, "n": n}]
    for k, (a, b) in enumerate([("a", "x"), ("b", "y")], start=1):
        for choice, text in ((0, a), (1, b))[:n]:
            event = {"event": "token", "choice": choice, "index": k, "token": ord(text)}
            event["text"] = text
            if logprobs:
                event |= {"logprob": -0.5, "top_logprobs": [[ord(text), -0.5], [7, -1.5]]}
                event["token_text"] = text
            events.append(event)
    events.append({"event": "finish", "choice": 0, "finish_reason": "eos", "stop_reason": 2})
    if n > 1:
        events.append({"event": "finish", "choice": 1, "finish_reason": "stop", "stop_reason": "!"})
    ends = [
        {"index": 0, "finish_reason": "eos", "stop_reason": 2},
        {"index": 1, "finish_reason": "stop", "stop_reason": "!"},
    ][:n]
    events.append(
        {"event": "done", "finish_reason": "eos", "usage": USAGE, "timing": {}, "choices": ends}
    )
    return events


def _feed(stream: CompletionStream, events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [chunk for event in events for chunk in stream.feed(event)]


# -- requests -------------------------------------------------------------------------------------


def test_new_fields_travel_to_the_invoker_under_their_names() -> None:
    body = {
        "model": "fn",
        "messages": [{"role": "user", "content": "hi"}],
        "n": 3,
        "logprobs": True,
        "top_logprobs": 4,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "logit_bias": {"42": -100},
        "min_p": 0.05,
        "min_tokens": 2,
        "ignore_eos": True,
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
    }

    req = parse_chat(body)

    assert req.logprobs
    assert {k: v for k, v in req.params.items() if k != "messages"} == {
        "n": 3,
        "logprobs": 4,
        "presence_penalty": 0.5,
        "frequency_penalty": -0.5,
        "repetition_penalty": 1.1,
        "logit_bias": {"42": -100},
        "min_p": 0.05,
        "min_tokens": 2,
        "ignore_eos": True,
        "response_format": body["response_format"],
    }


def test_chat_logprobs_without_top_logprobs_asks_for_the_chosen_token_only() -> None:
    req = parse_chat(
        {"model": "fn", "messages": [{"role": "user", "content": "x"}], "logprobs": True}
    )

    assert req.params["logprobs"] == 0


@pytest.mark.parametrize(
    "fields",
    [
        {"response_format": {"type": "json_object"}},
        {"guided_json": {"type": "integer"}},
        {"guided_regex": "[0-9]+"},
        {"guided_choice": ["a", "b"]},
        {"guided_grammar": 'start: "a"'},
    ],
    ids=["json-object", "guided-json", "guided-regex", "guided-choice", "guided-grammar"],
)
def test_structured_output_is_accepted_on_completions_too(fields: dict[str, Any]) -> None:
    req = parse_completion({"model": "fn", "prompt": "x", **fields})

    assert all(req.params[k] == v for k, v in fields.items())


def test_response_format_text_is_no_constraint() -> None:
    req = parse_completion({"model": "fn", "prompt": "x", "response_format": {"type": "text"}})

    assert "response_format" not in req.params


def test_echo_keeps_the_prompt_text_for_the_response() -> None:
    req = parse_completion({"model": "fn", "prompt": "Once", "echo": True})

    assert req.echo == "Once"
    assert "echo" not in req.params


# -- streams --------------------------------------------------------------------------------------


def test_chat_stream_with_two_choices() -> None:
    chunks = _feed(CompletionStream("chat", "fn", "id", 0), _events())

    by_choice: dict[int, list[dict[str, Any]]] = {0: [], 1: []}
    for chunk in chunks:
        (choice,) = chunk["choices"]
        by_choice[choice["index"]].append(choice)
    for i, text, stop in ((0, "ab", None), (1, "xy", "!")):
        choices = by_choice[i]
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content", "") for c in choices) == text
        assert choices[-1]["finish_reason"] == "stop"
        assert choices[-1]["stop_reason"] == stop
        assert [c["finish_reason"] for c in choices].count("stop") == 1


def test_chat_stream_logprobs_in_openai_form() -> None:
    chunks = _feed(
        CompletionStream("chat", "fn", "id", 0, logprobs=True), _events(1, logprobs=True)
    )

    content = [c["choices"][0] for c in chunks if c["choices"][0].get("logprobs")]
    assert [c["logprobs"]["content"][0]["token"] for c in content] == ["a", "b"]
    entry = content[0]["logprobs"]["content"][0]
    assert entry == {
        "token": "a",
        "logprob": -0.5,
        "bytes": [97],
        "top_logprobs": [
            {"token": "a", "logprob": -0.5, "bytes": [97]},
            {"token": "token_id:7", "logprob": -1.5, "bytes": list(b"token_id:7")},
        ],
    }


def test_completion_stream_logprobs_and_offsets() -> None:
    stream = CompletionStream("completion", "fn", "id", 0, logprobs=True)
    chunks = _feed(stream, _events(1, logprobs=True))

    logprobs = [c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]]
    assert [lp["tokens"] for lp in logprobs] == [["a"], ["b"]]
    assert [lp["text_offset"] for lp in logprobs] == [[0], [1]]
    assert logprobs[0]["top_logprobs"] == [{"a": -0.5, "token_id:7": -1.5}]


def test_completion_stream_echo_comes_first_for_each_choice() -> None:
    stream = CompletionStream("completion", "fn", "id", 0, echo="Once ")
    chunks = _feed(stream, _events())

    texts: dict[int, str] = {0: "", 1: ""}
    for chunk in chunks:
        choice = chunk["choices"][0]
        texts[choice["index"]] += choice["text"]
    assert texts == {0: "Once ab", 1: "Once xy"}


def test_stream_of_an_older_invoker_without_finish_events_still_ends() -> None:
    events = [
        {"event": "start", "load": {}, "prompt_tokens": 1},
        {"event": "token", "token": 5, "text": "hi", "index": 1},
        {"event": "done", "finish_reason": "length", "usage": USAGE},
    ]

    chunks = _feed(CompletionStream("chat", "fn", "id", 0), events)

    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, "length"]


# -- whole responses ------------------------------------------------------------------------------


def _result(events: list[dict[str, Any]]) -> dict[str, Any]:
    choices = Choices()
    for event in events:
        choices.feed(event)
    return choices.result("eos", USAGE)


def test_choices_gather_each_choices_text_and_end() -> None:
    result = _result(_events(logprobs=True))

    assert result["text"] == "ab"
    assert [(c["index"], c["text"], c["finish_reason"]) for c in result["choices"]] == [
        (0, "ab", "eos"),
        (1, "xy", "stop"),
    ]
    assert [e["token"] for e in result["choices"][1]["logprobs"]] == [ord("x"), ord("y")]


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_whole_response_has_n_choices_with_logprobs(kind: str) -> None:
    result = _result(_events(logprobs=True))

    doc = completion_response(
        kind, "fn", "id", 0, result["text"], "eos", USAGE, choices=result["choices"], logprobs=True
    )

    assert [c["index"] for c in doc["choices"]] == [0, 1]
    assert [c["stop_reason"] for c in doc["choices"]] == [None, "!"]
    first = doc["choices"][0]["logprobs"]
    if kind == "chat":
        assert [e["token"] for e in first["content"]] == ["a", "b"]
    else:
        assert first["tokens"] == ["a", "b"]
        assert first["text_offset"] == [0, 1]


def test_whole_completion_with_echo() -> None:
    doc = completion_response("completion", "fn", "id", 0, " upon", "length", USAGE, echo="Once")

    assert doc["choices"][0]["text"] == "Once upon"


def _openai() -> Any:
    return pytest.importorskip("openai")


def test_openai_models_parse_n_choices_and_logprobs() -> None:
    _openai()
    types = importlib.import_module("openai.types")
    chat_types = importlib.import_module("openai.types.chat")
    result = _result(_events(logprobs=True))
    chat = completion_response(
        "chat", "fn", "id", 0, "", "eos", USAGE, choices=result["choices"], logprobs=True
    )
    text = completion_response(
        "completion", "fn", "id", 0, "", "eos", USAGE, choices=result["choices"], logprobs=True
    )

    parsed = chat_types.ChatCompletion.model_validate(chat)
    assert [c.message.content for c in parsed.choices] == ["ab", "xy"]
    assert parsed.choices[0].logprobs.content[1].top_logprobs[1].logprob == -1.5
    completion = types.Completion.model_validate(text)
    assert completion.choices[1].logprobs.tokens == ["x", "y"]
    chunks = _feed(CompletionStream("chat", "fn", "id", 0, logprobs=True), _events(logprobs=True))
    for chunk in chunks:
        chat_types.ChatCompletionChunk.model_validate(chunk)


# -- the native API -------------------------------------------------------------------------------


def test_native_invocations_take_the_new_fields() -> None:
    from sllm.controller._functions import check_invocation_keys
    from sllm.runtime import SamplingParams

    params = {
        "prompt": "x",
        "n": 2,
        "logprobs": 3,
        "min_p": 0.1,
        "presence_penalty": 1,
        "frequency_penalty": 1,
        "repetition_penalty": 1.2,
        "logit_bias": {"5": 1},
        "ignore_eos": True,
        "min_tokens": 1,
        "guided_regex": "[a-z]+",
    }

    check_invocation_keys("generate", params)
    parsed = SamplingParams.from_request(params, max_tokens_limit=64)
    assert parsed.logprobs == 3
    assert parsed.response_format is not None
