"""One generation's stream from its invokers to the client, resumed when an invoker is lost.

    GenerationStream(...).events(slot, body, deadline)   the client's events (start,
                                                         token..., finish per choice, done)

Every generation, blocking ones included, is streamed from its invoker with
`"resumable": true` (invoker/_stream.py): the start event carries each choice's
start state and every token event its text state, so what the controller relayed
is enough to continue elsewhere without asking the lost invoker anything. The
events go through a `Relay` (_relay), which joins the sources by token index.

States of one generation (data: the relay, the slot held, the choices waiting):

    streaming(source) --done, every choice ended--------------------> finished
    streaming(source) --lost: refused, reset, cut short, stalled-----> waiting(choices)
    streaming(source) --done with choices paused (a planned switch)--> waiting(choices)
    waiting --a slot (Dispatcher.acquire, avoiding the lost invoker)--> streaming(new
              source: POST /v1/generations {state, choice, resumable}, one choice
              at a time, lowest first)
    waiting --on_invoker_loss "fail" / attempts or deadline used up--> invoker_lost

A loss before the start event reached the client is not handled here: execute()
re-dispatches the request from scratch, as before (nothing was relayed).

Detection: a killed invoker's sockets are closed by its kernel, so the read fails at
once (milliseconds); a peer that stays connected but silent is lost after
`stall_timeout` (see ControllerConfig). The lost invoker is avoided while it has not
heartbeat since the loss, so a restarted one is used again when no other can serve.
Caveat: with n > 1 choices, the choices of a lost stream resume one after another (a
resumed stream carries one choice), so later choices pause longer.

A live migration is the same join (see _migration, _live): the source pauses each
choice ("paused", finish "paused", done), so the choices wait, and their next source is
the destination's stream (one per choice, read as one), attached with
`relay.attach(source, choices)` and recorded with `relay.move("migrate", ...)` per
choice, in place of a new dispatch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from sllm.core.errors import Conflict, NotFound, Overloaded, SllmError, Unavailable
from sllm.db import Function, Invoker

from ._activations import Run
from ._choices import Choices, partial_result
from ._config import ControllerConfig
from ._dispatch import DeadlineExceeded, Dispatcher, Slot, StaleFunction, instance_body
from ._invokers import InvokerClient, InvokerLost
from ._live import DRAIN, Gate, draining, interleaved, move_together, refused
from ._metrics import ControllerMetrics
from ._migration import Migration, Outcome, RoundPolicy, close_events
from ._migration_wire import InvokerWire
from ._relay import Relay

log = logging.getLogger("sllm.controller")

Event = dict[str, Any]
AVOID_RECHECK_S = 1.0  # how often a wait for a slot looks whether a lost invoker is back
CANCEL_TIMEOUT_S = 5.0  # a stalled source's generations are cancelled, best effort


class TimedOut(SllmError):
    """The function ran past its time limit."""

    status = 504
    code = "timeout"


@dataclass(frozen=True)
class _Waiting:
    """Why a choice waits for a source, and where it was."""

    reason: str  # unreachable | broken | stalled | unavailable | overloaded | conflict | paused
    invoker: str
    invoker_id: int


class GenerationStream:
    """The relay of one generation run (see the module docstring); `slot` is the slot it
    holds now (None after it gave one up), for the caller to release at the end."""

    def __init__(
        self,
        *,
        config: ControllerConfig,
        invokers: InvokerClient,
        dispatcher: Dispatcher,
        metrics: ControllerMetrics,
        run: Run,
        fn: Function,
        text: Choices,
        refresh: Callable[[], Function],
    ) -> None:
        self.config = config
        self.invokers = invokers
        self.dispatcher = dispatcher
        self.metrics = metrics
        self.run = run
        self.fn = fn
        self.text = text
        self._refresh = refresh
        self.relay = Relay()
        self.run.moves = self.relay.moves
        self.slot: Slot | None = None
        self._sources = 0
        self._waiting: dict[int, _Waiting] = {}
        self._tries: dict[int, int] = {}
        self._avoid: dict[int, float] = {}  # invoker id -> when it was lost (epoch s)
        self._resuming = False  # the current source is a resume that sent no start yet
        # A live migration under way: its outcome, and the destination's slot.
        self._moving: tuple[Future[list[Outcome]], Slot] | None = None

    @property
    def started(self) -> bool:
        """Whether the client's stream began (a loss from now on is resumed, not retried)."""
        return self.relay.started

    def events(
        self, slot: Slot, body: Mapping[str, Any], deadline: float
    ) -> Generator[Event, None, None]:
        """The client's events of the generation `body` asks `slot`'s invoker for."""
        self.slot = slot
        source = self._source(slot)
        self.relay.attach(source)
        stream = self.invokers.stream(
            slot.url,
            {**body, "resumable": True},
            _left(deadline),
            stall=self.config.stall_timeout,
        )
        yield from self._follow(source, slot, stream, deadline)

    def reattach(
        self,
        replays: Sequence[tuple[str, Generator[Event, None, None]]],
        live: tuple[Slot, Generator[Event, None, None]] | None,
        deadline: float,
    ) -> Generator[Event, None, None]:
        """The events of a generation another controller process relayed (a client
        reconnecting, see _attach): `replays` are the whole streams of its ended invoker
        streams (invoker name, events), oldest first, then `live` is the stream it runs on
        now, read from its start; with no live stream, a choice a replay left paused
        resumes elsewhere (a migration whose controller died after the pause)."""
        for name, stream in replays:
            source = f"{name}#{self._sources + 1}"
            self._sources += 1
            self._attach_replayed(source)
            for ev in _skip_held_start(stream, self.relay.started):
                for out in self.relay.feed(source, ev):
                    yield self._account(out)
            self.relay.lost(source)  # a replay that stopped short: its choices wait
        if live is not None:
            slot, stream = live
            self.slot = slot
            source = self._source(slot)
            self._attach_replayed(source)
            yield from self._follow(source, slot, stream, deadline, held_start=True)
            return
        if self.relay.finished or not self.relay.started:
            return
        for c in self.relay.unfinished():
            name = replays[-1][0] if replays else "?"
            self._waiting.setdefault(c, _Waiting("paused", name, 0))
        yield from self._follow(*self._resume(deadline), deadline)

    def _attach_replayed(self, source: str) -> None:
        if not self.relay.started:
            self.relay.attach(source)
        else:
            self.relay.attach(source, self.relay.waiting() or self.relay.unfinished())

    def _follow(
        self,
        source: str,
        slot: Slot,
        stream: Generator[Event, None, None],
        deadline: float,
        *,
        held_start: bool = False,
    ) -> Generator[Event, None, None]:
        """Relay `stream`, then each next source, until every choice ended. Ended by an
        error (the time limit, a broken stream), the generation is cancelled where it runs:
        only a client that goes away (GeneratorExit) leaves it running for a reconnect."""
        try:
            yield from self._sources_of(source, slot, stream, deadline, held_start)
        except SllmError:
            if self.slot is not None and self.relay.started:
                ids = [self._generation(c) for c in self.relay.unfinished()]
                threading.Thread(
                    target=self._cancel, args=(self.slot.url, ids), daemon=True
                ).start()
            raise

    def _sources_of(
        self,
        source: str,
        slot: Slot,
        stream: Generator[Event, None, None],
        deadline: float,
        held_start: bool,
    ) -> Generator[Event, None, None]:
        if held_start:
            stream = _skip_held_start(stream, self.relay.started)
        while True:
            try:
                yield from self._pump(source, slot, stream, deadline)
            except InvokerLost as exc:
                if not self.relay.started:
                    raise  # nothing reached the client: execute() dispatches it again
                if time.monotonic() >= deadline:
                    raise TimedOut(
                        f"function {self.fn.name!r} ran past its {self.fn.timeout_s:g} s limit"
                    ) from exc
                self._lost(source, slot, exc.reason, exc.message)
            except (Overloaded, Unavailable, Conflict) as exc:
                if not self.relay.started:
                    raise
                # A destination that cannot take the resume (full, shutting down, or still
                # running the generation it was lost from): another, or it again later.
                reason = {Overloaded: "overloaded", Conflict: "conflict"}.get(
                    type(exc), "unavailable"
                )
                self._lost(source, slot, reason, exc.message)
                time.sleep(0.05)
            else:
                if self.relay.finished:
                    return
                self._ended(slot)
            finally:
                stream.close()
            if not self.relay.unfinished():  # every choice ended; the last "done" was lost
                yield self._account(self.relay.done_event())
                return
            source, slot, stream = self._resume(deadline)

    # ------------------------------------------------------------ one source
    def _pump(
        self,
        source: str,
        slot: Slot,
        stream: Generator[Event, None, None],
        deadline: float,
    ) -> Generator[Event, None, None]:
        """Relay `stream` to its end; InvokerLost if it ends without its "done"."""
        ended = False
        for ev in stream:
            kind = ev.get("event")
            if kind == "start":
                self._on_start(slot, ev)
            ended = ended or kind == "done"
            for out in self.relay.feed(source, ev):
                yield self._account(out)
            if time.monotonic() > deadline and not self.relay.finished:
                raise TimedOut(
                    f"function {self.fn.name!r} ran past its {self.fn.timeout_s:g} s limit"
                )
        if not ended:
            raise InvokerLost(f"invoker {slot.invoker} ended the stream before its end")

    def _on_start(self, slot: Slot, ev: Mapping[str, Any]) -> None:
        load = ev.get("load") or {}
        cold = bool(load.get("cold"))
        tier = load.get("tier") if cold else "gpu"
        load_ms = float(load.get("load_seconds", 0.0)) * 1000 if cold else 0.0
        if not self.relay.started:
            self.run.started(dict(ev))
        elif self._resuming:
            self._resuming = False
            how = f"cold from {tier}, load {load_ms / 1000:.3f} s" if cold else "warm"
            self.run.log(f"resumed on {slot.invoker} ({how})")
            self.metrics.resumes.labels("resumed").inc()
        if slot.loading:
            self.dispatcher.loaded(slot, tier if cold else None, load_ms if cold else None)
        self.metrics.observe_start(tier or "gpu", cold)

    def _account(self, ev: Event) -> Event:
        """Record a relayed event in the run (first token, text, outcome); return it."""
        run, kind = self.run, ev.get("event")
        if kind == "token":
            run.first_token()
            self.text.feed(ev)
        elif kind == "finish":
            self.text.feed(ev)
        elif kind == "done":
            usage = ev.get("usage") or {}
            timing = ev.get("timing") or {}
            run.tokens_out = usage.get("completion_tokens")
            run.tpot_ms = float(timing.get("tpot_s") or 0.0) * 1000
            self.text.feed(ev)
            run.result = partial_result(run, self.text, ev.get("finish_reason"), usage)
            run.finish("success")
        return ev

    # ------------------------------------------------------------ losses
    def _lost(self, source: str, slot: Slot, reason: str, message: str) -> None:
        """`source` is gone: its unfinished choices wait; its slot is given up."""
        choices = self.relay.lost(source)
        if self._resuming:  # a resume that failed before its destination started
            self._resuming = False
            self.metrics.resumes.labels("failed").inc()
        tokens = ", ".join(f"choice {c} at token {self.relay.relayed(c)}" for c in choices)
        self.run.log(f"{message} ({reason}; {tokens or 'every choice had ended'})")
        log.warning("activation %s: %s (%s)", self.run.id, message, reason)
        for c in choices:
            self._waiting[c] = _Waiting(reason, slot.invoker, slot.invoker_id)
            if reason == "overloaded":  # not the generation's fault: no attempt spent
                self._tries[c] = max(0, self._tries.get(c, 0) - 1)
        for c in self.relay.waiting():  # paused by it (a migration's switch) before the loss
            self._waiting.setdefault(c, _Waiting("paused", slot.invoker, slot.invoker_id))
        self._avoid[slot.invoker_id] = time.time()
        if reason in ("overloaded", "unavailable", "conflict"):
            self.dispatcher.free(slot)  # it answered: its instance is there, only busy or going
        else:
            # Gone, or wedged: forget its instance (a new one may be placed elsewhere at
            # once); one that comes back unloads it as an orphan. A stalled one may still
            # run the generation: cancel it, in the background (it may not answer at all).
            self.dispatcher.drop(slot)
            if reason == "stalled":
                ids = [self._generation(c) for c in choices]
                threading.Thread(
                    target=self._cancel, args=(slot.url, ids), daemon=True, name="sllm-cancel"
                ).start()
        self.slot = None

    def _ended(self, slot: Slot) -> None:
        """The source ended cleanly with choices left (paused: a planned switch)."""
        for c in self.relay.waiting():
            self._waiting.setdefault(c, _Waiting("paused", slot.invoker, slot.invoker_id))
        # Off the switch's path: the client waits for the destination's first token now.
        threading.Thread(target=self.dispatcher.free, args=(slot,), daemon=True).start()
        self.slot = None

    def _resume(self, deadline: float) -> tuple[str, Slot, Generator[Event, None, None]]:
        """A new source for the lowest waiting choice; InvokerLost when there can be none."""
        choice = min(self._waiting)
        why = self._waiting[choice]
        moved = self._migrated(deadline)  # a migration's switch, or its source lost meanwhile
        if moved is not None:
            return moved
        at = self.relay.relayed(choice)
        lost = (
            f"choice {choice} was paused on {why.invoker} at token {at}"
            if why.reason == "paused"
            else f"invoker {why.invoker} was lost at token {at} ({why.reason})"
        )
        if why.reason != "paused" and self.fn.on_invoker_loss == "fail":
            self.metrics.resumes.labels("refused").inc()
            raise InvokerLost(f"{lost}; function {self.fn.name!r} does not resume")
        if not self.relay.resumable:
            raise InvokerLost(f"{lost}; its stream carried no state to resume")
        tries = self._tries.get(choice, 0)
        if tries >= self.config.resume_attempts:
            self.metrics.resumes.labels("exhausted").inc()
            raise InvokerLost(f"{lost}; resumed {tries} time(s), the limit")
        slot = self._acquire(deadline, lost)
        self.slot = slot
        self._tries[choice] = tries + 1
        self.run.dispatched(slot.invoker)
        self.relay.move("resume", choice, why.invoker, slot.invoker, why.reason, time.time())
        del self._waiting[choice]
        source = self._source(slot)
        self.relay.attach(source, [choice])
        self._resuming = True
        body = {
            **instance_body(self.run.namespace, self.fn, slot),
            "activation": self._generation(choice),
            "state": self.relay.state(choice),
            "choice": choice,
            "resumable": True,
        }
        self.run.log(
            f"resuming choice {choice} on {slot.invoker} from token {self.relay.relayed(choice)}"
        )
        stream = self.invokers.stream(
            slot.url,
            body,
            _left(deadline),
            path="/v1/generations",
            stall=self.config.stall_timeout,
        )
        return source, slot, stream

    def _acquire(self, deadline: float, lost: str) -> Slot:
        """A slot through the normal dispatch path, avoiding each lost invoker until it
        heartbeats again (a restarted one is back; a dead one stays avoided)."""
        while True:
            avoid = [i for i, at in self._avoid.items() if not self.dispatcher.heard_from(i, at)]
            until = min(deadline, time.monotonic() + AVOID_RECHECK_S) if avoid else deadline
            try:
                return self.dispatcher.acquire(self.fn, until, avoid, bounded=False)
            except DeadlineExceeded:
                if time.monotonic() >= deadline:
                    self.metrics.resumes.labels("exhausted").inc()
                    raise InvokerLost(
                        f"{lost}; no invoker could resume it within the function's "
                        f"{self.fn.timeout_s:g} s limit"
                    ) from None
            except StaleFunction:
                try:
                    fn = self._refresh()
                except NotFound:
                    raise InvokerLost(f"{lost}; function {self.fn.name!r} was deleted") from None
                if (fn.model, fn.task, fn.namespace_id) != (
                    self.fn.model,
                    self.fn.task,
                    self.fn.namespace_id,
                ):
                    raise InvokerLost(
                        f"{lost}; function {self.fn.name!r} changed its model meanwhile, so "
                        "the generation cannot resume"
                    ) from None
                self.fn = fn

    # ------------------------------------------------------------ live migration
    def migrate(self, to: str | None, reason: str, timeout: float) -> None:
        """Move the generation to invoker `to` (None: the best other one), in rounds while
        it keeps streaming (controller/_migration.py), every unfinished choice together
        (controller/_live.py); run on a thread of its own. The switch happens in this
        stream's thread: the source's stream ends "paused", and `_resume` takes the
        destination's stream instead of a new dispatch."""
        source, fn = self.slot, self.fn
        choices = sorted(set(self.relay.unfinished()) - set(self.relay.waiting()))  # on `source`
        if source is None or self._moving is not None or not choices:
            why = "one is under way" if self._moving is not None else "it is not streaming"
            self.run.log(f"migration ({reason}) not started: {why}")
            return
        if reason == DRAIN and not draining(self.dispatcher.db, source.invoker_id):
            log.info("activation %s: runs on %s, not draining: stays", self.run.id, source.invoker)
            return
        to_id = None
        if to is not None:
            with self.dispatcher.db.session(write=False) as s:
                to_id = s.query(Invoker.id).filter(Invoker.name == to).scalar()
        dest = self.dispatcher.migration_slot(fn, source.invoker_id, to_id)
        if dest is None:
            self.relay.moves.extend(refused(source.invoker, to, choices, reason))
            self.run.log(f"migration ({reason}) refused: no invoker can take the generation")
            return
        future: Future[list[Outcome]] = Future()
        self._moving = (future, dest)
        gate = Gate(choices)
        self.run.log(f"migrating to {dest.invoker} ({reason})")
        policy = RoundPolicy(
            threshold=self.config.migration_threshold,
            max_rounds=self.config.migration_max_rounds,
        )
        migrations = [
            Migration(
                InvokerWire(
                    self.invokers,
                    {
                        **instance_body(self.run.namespace, fn, dest),
                        "activation": self._generation(c),
                    },
                    timeout,
                ),
                self._generation(c),
                c,
                source=source.invoker,
                dest=dest.invoker,
                source_url=source.url,
                dest_url=dest.url,
                reason=reason,
                meet=partial(gate.arrive, c),
                policy=policy,
            )
            for c in choices
        ]
        outcomes = move_together(migrations, gate)
        for outcome in outcomes:
            if not outcome.moved and outcome.final is None:  # aborted: it goes on on its source
                self.relay.moves.append(outcome.record)
                self.run.log(
                    f"migration of choice {outcome.record['choice']} to {dest.invoker} "
                    f"aborted: {outcome.record.get('error')}"
                )
        if not any(o.moved or o.final is not None for o in outcomes):
            self._moving = None
            self._give_back(dest)
        future.set_result(outcomes)

    def _migrated(self, deadline: float) -> tuple[str, Slot, Generator[Event, None, None]] | None:
        """The destination's stream of the moved choices when the pause was a migration's
        switch (or its source was lost after the switch began), else None (the choices then
        resume like after a loss: a choice whose destination failed after the pause goes on
        elsewhere, its source included)."""
        moving = self._moving
        if moving is None:
            return None
        future, dest = moving
        try:
            outcomes = future.result(timeout=max(0.1, deadline - time.monotonic()))
        except TimeoutError:
            return None
        self._moving = None
        moved = []
        for outcome in outcomes:
            choice = int(outcome.record["choice"])
            if outcome.moved and self.relay.relayed(choice) != outcome.record["tokens"]:
                # Its source was lost before its last tokens reached us: D's stream would
                # skip them, so the choice resumes from what was relayed instead.
                outcome.record.update(outcome="failed", error="the source's last tokens were lost")
                self.invokers.cancel(dest.url, self._generation(choice), CANCEL_TIMEOUT_S)
                close_events(outcome.events)
                self.relay.moves.append(outcome.record)
            elif outcome.moved and outcome.events is not None:
                moved.append(outcome)
            elif outcome.final is not None:  # paused, but the destination did not go on
                self.relay.moves.append(outcome.record)
        if not moved:
            if any(o.moved or o.final is not None for o in outcomes):
                self._give_back(dest)
            return None
        self.slot = dest
        self.run.dispatched(dest.invoker)
        if dest.loading:  # the hold loaded it (how is in the destination's own records)
            self.dispatcher.loaded(dest, None, None)
        choices = [int(o.record["choice"]) for o in moved]
        for outcome, choice in zip(moved, choices, strict=True):
            why = self._waiting.pop(choice)
            record = self.relay.move(
                "migrate",
                choice,
                why.invoker,
                dest.invoker,
                outcome.record["reason"],
                outcome.record["at"],
            )
            for key in ("rounds", "tokens_recomputed", "switch_ms", "total_ms", "outcome"):
                record[key] = outcome.record.get(key)
            self.run.log(
                f"choice {choice} migrated to {dest.invoker}: {record['rounds']} round(s), "
                f"{record['tokens_recomputed']} tokens recomputed"
            )
        source = self._source(dest)
        self.relay.attach(source, choices)
        streams = [o.events for o in moved if o.events is not None]
        stream = streams[0] if len(streams) == 1 else interleaved(streams)
        return source, dest, stream  # type: ignore[return-value]

    def close(self) -> None:
        """The client's stream ended (finished, failed or the client went away): a migration
        still under way is not switched to; its destination copies are cancelled when it ends."""
        moving, self._moving = self._moving, None
        if moving is None:
            return
        future, dest = moving

        def drop(done: Future[list[Outcome]]) -> None:
            outcomes = done.result()
            for outcome in outcomes:
                if outcome.events is not None:
                    choice = int(outcome.record["choice"])
                    self.invokers.cancel(dest.url, self._generation(choice), CANCEL_TIMEOUT_S)
                    close_events(outcome.events)
            if any(o.moved or o.final is not None for o in outcomes):
                self._give_back(dest)

        future.add_done_callback(drop)

    def _give_back(self, dest: Slot) -> None:
        """The slot of a migration that did not move: a new instance goes (unloaded as an
        orphan), a warm one keeps serving."""
        if dest.cold:
            self.dispatcher.drop(dest)
        else:
            self.dispatcher.free(dest)

    # ------------------------------------------------------------ helpers
    def _source(self, slot: Slot) -> str:
        self._sources += 1
        return f"{slot.invoker}#{self._sources}"

    def _generation(self, choice: int) -> str:
        """The invoker's id of one choice's generation (as the invoker names the first's)."""
        return self.run.id if self.relay.n == 1 else f"{self.run.id}.{choice}"

    def _cancel(self, url: str, generations: list[str]) -> None:
        for generation in generations:
            self.invokers.cancel(url, generation, CANCEL_TIMEOUT_S)


def _skip_held_start(
    stream: Generator[Event, None, None], started: bool
) -> Generator[Event, None, None]:
    """`stream` less its start event when it is a held migration target's continuing a
    generation the relay started (that state is the one relayed, not the hold's)."""
    try:
        for ev in stream:
            if ev.get("event") == "start" and ev.get("held"):
                if not started:  # what came before its hold is in no stream left
                    raise Conflict(
                        "the generation moved here over a minute ago: the invoker streams "
                        "left begin after the tokens the client lacks"
                    )
                continue
            yield ev
    finally:
        stream.close()


def _left(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())
