"""Live migration of a running generation: token-based, in rounds (DESIGN.md, "Live migration").

Source S decodes generation r; destination D gets an instance of r's function (a cold
start through its tiers like any other). Then:

    round 1     D is given r's state as S has it now and prefills its tokens, held (it
                does not decode); S keeps decoding meanwhile
    round i     the tokens S generated since the last round are sent; D computes only those
    final       S pauses r and hands over its final state (last tokens, sampler, held-back
                text, remaining budget); D recomputes the few tokens since the last round
                and continues decoding; the relay switches the client's stream from S to D

With `max_rounds` 0 there are no live rounds (stop-and-recompute, the naive baseline):
S pauses first, then D is given the final state and prefills all of it before it goes on,
so the client's pause is a prefill of the whole sequence.

Rounds go on while a round ends with at least `threshold` new tokens on S, up to
`max_rounds`: each round shrinks what the final round must recompute while the client
sees no pause, and the final round is the only pause the client sees. Example with
threshold 4, TPOT 30 ms and a prefill of 1,000 tokens taking 600 ms on D: round 1
prefills 1,000 tokens while S makes 20 more; round 2 prefills those 20 (about one
step) while S makes 1 more; 1 < 4, so the final round pauses S and D recomputes that one
token: the client sees roughly one step's gap, where stopping S first and recomputing
everything (stop-and-recompute) would show a 600 ms gap that grows with the prompt.

`next_move` is the pure decision (a round's outcome in, what to do next out), driven the
same way by the service, the tests and the simulator. `Migration` runs one migration over
a `Wire` (the invoker calls), so failures are handled in one place: D failing before the
final round aborts (r goes on on S as if nothing happened); after S has paused, the
final state is handed to the relay, which resumes r elsewhere as after an invoker loss.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from sllm.core.errors import SllmError

DEFAULT_THRESHOLD = 4  # tokens: a round that ends with fewer new tokens is the last
DEFAULT_MAX_ROUNDS = 4
DEFAULT_DEADLINE_S = 120.0  # the whole migration, load on D included


@dataclass(frozen=True)
class RoundPolicy:
    """When to stop sending rounds: see the module docstring."""

    threshold: int = DEFAULT_THRESHOLD
    max_rounds: int = DEFAULT_MAX_ROUNDS
    deadline_s: float = DEFAULT_DEADLINE_S


def next_move(
    new_tokens: int, rounds: int, elapsed_s: float, policy: RoundPolicy
) -> Literal["round", "final", "abort"]:
    """What follows a round that ended with `new_tokens` generated on S since it began.

    `rounds` counts the rounds done (the first included), `elapsed_s` the time since the
    migration began; with `rounds` 0 (before any round) the first round always runs,
    unless `max_rounds` is 0 (stop-and-recompute: straight to the final round). Past the
    deadline the migration is aborted, unless only the final round is left, which is
    bounded by the pause itself.

    Examples (threshold 4, 4 rounds): (20, 1, 0.7) -> "round"; (1, 2, 0.8) -> "final";
    (30, 4, 5.0) -> "final" (rounds used up); (30, 2, 200.0) -> "abort";
    (0, 0, 0.0) -> "round". With 0 rounds: (0, 0, 0.0) -> "final".
    """
    if rounds >= policy.max_rounds:
        return "final"
    if rounds == 0:
        return "round"
    if new_tokens < policy.threshold:
        return "final"
    if elapsed_s > policy.deadline_s:
        return "abort"
    return "round"


class Wire(Protocol):
    """The invoker calls one migration makes (controller/_invokers.py implements them)."""

    def state(self, url: str, gen_id: str) -> dict[str, Any]:
        """GET the generation's exported state from its invoker."""

    def hold(self, url: str, state: dict[str, Any], choice: int) -> Iterator[dict[str, Any]]:
        """Start a held copy of `state` on D: its event stream (a "start" event at once)."""

    def prefill(self, url: str, gen_id: str, tokens: list[int]) -> int:
        """Make D's held copy hold `tokens`; returns when computed (tokens it holds)."""

    def pause(self, url: str, gen_id: str) -> dict[str, Any]:
        """Pause the generation on S: its final state."""

    def resume(self, url: str, gen_id: str, state: dict[str, Any]) -> int:
        """Continue D's held copy from the final `state`: the tokens it recomputed."""

    def cancel(self, url: str, gen_id: str) -> None:
        """Drop D's held copy (an aborted migration)."""


