"""Streamed answers: a run's events as NDJSON (native API) or SSE (OpenAI), first event first.

    StartedEvents(run events)                       the events, the first one already awaited
    stream_response(events, chunks, mimetype, run)  the streaming Response
    native_events(events, run) / sse_events(events, chunks)   the bytes of each protocol

The first event is awaited before the response starts, so that anything that fails
before it (a prompt longer than the context, an unknown model, no capacity) is a plain
HTTP error status: a client such as the official `openai` one sees a 400, not a 200
whose stream carries an error. Failures after it are events inside the stream.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterator
from typing import Any

from flask import Response

from sllm.core.errors import SllmError

from . import _openai as oai
from ._activations import Run
from ._reconnect import Progress

Event = dict[str, Any]
_LOGPROB_KEYS = ("token", "logprob", "top_logprobs", "token_text")


class StartedEvents:
    """A run's events with the first one already awaited (the model loaded, the prompt
    checked and prefilled), so that an error before it is still an HTTP error status
    instead of an error inside a 200 stream. The wait is what a blocking request waits."""

    def __init__(self, events: Generator[Event, None, None]) -> None:
        self._events = events
        first = next(events, None)  # an SllmError raised here reaches the error handler
        self._first = [] if first is None else [first]

    def __iter__(self) -> StartedEvents:
        return self

    def __next__(self) -> Event:
        return self._first.pop() if self._first else next(self._events)

    def close(self) -> None:
        """End the run's events (a client went away): the activation is stored, slot freed."""
        self._first = []
        self._events.close()


def stream_response(
    events: StartedEvents, chunks: Iterator[bytes], mimetype: str, run: Run
) -> Response:
    response = Response(chunks, mimetype=mimetype)
    # A client gone before the first chunk is read never runs `chunks`; this still ends
    # the generation (and frees its slot) at once.
    response.call_on_close(events.close)
    response.headers["X-Activation-Id"] = run.id
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"
    return response


def native_events(
    events: StartedEvents, run: Run, progress: Progress | None = None
) -> Iterator[bytes]:
    """The native stream: NDJSON start / token* / done, or a final error line; every line
    has an "id" a client reconnects from (see _reconnect)."""
    progress = progress or Progress(run.id)
    try:
        for ev in events:
            kind = ev.get("event")
            progress.see(ev)
            if kind == "start":
                progress.start(ev.get("n") or 1)
                out = {
                    "event": "start",
                    "activationId": run.id,
                    "invoker": run.invoker,
                    "load": ev.get("load"),
                }
                if ev.get("reattached"):
                    out["reattached"] = True
            elif kind == "token":
                out = {
                    "event": "token",
                    "choice": ev.get("choice", 0),
                    "text": ev.get("text", ""),
                    "index": ev.get("index"),
                }
                out.update((k, ev[k]) for k in _LOGPROB_KEYS if ev.get(k) is not None)
            elif kind == "finish":
                out = {k: ev.get(k) for k in ("event", "choice", "finish_reason", "stop_reason")}
            elif kind == "done":
                out = {
                    "event": "done",
                    "activationId": run.id,
                    "finish_reason": ev.get("finish_reason"),
                    "stop_reason": ev.get("stop_reason"),
                    "usage": ev.get("usage"),
                }
                if ev.get("choices"):
                    out["choices"] = ev["choices"]
            else:
                continue
            out["id"] = progress.event_id()
            yield (json.dumps(out) + "\n").encode()
    except SllmError as exc:
        yield (
            json.dumps({"event": "error", "activationId": run.id, **exc.to_json()}) + "\n"
        ).encode()
    finally:
        events.close()


def sse_events(
    events: StartedEvents,
    chunks: oai.CompletionStream,
    progress: Progress,
    *,
    reconnected: bool = False,
) -> Iterator[bytes]:
    """The OpenAI stream: SSE chunks, then [DONE]; an error mid-stream is an error event.
    Every chunk has an id: a client reconnects from it with Last-Event-ID (_reconnect);
    a reconnected stream does not repeat the first chunks (the role) it already had."""
    try:
        for ev in events:
            progress.see(ev)
            out = chunks.feed(ev)
            if ev.get("event") == "start":
                progress.start(ev.get("n") or 1)
                if reconnected:
                    continue
            for chunk in out:
                yield oai.sse(chunk, progress.event_id())
        yield oai.SSE_DONE
    except SllmError as exc:
        yield oai.sse_error(exc)
    finally:
        events.close()
