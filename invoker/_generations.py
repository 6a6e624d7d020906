"""The invoker's registry of generations: each running one, addressable by id, with its instance.

Ids: a generation is registered under the activation id the controller sends
as "activation" in the invoke body (a fresh uuid hex without one). A request
with n > 1 registers choice i as "{id}.{i}" for every i (choice 0 too), so
each sequence can be read, paused or cancelled alone; with n == 1 the id is
the activation id itself. A resumed generation is registered under the
body's "activation", else the id in its state, else a fresh one.

States / data / events of an entry:

    running  --the stream reads the end------------>  finished
    running  --pause (final state exported)--------->  paused
    running  --cancel, or the client went away----->  cancelled
    running  --the generation failed--------------->  failed
    held     --continue (the final state loaded)---->  running
    held     --cancel, or no call within the hold timeout-->  cancelled

A held entry is a migration target (see _holds): prefilled from a state, not
decoding, its stream silent after its start event. Its hold timer cancels it
(KV memory freed) when no prefill or continue came for `hold_timeout` seconds,
so a controller that died mid-migration leaves nothing behind. Pause is a 409
while held (there is no decoding to stop: continue or delete it).

data: the generation, its instance id and function, its choice index, and
once it ended the final state (`export_state()` at the end) and when it ended;
while held, the held prompt and the hold deadline.
An ended entry stays readable for RETAIN_S seconds (at most RETAIN_COUNT of
them, oldest dropped first), so a GET that arrives just after the end, or a
pause that lost the race with the last token, still gets an answer: the state
for a GET, a 409 naming how it ended for a pause or cancel.

Pause with a runtime whose Generation has no `pause()`: the stream's loop
steps under the entry's step lock, and pause exports the state under that
lock and marks the entry, so no token is produced after the exported state
(a pause waits at most one forward pass). With `Generation.pause()` (the
batching engine) the runtime stops the generation itself and the stream reads
a "paused" finish.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sllm.core.errors import Conflict, InvalidRequest, NotFound, SllmError
from sllm.core.messages import show_value

log = logging.getLogger("sllm.invoker")
RETAIN_S = 60.0
RETAIN_COUNT = 1024
ENDED = ("finished", "paused", "cancelled", "failed")
GENERATION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")


def generation_id(doc: Mapping[str, Any], fallback: Any = None) -> str:
    """The body's "activation" id (checked), else `fallback` when it is a valid id, else a uuid."""
    given = doc.get("activation")
    if given is None:
        if isinstance(fallback, str) and GENERATION_ID.fullmatch(fallback):
            return fallback
        return uuid.uuid4().hex
    if not isinstance(given, str) or not GENERATION_ID.fullmatch(given):
        raise InvalidRequest(
            f"'activation' must be 1-200 letters, digits, . _ : -; got {show_value(given)}",
            param="activation",
        )
    return given


@dataclass(eq=False)
class Entry:
    """One registered generation (see the module docstring for its states)."""

    id: str
    instance: str
    function: str
    generation: Any  # sllm.runtime.Generation
    choice: int = 0
    state: str = "running"
    final: dict[str, Any] | None = None
    ended_at: float | None = None
    paused: bool = False  # pause asked (the stream ends with a "paused" event)
    cancelled: bool = False  # cancel asked (the stream ends with a "cancelled" finish)
    held: bool = False  # a migration target waiting for its continue
    continued: bool = False  # it was held, and continued
    prompt: list[int] = field(default_factory=list)  # a held one's prompt tokens
    hold_deadline: float = 0.0  # when a held one is cancelled (registry clock)
    timer: threading.Timer | None = None  # its hold timer (cancelled once it is not held)
    feed: Any = None  # a resumable stream's recorded events (_feed.Feed), for attaching
    step_lock: threading.Lock = field(default_factory=threading.Lock)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Serializes the migration calls on a held entry (prefill, continue) and its expiry.
    hold_lock: threading.Lock = field(default_factory=threading.Lock)
    wake: threading.Condition = field(init=False)  # on `lock`: held -> continued or cancelled

    def __post_init__(self) -> None:
        self.wake = threading.Condition(self.lock)

    def tokens(self) -> int:
        """Tokens generated so far."""
        if self.final is not None:
            return max(0, len(self.final.get("tokens", ())) - int(self.final.get("prompt_len", 0)))
        return len(self.generation.generated)

    def live_state(self) -> str:
        """held, running | queued | preempted (as the runtime says), or how it ended."""
        if self.state != "running":
            return self.state
        if self.held:
            return "held"
        state = getattr(self.generation, "state", "running")
        return state if state in ("queued", "running", "preempted") else "running"

    def summary(self) -> dict[str, Any]:
        """The list view."""
        return {
            "id": self.id,
            "instance": self.instance,
            "function": self.function,
            "choice": self.choice,
            "tokens": self.tokens(),
            "state": self.live_state(),
        }

    def export(self) -> dict[str, Any]:
        """The exportable state plus where it runs and how far it is."""
        state = self.final if self.final is not None else self.generation.export_state()
        return {**self.summary(), "state": self.live_state(), "generation": state}


