"""Every choice of a generation moves together: one `Migration` per choice, one destination.

    move_together(migrations, gate)   each choice's Migration on a thread of its own; outcomes
    Gate                              where their final rounds meet (each one's `meet`)
    interleaved(streams)              the destination's streams of the moved choices, as one

A generation with n > 1 choices registers choice i as "{activation}.{i}" on its invoker
(invoker/_generations.py), so each choice migrates alone: its own state, hold, rounds,
pause and continue. They run at once, so their prefill rounds reach the destination
together and its batching engine prefills them in one pass. Their final rounds meet at
a `Gate`: each choice's pause on the source waits until every other choice reached its
own pause or ended its migration (aborted: it finished, or the destination failed), so
the choices are paused, recomputed and continued together, and the client's stream
switches every moved choice as soon as their final round is done (when the source's
stream ends: it ends once no choice is left on it).

Example, n = 2 at tokens 10 and 10: both hold on D; round 1 prefills prompt + 10 for
each in one pass while S makes 6 more of each; round 2 prefills those 6 (one pass)
while S makes 1 more; both reach the gate, S pauses each (one pass later, at most), D
continues both, and the relay reads D's two streams as one source. A choice that
finished on S meanwhile stays finished (its migration aborts: "the generation finished
on its source") and the other moves alone.

Caveats: `interleaved` reads one event of each stream in turn; D decodes the choices
in one batch, so they come at one pace, but a choice D preempts holds the others back
for as long as it is recomputed. A choice whose migration aborted while another moved
goes on on S, and the moved one's stream is read once S's stream ended.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import select

from sllm.db import Database, Invoker

from ._migration import Migration, Outcome, close_events

GATE_S = 10.0  # the longest a paused-to-be choice waits for the others (a round, at most)
DRAIN = "drain"  # the reason of a drain's migrations

Event = dict[str, Any]


class Gate:
    """Where the final rounds of one generation's choices meet (see the module docstring)."""

    def __init__(self, choices: Iterable[int], timeout: float = GATE_S) -> None:
        self._cond = threading.Condition()
        self._out = set(choices)  # still migrating, not at their final round yet
        self._timeout = timeout

    def arrive(self, choice: int) -> None:
        """`choice`'s final round is next: wait for the others (bounded)."""
        with self._cond:
            self._out.discard(choice)
            self._cond.notify_all()
            self._cond.wait_for(lambda: not self._out, self._timeout)

    def leave(self, choice: int) -> None:
        """`choice`'s migration ended (moved or not): nobody waits for it any more."""
        with self._cond:
            self._out.discard(choice)
            self._cond.notify_all()


def move_together(migrations: Sequence[Migration], gate: Gate) -> list[Outcome]:
    """Run every choice's migration at once; their outcomes, in the same order."""

    def one(migration: Migration) -> Outcome:
        try:
            return migration.run()
        finally:
            gate.leave(migration.choice)

    if len(migrations) == 1:
        return [one(migrations[0])]
    with ThreadPoolExecutor(len(migrations), thread_name_prefix="sllm-move") as pool:
        return list(pool.map(one, migrations))


def interleaved(streams: Sequence[Iterator[Event]]) -> Generator[Event, None, None]:
    """The destination's streams of several moved choices as one source: an event of each
    in turn, and one "done" once each ended with its own (the relay merges the usage).
    A stream that ends without its "done" ends this one too (the relay's loss path)."""
    live = list(streams)
    try:
        while live:
            for stream in list(live):
                ev = next(stream, None)
                if ev is None:
                    return
                if ev.get("event") == "done":
                    live.remove(stream)
                else:
                    yield ev
        yield {"event": "done"}
    finally:
        for stream in streams:
            close_events(stream)


def draining(db: Database, invoker_id: int) -> bool:
    """Whether the invoker is draining: a drain's request moves a generation off it, and
    one that runs elsewhere by now (moved already, or resumed) stays where it is."""
    with db.session(write=False) as s:
        state = s.execute(select(Invoker.state).where(Invoker.id == invoker_id)).scalar()
    return state == "draining"


def refused(source: str, to: str | None, choices: Sequence[int], reason: str) -> list[Event]:
    """The move records of a migration no invoker could take: one per choice."""
    at = time.time()
    return [
        {
            "kind": "migrate",
            "from": source,
            "to": to,
            "at": at,
            "choice": c,
            "reason": reason,
            "outcome": "refused",
            "error": "no invoker can take the generation",
        }
        for c in choices
    ]
