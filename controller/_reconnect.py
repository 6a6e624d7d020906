"""Streams that outlive a connection: event ids, and what a reconnecting client still lacks.

    Progress(activation_id)           what a client has: per choice, its last token's index
    progress.see(event); progress.event_id()    "{activation id}:{index}" after an event
    marks(have)                       a progress as ids write it ("12", "12.9")
    parse_event_id(value) / parse_from(value)   a reconnect's Last-Event-ID / ?from=
    missing(events, have)             the events a client that has `have` lacks

Every event of a generation's stream (native NDJSON: an "id" field; OpenAI SSE: the
`id:` line) carries the activation id and how far the client is once it has that event:
the index of the last token of each choice (1-based, 0 before the first), "a:12" for
one choice, "a:12.9" for two. A client that lost its connection sends the last id it
read as `Last-Event-ID` (or `?from=12` on GET .../activations/{id}/stream) and gets
every token after it, then the ends; the generation kept running on its invoker
meanwhile (invoker/_feed.py), and any controller process can attach to it (_attach).

Examples: parse_event_id("3f...e1:7") -> ("3f...e1", {0: 7});
parse_from("4.0") -> {0: 4, 1: 0}; a token event of choice 1 with index 1 is missing
for have = {0: 4, 1: 0}, one of choice 0 with index 3 is not.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

from sllm.core.errors import InvalidRequest
from sllm.core.messages import show_value

Event = dict[str, Any]
ACTIVATION_ID = re.compile(r"[0-9a-f]{32}")
_PROGRESS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9}){0,127}")


class Progress:
    """How far a client is in one generation's stream (see the module docstring)."""

    def __init__(self, activation_id: str, have: Mapping[int, int] | None = None) -> None:
        self.activation_id = activation_id
        self._have = dict(have or {0: 0})

    def start(self, n: int) -> None:
        """The stream has `n` choices (from its start event)."""
        for i in range(max(1, n)):
            self._have.setdefault(i, 0)

    def see(self, event: Mapping[str, Any]) -> None:
        """Count a token event the client is sent."""
        if event.get("event") == "token" and isinstance(event.get("index"), int):
            choice = int(event.get("choice") or 0)
            self._have[choice] = max(self._have.get(choice, 0), event["index"])

    def event_id(self) -> str:
        return f"{self.activation_id}:{marks(self._have)}"


def marks(have: Mapping[int, int]) -> str:
    """A progress as an event id writes it: {0: 12, 1: 9} -> "12.9" (a missing choice: 0)."""
    return ".".join(str(have.get(i, 0)) for i in range(max(have, default=0) + 1))


def parse_from(value: str, param: str = "from") -> dict[int, int]:
    """A progress ("12", or "12.9" per choice): {choice: last token index}."""
    if not _PROGRESS.fullmatch(value):
        raise InvalidRequest(
            f"{param!r} must be a token index (e.g. 12) or one per choice (12.9), "
            f"got {show_value(value)}",
            param=param,
        )
    return {i: int(v) for i, v in enumerate(value.split("."))}


def parse_event_id(value: str) -> tuple[str, dict[int, int]]:
    """A Last-Event-ID: the activation id and the client's progress."""
    activation_id, sep, marks = value.strip().partition(":")
    if not sep or not ACTIVATION_ID.fullmatch(activation_id):
        raise InvalidRequest(
            "Last-Event-ID must be an event id this API sent ('<activation id>:<token index>'),"
            f" got {show_value(value)}",
            param="Last-Event-ID",
        )
    return activation_id, parse_from(marks, "Last-Event-ID")


def missing(events: Iterator[Event], have: Mapping[int, int]) -> Iterator[Event]:
    """`events` less the tokens the client has (those at or below its index per choice)."""
    for ev in events:
        if ev.get("event") == "token":
            choice = int(ev.get("choice") or 0)
            index = ev.get("index")
            if isinstance(index, int) and index <= have.get(choice, 0):
                continue
        yield ev