class Generations:
    """Running generations by id, and recently ended ones for a short while."""

    def __init__(
        self,
        *,
        retain_s: float = RETAIN_S,
        retain_count: int = RETAIN_COUNT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.Lock()
        self._running: dict[str, Entry] = {}
        self._ended: OrderedDict[str, Entry] = OrderedDict()
        self._retain_s = retain_s
        self._retain_count = retain_count
        self._clock = clock
        self.on_expire: Callable[[], Any] | None = None  # a hold timeout cancelled one (metrics)

    def register(
        self,
        gen_id: str,
        instance: str,
        function: str,
        generation: Any,
        choice: int = 0,
        *,
        held: tuple[list[int], float] | None = None,
    ) -> Entry:
        """Add a running generation, or with `held` = (prompt, hold timeout) a held one;
        Conflict when one with that id is running already."""
        entry = Entry(gen_id, instance, function, generation, choice)
        if held is not None:
            entry.held, entry.prompt = True, list(held[0])
            entry.hold_deadline = self._clock() + held[1]
        with self._lock:
            if gen_id in self._running:
                raise Conflict(f"a generation {gen_id!r} is already running on this invoker")
            self._ended.pop(gen_id, None)
            self._running[gen_id] = entry
        if held is not None:
            self._schedule_expiry(entry, held[1])
        return entry

    def end(self, entry: Entry, state: str, final: dict[str, Any] | None) -> None:
        """Mark `entry` ended with `final` as its last state; it stays readable a while."""
        with entry.lock:
            if entry.state != "running":
                return
            entry.state, entry.final, entry.ended_at = state, final, self._clock()
        with self._lock:
            if self._running.get(entry.id) is entry:
                del self._running[entry.id]
                self._ended[entry.id] = entry
                self._prune()

    def get(self, gen_id: str) -> Entry:
        """The entry `gen_id`, running or recently ended; NotFound otherwise."""
        with self._lock:
            self._prune()
            entry = self._running.get(gen_id) or self._ended.get(gen_id)
        if entry is None:
            raise NotFound(f"no generation {gen_id!r} on this invoker")
        return entry

    def running(self) -> list[Entry]:
        """The running entries, oldest first."""
        with self._lock:
            return list(self._running.values())

    def listing(self) -> list[dict[str, Any]]:
        """Every running and recently ended generation (list view)."""
        with self._lock:
            self._prune()
            entries = list(self._running.values()) + list(self._ended.values())
        return [e.summary() for e in entries]

    def pause(self, gen_id: str) -> Entry:
        """Stop `gen_id` and record its final state; Conflict when it already ended or is held."""
        entry = self._live(gen_id, "pause")
        if entry.held:
            raise Conflict(
                f"cannot pause generation {gen_id!r}: it is held (a migration target that "
                "does not decode); continue or delete it"
            )
        native = getattr(entry.generation, "pause", None)
        if native is not None:
            final = native()  # Conflict when it already ended; the stream reads a "paused" end
            with entry.lock:
                entry.paused = True
        else:
            with entry.step_lock:  # between two steps: the state is the stream's last token
                if getattr(entry.generation, "finished", False) or entry.state != "running":
                    raise Conflict(f"generation {gen_id!r} already {_ending(entry)}")
                with entry.lock:
                    entry.paused = True
                # Ended before the lock goes: the stream's next step reads this state.
                self.end(entry, "paused", entry.generation.export_state())
                return entry
        self.end(entry, "paused", final)
        return entry

    def cancel(self, gen_id: str) -> Entry:
        """Cancel `gen_id`: its stream ends at its next step; Conflict when it already ended."""
        entry = self._live(gen_id, "cancel")
        self._cancel(entry)
        return entry

    def _cancel(self, entry: Entry) -> None:
        with entry.lock:
            entry.cancelled = True
            entry.wake.notify_all()  # a held stream waits for this
            self._stop_timer(entry)
        final = _state_or_none(entry.generation)
        entry.generation.close()
        self.end(entry, "cancelled", final)

    # -- held generations (migration targets) ------------------------------------------------

    def touch(self, entry: Entry, timeout: float) -> None:
        """A migration call on held `entry`: its hold timeout starts again."""
        with entry.lock:
            entry.hold_deadline = max(entry.hold_deadline, self._clock() + timeout)

    def check_held(self, entry: Entry, what: str) -> None:
        """Conflict unless `entry` is held and live (caller holds entry.hold_lock)."""
        with entry.lock:
            if entry.state == "running" and entry.held and not entry.cancelled:
                return
            if entry.state == "running" and not entry.cancelled and not entry.paused:
                why = "was continued already" if entry.continued else "is running, not held"
            else:
                why = _ending(entry)
        raise Conflict(f"cannot {what} generation {entry.id!r}: it {why}")

    def release(self, entry: Entry) -> bool:
        """Held -> running (its stream starts reading tokens); False when it was cancelled."""
        with entry.lock:
            if entry.cancelled or entry.state != "running":
                return False
            entry.held, entry.continued = False, True
            entry.wake.notify_all()
            self._stop_timer(entry)
            return True

    def wait_released(self, entry: Entry) -> None:
        """Block the held entry's stream until it is continued or cancelled.

        Bounded: the hold timer cancels it at its deadline; should that timer be late,
        the stream expires the entry itself a second after the deadline.
        """
        while True:
            if getattr(entry.generation, "state", "held") in ENDED:
                return  # it failed (its instance was unloaded): the stream reads why
            with entry.lock:
                if not entry.held or entry.cancelled or entry.state != "running":
                    return
                if self._clock() <= entry.hold_deadline + 1.0:
                    entry.wake.wait(0.5)
                    continue
            self._expire(entry, timer=False)
            with entry.lock:
                entry.wake.wait(0.25)  # a prefill or continue holds the entry: look again

    def _schedule_expiry(self, entry: Entry, delay: float) -> None:
        timer = threading.Timer(max(0.01, delay), self._expire, (entry,))
        timer.daemon = True
        with entry.lock:
            if not entry.held or entry.cancelled or entry.state != "running":
                return
            entry.timer = timer
        timer.start()

    @staticmethod
    def _stop_timer(entry: Entry) -> None:
        """Called with entry.lock held, once `entry` is no longer held."""
        if entry.timer is not None:
            entry.timer.cancel()
            entry.timer = None

    def _expire(self, entry: Entry, *, timer: bool = True) -> None:
        """The hold timer: cancel `entry` when still held past its deadline, else look later."""
        if not entry.hold_lock.acquire(blocking=False):  # a prefill or continue is under way
            if timer:
                self._schedule_expiry(entry, 0.25)
            return
        try:
            with entry.lock:
                if not entry.held or entry.cancelled or entry.state != "running":
                    return
                left = entry.hold_deadline - self._clock()
            if left > 0:
                if timer:
                    self._schedule_expiry(entry, left)
                return
            log.warning(
                "generation %s was held past its hold timeout without a continue: cancelled",
                entry.id,
            )
            self._cancel(entry)
            if self.on_expire is not None:
                self.on_expire()
        finally:
            entry.hold_lock.release()

    def _live(self, gen_id: str, what: str) -> Entry:
        entry = self.get(gen_id)
        with entry.lock:
            if entry.state != "running" or entry.paused or entry.cancelled:
                raise Conflict(f"cannot {what} generation {gen_id!r}: it {_ending(entry)}")
        return entry

    def _prune(self) -> None:
        """Drop ended entries past their retention (caller holds the lock)."""
        cutoff = self._clock() - self._retain_s
        while self._ended:
            oldest = next(iter(self._ended.values()))
            if len(self._ended) <= self._retain_count and (oldest.ended_at or 0.0) > cutoff:
                break
            self._ended.popitem(last=False)


def _state_or_none(gen: Any) -> dict[str, Any] | None:
    """The generation's state, or None when it cannot say (closed, unloaded)."""
    try:
        state = gen.export_state()
    except SllmError:
        return None
    return state if isinstance(state, dict) else None


def _ending(entry: Entry) -> str:
    if entry.paused or entry.state == "paused":
        return "was paused"
    if entry.cancelled or entry.state == "cancelled":
        return "was cancelled"
    if entry.state == "failed":
        return "failed"
    return "already finished"