@dataclass
class Outcome:
    """How one migration ended: the record for the activation and, if it moved, D's stream."""

    record: dict[str, Any]
    moved: bool = False
    events: Iterator[dict[str, Any]] | None = None  # D's stream, continuing after S's last
    final: dict[str, Any] | None = None  # S's final state when S paused but D did not go on


@dataclass
class Migration:
    """One generation's move from `source` to `dest` (invoker URLs), run once by `run`."""

    wire: Wire
    gen_id: str
    choice: int
    source: str  # invoker names, for the record
    dest: str
    source_url: str
    dest_url: str
    reason: str
    policy: RoundPolicy = field(default_factory=RoundPolicy)
    # Called before the final round: where the migrations of one generation's choices
    # meet, so they pause together (controller/_live.py `Gate`).
    meet: Callable[[], None] | None = None
    clock: Callable[[], float] = time.monotonic
    wall: Callable[[], float] = time.time

    def run(self) -> Outcome:
        """Rounds, then the final switch; never raises (the outcome says what happened)."""
        began, at = self.clock(), self.wall()
        record: dict[str, Any] = {
            "kind": "migrate",
            "from": self.source,
            "to": self.dest,
            "at": at,
            "choice": self.choice,
            "reason": self.reason,
            "rounds": 0,
            "tokens_recomputed": 0,
            "outcome": "aborted",
        }
        events: Iterator[dict[str, Any]] | None = None
        try:
            live = next_move(0, 0, 0.0, self.policy) == "round"
            state = self.wire.state(self.source_url, self.gen_id) if live else {}
            events = self.wire.hold(self.dest_url, state, self.choice) if live else None
            sent: list[int] = list(state.get("tokens", ()))
            held = 0  # tokens D's copy holds
            while live:
                began_round = len(sent)
                cached = self.wire.prefill(self.dest_url, self.gen_id, sent)
                record["rounds"] += 1
                record["tokens_recomputed"] += max(0, cached - held)
                held = cached
                now = self.wire.state(self.source_url, self.gen_id)
                if now.get("finished"):
                    return self._abort(record, events, "the generation finished on its source")
                current = list(now["tokens"])
                move = next_move(
                    len(current) - began_round, record["rounds"], self.clock() - began, self.policy
                )
                if move == "abort":
                    return self._abort(record, events, "the migration ran past its deadline")
                sent = current
                if move == "final":
                    break
        except SllmError as exc:
            return self._abort(record, events, f"before the switch: {exc.message}")
        # The final round: from here on, r runs in exactly one place.
        if self.meet is not None:
            self.meet()
        pause_began = self.clock()
        try:
            final = self.wire.pause(self.source_url, self.gen_id)
        except SllmError as exc:  # S ended it meanwhile (finished), or S is gone: no switch
            return self._abort(record, events, f"the source did not pause: {exc.message}")
        try:
            if events is None:  # stop-and-recompute: D gets the whole sequence only now
                events = self.wire.hold(self.dest_url, final, self.choice)
                tokens = list(final["tokens"])
                record["tokens_recomputed"] += self.wire.prefill(self.dest_url, self.gen_id, tokens)
            recomputed = self.wire.resume(self.dest_url, self.gen_id, final)
        except SllmError as exc:
            record.update(outcome="failed", error=f"the destination did not continue: {exc}")
            close_events(events)
            return Outcome(record, final=final)
        record["tokens_recomputed"] += recomputed
        record.update(
            outcome="moved",
            tokens=len(final["tokens"]) - int(final["prompt_len"]),
            switch_ms=(self.clock() - pause_began) * 1000,
            total_ms=(self.clock() - began) * 1000,
        )
        return Outcome(record, moved=True, events=events)

    def _abort(
        self, record: dict[str, Any], events: Iterator[dict[str, Any]] | None, why: str
    ) -> Outcome:
        record.update(outcome="aborted", error=why)
        if events is not None:
            with contextlib.suppress(SllmError):  # D is gone: nothing of r is left there
                self.wire.cancel(self.dest_url, self.gen_id)
            close_events(events)
        return Outcome(record)


def close_events(events: Iterator[dict[str, Any]] | None) -> None:
    close = getattr(events, "close", None)
    if close is not None:
        with contextlib.suppress(SllmError, OSError):  # closing a broken stream
            close()
