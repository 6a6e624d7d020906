"""The relay: one activation's client stream, joined from the invoker streams that serve it.

A generation is served by one invoker stream at a time per choice ("source"),
and by several in turn when it moves: after its invoker is lost (a resume from
what was relayed) or in a planned switch (a live migration: the old source
ends the choice with "paused", a new one continues it). Token events carry
their choice and their index in that choice's output (1-based, counted from the
generation's start), so the join needs no clock and no guesswork:

    an event from a source that does not own its choice     dropped (a stale source)
    a token at an index already relayed (<= last)            dropped (a replay)
    a token at last + 1                                      relayed; last advances
    a token past last + 1                                    StreamGap (never skipped)
    finish "paused" / paused                                 not relayed: the choice
                                                             waits for a new source
    any other finish                                         relayed; the choice ends
    done                                                     relayed once every choice
                                                             ended (merged after a move)

Worked example, n = 1, the source dies after three tokens:

    attach("a#1")                            a#1 owns every choice
    a#1: start(states=[S]) t1 t2 t3          relayed: start t1 t2 t3
    lost("a#1") -> [0]                       choice 0 has no source
    state(0) = S with tokens + [t1, t2, t3] and t3's text_state as "text"
    attach("b#2", [0])                       the resume continues choice 0
    b#2: start(states=[state(0)]) t4 t5 finish done
                                             relayed: t4 t5 finish done (the
                                             resumed start is checked, not relayed)

The client's stream is start t1 t2 t3 t4 t5 finish done: no duplicate, no gap.
A state is the start state (tokens, prompt_len, params, sampler {"seed"}, text)
with the relayed tokens appended and the last relayed token's text state: the
sampler's draws are implied by the tokens (one per sampled token, none when
greedy), so a seeded generation continues exactly (see invoker/_stream.py).

Pure logic: events in, events out; `clock` is injected. The relay also keeps the
activation's move records (`moves`): each gets `pause_ms`, the gap its choice
showed the client (last event before it to first event after), once the choice's
next event is relayed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sllm.core.errors import PlatformError

Event = dict[str, Any]


class StreamGap(PlatformError):
    """An invoker stream skipped token indexes: relaying on would lose tokens."""

    status = 502
    code = "stream_gap"


class BadEvent(PlatformError):
    """An invoker event the relay cannot place (no such choice, no index, a foreign state)."""

    status = 502
    code = "bad_invoker_event"


@dataclass
class _Choice:
    base: dict[str, Any] | None  # its state at the generation's start (None: not resumable)
    last: int  # the index of the last token relayed (the base's generated count at first)
    owner: str | None
    tokens: list[int] = field(default_factory=list)  # relayed since the base
    text: dict[str, Any] | None = None  # the text state after the last relayed token
    end: tuple[Any, Any] | None = None  # (finish_reason, stop_reason) once relayed
    paused: dict[str, Any] | None = None  # the final state a pausing source handed over
    last_at: float = 0.0  # when its last event was relayed
    first_index: int = 0  # its `last` when the generation started (its base)


class Relay:
    """Joins the invoker streams of one activation (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._choices: list[_Choice] = []
        self._first: str | None = None
        self._starts: dict[str, list[int]] = {}  # later sources: the choices they continue
        self._start: Event | None = None
        self._started_at = 0.0
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None
        self.sources = 0  # how many sources were attached
        self.finished = False  # "done" was relayed
        self.moves: list[dict[str, Any]] = []
        self._pending: dict[int, list[tuple[dict[str, Any], float]]] = {}

    # ------------------------------------------------------------ sources
    @property
    def started(self) -> bool:
        """Whether the first start event was relayed (the client's stream began)."""
        return self._start is not None

    @property
    def n(self) -> int:
        """The number of choices (0 before the start)."""
        return len(self._choices)

    def attach(self, source: str, choices: Sequence[int] | None = None) -> None:
        """Let `source` serve `choices` (None: the first stream, every choice).

        Before the start a new first stream replaces the old one (a re-dispatch of
        work that never started). Afterwards each choice must be waiting for a
        source (lost, or paused): one owner per choice at any time.
        """
        if choices is None:
            if self.started:
                raise ValueError("the generation started: name the choices a source continues")
            self._first, self.sources = source, 1
            return
        self.sources += 1
        for c in choices:
            choice = self._choice(c)
            if choice.end is not None or choice.owner is not None:
                raise ValueError(f"choice {c} is not waiting for a source")
        for c in choices:
            self._choices[c].owner = source
        self._starts[source] = list(choices)

    def lost(self, source: str) -> list[int]:
        """`source` is gone: the unfinished choices it owned, now waiting for a source."""
        if not self.started and source == self._first:
            self._first = None
        orphaned = []
        for i, choice in enumerate(self._choices):
            if choice.owner == source and choice.end is None:
                choice.owner = None
                orphaned.append(i)
        self._starts.pop(source, None)
        return orphaned

    def unfinished(self) -> list[int]:
        """The choices that have not ended (none before the start)."""
        return [i for i, c in enumerate(self._choices) if c.end is None]

    def waiting(self) -> list[int]:
        """The unfinished choices without a source (lost or paused)."""
        return [i for i, c in enumerate(self._choices) if c.end is None and c.owner is None]

    def relayed(self, choice: int) -> int:
        """The index of the last token relayed for `choice` (its generated tokens so far)."""
        return self._choice(choice).last

    @property
    def resumable(self) -> bool:
        """Whether every choice's start state is known (the stream was resumable)."""
        return self.started and all(c.base is not None for c in self._choices)

    def state(self, choice: int) -> dict[str, Any]:
        """The state `choice` resumes from: its start state plus what was relayed since."""
        c = self._choice(choice)
        if c.base is None:
            raise BadEvent("the invoker's stream carried no start state: it cannot be resumed")
        state = copy.deepcopy(c.base)
        state["tokens"] = [*c.base["tokens"], *c.tokens]
        if c.text is not None:
            state["text"] = copy.deepcopy(c.text)
        return state

    def paused_state(self, choice: int) -> dict[str, Any] | None:
        """The final state the last source of `choice` handed over when it paused it."""
        return self._choice(choice).paused

    # ------------------------------------------------------------ events
    def feed(self, source: str, event: Event) -> list[Event]:
        """Take one event of `source`; the events to relay to the client (often one: the
        event itself, not a copy)."""
        kind = event.get("event")
        if kind == "start":
            return self._on_start(source, event)
        if not self.started:
            raise BadEvent(f"an invoker sent {kind!r} before its start event")
        if kind == "token":
            return self._on_token(source, event)
        if kind == "paused":
            c = self._owned(source, event)
            if c is not None:
                state = event.get("state")
                self._choices[c].paused = dict(state) if isinstance(state, Mapping) else None
            return []
        if kind == "finish":
            return self._on_finish(source, event)
        if kind == "done":
            return self._on_done(source, event)
        return []

    def done_event(self) -> Event:
        """The end of the client's stream, merged from what was relayed (every choice ended).

        For a stream whose last source ended without its own "done" (lost right after
        the last finish), and for every stream that moved: usage counts each choice's
        whole output, timing is what the client saw.
        """
        if self.unfinished():
            raise ValueError(f"choices {self.unfinished()} have not ended")
        self.finished = True
        start = self._start or {}
        prompt = start.get("prompt_tokens") or 0
        completion = sum(c.last for c in self._choices)
        steps = max((c.last - c.first_index for c in self._choices), default=0)
        now = self._clock()
        first, last = self._first_token_at, self._last_token_at
        load = start.get("load") or {}
        ends = [c.end or (None, None) for c in self._choices]
        return {
            "event": "done",
            "finish_reason": ends[0][0] if ends else None,
            "stop_reason": ends[0][1] if ends else None,
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
            "timing": {
                "load_s": float(load.get("load_seconds") or 0.0),
                "tpot_s": (last - first) / (steps - 1) if first and last and steps > 1 else 0.0,
                "total_s": now - self._started_at,
            },
            "choices": [
                {"index": i, "finish_reason": end[0], "stop_reason": end[1]}
                for i, end in enumerate(ends)
            ],
        }

    # ------------------------------------------------------------ moves
    def move(
        self, kind: str, choice: int, source: str, destination: str, reason: str, at: float
    ) -> dict[str, Any]:
        """Record that `choice` moves from `source` to `destination` (invoker names)."""
        c = self._choice(choice)
        record = {
            "kind": kind,
            "from": source,
            "to": destination,
            "at": at,
            "choice": choice,
            "tokens": c.last,
            "pause_ms": None,
            "reason": reason,
        }
        self.moves.append(record)
        self._pending.setdefault(choice, []).append((record, c.last_at))
        return record

    # ------------------------------------------------------------ internals
    def _choice(self, index: Any) -> _Choice:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.n:
            raise BadEvent(f"no choice {index!r} in a generation of {self.n}")
        return self._choices[index]

    def _owned(self, source: str, event: Mapping[str, Any]) -> int | None:
        """The event's choice if `source` serves it now, else None (a stale source)."""
        index = event.get("choice", 0)
        choice = self._choice(index)
        return index if choice.owner == source else None

    def _relayed(self, c: int) -> float:
        """Note that an event of choice `c` reaches the client now; fill pending pauses."""
        now = self._clock()
        for record, since in self._pending.pop(c, []):
            record["pause_ms"] = round((now - since) * 1000, 1)
        self._choices[c].last_at = now
        return now

    def _on_start(self, source: str, event: Event) -> list[Event]:
        states = event.get("states")
        if not self.started:
            if source != self._first:
                return []  # a first stream that was replaced before it started
            n = event.get("n", 1)
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise BadEvent(f"the start event's 'n' must be a positive integer, got {n!r}")
            resumable = isinstance(states, list) and len(states) == n
            now = self._clock()
            for i in range(n):
                base = _base(states[i]) if resumable else None  # type: ignore[index]
                done = base["done"] if base is not None else 0
                self._choices.append(
                    _Choice(
                        base=base["state"] if base is not None else None,
                        last=done,
                        owner=source,
                        last_at=now,
                        first_index=done,
                    )
                )
            self._start, self._started_at = event, now
            return [event]
        continued = self._starts.get(source)
        if continued is None:
            return []  # not a source of this generation (any more)
        if states is not None:  # a resumed stream starts where the relay stands: check it
            if not isinstance(states, list) or len(states) != len(continued):
                raise BadEvent(f"a resumed stream's start has {states!r:.80} for {continued}")
            for c, state in zip(continued, states, strict=True):
                tokens = state.get("tokens") if isinstance(state, Mapping) else None
                expected = self.state(c)["tokens"] if self._choices[c].base else None
                if expected is not None and tokens != expected:
                    raise BadEvent(
                        f"a resumed stream of choice {c} starts from {_count(tokens)} tokens, "
                        f"not the {len(expected)} relayed"
                    )
        return []

    def _on_token(self, source: str, event: Event) -> list[Event]:
        c = self._owned(source, event)
        if c is None:
            return []
        choice = self._choices[c]
        index = event.get("index")
        if isinstance(index, bool) or not isinstance(index, int):
            raise BadEvent(f"a token event of choice {c} has no index: {index!r}")
        if event.get("token") is None:  # text without a token: it belongs where we stand
            if index < choice.last or not event.get("text"):
                return []
            if index > choice.last:
                raise StreamGap(f"choice {c}: text at index {index} after token {choice.last}")
            self._relayed(c)
            return [event]
        if index <= choice.last:
            return []
        if index > choice.last + 1:
            raise StreamGap(
                f"choice {c} jumped from token {choice.last} to {index}: "
                f"{index - choice.last - 1} token(s) would be lost"
            )
        token = event["token"]
        if isinstance(token, bool) or not isinstance(token, int):
            raise BadEvent(f"choice {c}, token {index}: not a token id: {token!r}")
        choice.tokens.append(token)
        choice.last = index
        text_state = event.get("text_state")
        if isinstance(text_state, Mapping):
            choice.text = dict(text_state)
        now = self._relayed(c)
        if self._first_token_at is None:
            self._first_token_at = now
        self._last_token_at = now
        return [event]

    def _on_finish(self, source: str, event: Event) -> list[Event]:
        c = self._owned(source, event)
        if c is None:
            return []
        choice = self._choices[c]
        choice.owner = None  # this source is done with it either way
        if event.get("finish_reason") == "paused":
            return []  # continued by the next source (a planned switch)
        choice.end = (event.get("finish_reason"), event.get("stop_reason"))
        self._relayed(c)
        return [event]

    def _on_done(self, source: str, event: Event) -> list[Event]:
        # Whatever this source still owned without a finish now waits for another source.
        self.lost(source)
        if source == self._first:
            self._first = None
        if self.finished or self.unfinished():
            return []
        if self.sources == 1:
            self.finished = True
            return [event]  # one source: its own summary, as the invoker wrote it
        return [self.done_event()]


def _base(state: Any) -> dict[str, Any] | None:
    """A start state and its generated count, or None when it is not one."""
    if not isinstance(state, Mapping):
        return None
    tokens, prompt_len = state.get("tokens"), state.get("prompt_len")
    if not isinstance(tokens, list) or isinstance(prompt_len, bool):
        return None
    if not isinstance(prompt_len, int) or not 0 <= prompt_len <= len(tokens):
        return None
    return {"state": dict(state), "done": len(tokens) - prompt_len}


def _count(tokens: Any) -> Any:
    return len(tokens) if isinstance(tokens, list) else tokens
