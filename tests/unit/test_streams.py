"""Streamed answers: the first event is awaited before the response starts, and a response
closed before it was read still ends the run."""

from __future__ import annotations

import json
from collections.abc import Generator
from types import SimpleNamespace
from typing import Any

import pytest

from sllm.controller._openai import CompletionStream
from sllm.controller._reconnect import Progress
from sllm.controller._streams import StartedEvents, sse_events, stream_response
from sllm.core.errors import ContextLengthExceeded

START = {"event": "start", "load": {}, "prompt_tokens": 1}
TOKEN = {"event": "token", "token": 7, "text": "Hi", "index": 1}
DONE = {"event": "done", "finish_reason": "length", "usage": {}}


def _run(events: list[dict[str, Any]], closed: list[str]) -> Generator[dict[str, Any], None, None]:
    try:
        yield from events
    finally:
        closed.append("closed")


def test_an_error_before_the_first_event_raises_before_any_byte() -> None:
    def failing() -> Generator[dict[str, Any], None, None]:
        raise ContextLengthExceeded("too long", param="messages")
        yield START  # a generator, failing at its first step as a run does

    with pytest.raises(ContextLengthExceeded):
        StartedEvents(failing())


def test_the_awaited_first_event_is_streamed_first() -> None:
    closed: list[str] = []
    events = StartedEvents(_run([START, TOKEN, DONE], closed))
    chunks = CompletionStream("completion", "fn", "a1", 1700000000)

    frames = list(sse_events(events, chunks, Progress("a1")))

    ids = [f.split(b"\n")[0] for f in frames[:-1]]
    data = [f.split(b"\n")[1] for f in frames[:-1]]
    texts = [json.loads(d[6:])["choices"][0]["text"] for d in data]
    assert texts == ["Hi", ""]
    assert ids == [b"id: a1:1", b"id: a1:1"]  # after the token, and at its end
    assert frames[-1] == b"data: [DONE]\n\n" and closed == ["closed"]


def test_a_response_closed_before_it_was_read_ends_the_run() -> None:
    closed: list[str] = []
    events = StartedEvents(_run([START, TOKEN, DONE], closed))
    chunks = CompletionStream("completion", "fn", "a1", 1700000000)
    run: Any = SimpleNamespace(id="a1")

    body = sse_events(events, chunks, Progress("a1"))
    response = stream_response(events, body, "text/event-stream", run)
    response.close()

    assert closed == ["closed"]
    assert response.headers["X-Activation-Id"] == "a1"
