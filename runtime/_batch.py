"""Continuous batching: one thread per instance advances all of its generations together.

Each step of the loop:

1. runs the commands queued by handles (pause, cancel, export, prefill, load) at the step
   boundary, so every state they see or change is whole;
2. admits waiting sequences while the KV budget has room (FIFO; preempted ones first);
3. prefills the prefilling rows' next chunks, at most `prefill_chunk` prompt tokens in
   all, so a long prompt delays the running streams by a bounded amount (see
   `_prefill_budget` for when a step takes more), in padded passes of chunks of like
   length (`pad_groups`);
4. decodes: one forward pass over every decoding row (their last tokens), samples each
   row's next token with its own sampler, and queues the events.

A sequence that finishes, is cancelled or paused leaves its row at once (two row swaps
keep the decoding rows contiguous). When a step would need more KV memory than the
budget allows, the youngest sequence is preempted: its row is freed and it waits again,
to be recomputed from its tokens; the stream only sees a pause, never an error.

A prefill computes tokens[:-1]; the last token goes through the next decode pass, which
yields the first new token. So a short prompt admitted now gets its first token in the
same step, and prefill and decode share one code path for the state they leave behind.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch
from transformers import DynamicCache

from sllm.core.errors import (
    FunctionError,
    InsufficientCapacity,
    Overloaded,
    SllmError,
    Unavailable,
)

from ._engine import Engine
from ._kv import LayerShape, PrefillView, SlotCache, StepView, decode_mask, prefill_inputs
from ._sampling import Pick
from ._sequence import Sequence

log = logging.getLogger("sllm.runtime")
T = TypeVar("T")
DEFAULT_PREFILL_CHUNK = 256
BURST_CHUNKS = 8  # a burst's prefill may take up to this many chunks in one step
# A prefill pass pads its rows to the longest chunk; a row joins a pass while the padding
# stays within this share of the real tokens, or within PAD_TOKENS (less than a pass costs).
PAD_SHARE = 0.5
PAD_TOKENS = 64
STALL_WAIT = 0.05  # seconds a loop with nothing runnable waits before looking again
# An idle instance keeps its KV cache this long before giving the memory back, so a burst
# that follows a short pause does not regrow (and re-zero) the cache from nothing.
IDLE_RELEASE = 10.0


class Batcher:
    """The step loop of one instance; handles talk to it through `submit` and `call`."""

    def __init__(
        self, engine: Engine, *, budget_bytes: int, prefill_chunk: int = DEFAULT_PREFILL_CHUNK
    ) -> None:
        self.engine = engine
        self.budget_bytes = budget_bytes
        self.prefill_chunk = max(1, prefill_chunk)
        self._cond = threading.Condition()
        self._commands: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._waiting: deque[Sequence] = deque()
        self._rows: list[Sequence] = []  # row i holds _rows[i]; decoding rows come first
        self._decoding = 0
        self._kv: SlotCache | None = None
        self._layers: list[LayerShape] | None = None
        self._order = itertools.count(1)
        self._closed: SllmError | None = None
        self._thread: threading.Thread | None = None
        self.steps = 0  # decode passes run (tests and metrics)
        self.passes = 0  # forward passes run, prefill and decode
        self.preemptions = 0

    # -- the handles' side -----------------------------------------------------------------------

    def submit(self, seqs: list[Sequence], timeout: float) -> None:
        """Queue sequences (n > 1 share the first one's prefill); wait until admitted.

        Waits up to `timeout` seconds for KV room, then raises Overloaded; raises the reason
        a sequence can never run (larger than the whole budget) at once.
        """
        with self._cond:
            if self._closed is not None:
                raise self._closed
            self._start()
            self._waiting.extend(seqs)
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for seq in seqs:
            admitted = seq.admitted.wait(max(0.0, deadline - time.monotonic()))
            if admitted and seq.error is None:
                continue
            self.call(lambda: self._drop_waiting(seqs))  # none of them runs
            if seq.error is not None:
                raise seq.error
            raise Overloaded(
                f"the instance's KV cache budget ({self.budget_bytes} bytes) is full "
                f"(waited {timeout:g}s)",
                retry_after=1.0,
            )

    def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the batcher thread at the next step boundary; its result or exception."""
        future: Future[T] = Future()
        with self._cond:
            if self._closed is not None:
                raise self._closed
            self._start()
            self._commands.append((fn, future))
            self._cond.notify_all()
        return future.result()

    def post(self, fn: Callable[[], Any]) -> None:
        """Run `fn` at the next step boundary without waiting for it (cancel)."""
        with self._cond:
            if self._closed is not None:
                return
            self._commands.append((fn, Future()))
            self._cond.notify_all()

    def close(self, reason: SllmError) -> None:
        """Stop the loop; every live sequence ends with `reason`."""
        with self._cond:
            if self._closed is not None:
                return
            self._closed = reason
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self._fail_all(reason)
        with self._cond:  # commands the loop will never run: their callers get `reason`
            pending = list(self._commands)
            self._commands.clear()
        for _, future in pending:
            future.set_exception(reason)

    @property
    def running(self) -> int:
        """Sequences holding a KV row now."""
        return len(self._rows)

    # -- the loop ----------------------------------------------------------------------------------

    def _start(self) -> None:
        _LOOPS.add(self)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="sllm-batcher", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        progressed = True
        while True:
            with self._cond:
                if not progressed and not self._commands and self._closed is None:
                    # Only waiters that do not fit yet: look again when something changes
                    # (a command, a new request) or shortly, instead of spinning.
                    self._cond.wait(STALL_WAIT)
                while not (self._commands or self._has_work() or self._closed):
                    if self._kv is not None and self._kv.rows and not self._rows:
                        if not self._cond.wait(IDLE_RELEASE):
                            self._kv.release()  # idle for a while: give the memory back
                    else:
                        self._cond.wait()
                if self._closed is not None:
                    return
                commands = list(self._commands)
                self._commands.clear()
            # Commands move KV rows (a row that leaves swaps with the last one): the cache's
            # tensors are inference tensors, changed in place only under inference mode.
            with torch.inference_mode():
                for fn, future in commands:
                    try:
                        future.set_result(fn())
                    except BaseException as exc:  # handed to the caller, who raises it
                        future.set_exception(exc)
            progressed = True
            try:
                with torch.inference_mode():
                    progressed = self._step()
            except SllmError as exc:
                self._fail_running(exc)
            except Exception as exc:
                # torch reports OOM and kernel failures as RuntimeError; a model may raise
                # anything. The running sequences fail; the thread goes on for the others.
                log.exception("forward pass failed")
                self._fail_running(FunctionError(f"the model failed in its forward pass: {exc}"))

    def _has_work(self) -> bool:
        return bool(self._waiting) or any(s.phase in ("prefilling", "decoding") for s in self._rows)

    def _step(self) -> bool:
        """One step; whether it admitted or computed anything."""
        before = (len(self._rows), self.passes)
        self._admit()
        self._prefill()
        if self._decoding:
            self._decode()
        return (len(self._rows), self.passes) != before

    # -- admission and rows --------------------------------------------------------------------

    def _cache(self) -> SlotCache:
        if self._kv is None:
            self._kv = SlotCache(self.probe(), self.engine.device, budget_bytes=self.budget_bytes)
        return self._kv

    def probe(self) -> list[LayerShape]:
        """Each layer's cached state per token, read once from a one-token forward pass.

        Raises FunctionError when the model's cache is not per-layer keys and values.
        """
        if self._layers is not None:
            return self._layers
        model = self.engine.require_model()
        cache = DynamicCache(config=model.config)
        kwargs = {self.engine.cache_name: cache, "use_cache": True}
        ids = torch.zeros((1, 1), dtype=torch.long, device=self.engine.device)
        with torch.inference_mode():
            out = model(input_ids=ids, **kwargs)
        cache = getattr(out, self.engine.cache_name)
        shapes = []
        for layer in cache.layers:
            keys = getattr(layer, "keys", None)
            if keys is None or keys.dim() != 4:
                raise FunctionError("this model's cache layout cannot be batched")
            shapes.append(LayerShape(int(keys.shape[1]), int(keys.shape[3]), keys.dtype))
        if not shapes:
            raise FunctionError("this model has no key/value cache to batch")
        self._layers = shapes
        return shapes

    def _admit(self) -> None:
        kv = self._cache() if self._waiting else self._kv
        while self._waiting and kv is not None:
            seq = self._waiting[0]
            if not seq.live:  # cancelled while waiting
                self._waiting.popleft()
                continue
            need = len(seq.tokens)  # columns for tokens[:-1] and the first decode write
            final = seq.prompt_len + seq.params.max_tokens
            if not kv.fits(1, final):
                self._waiting.popleft()
                seq.phase = "failed"
                seq.error = InsufficientCapacity(
                    f"a generation of {final} tokens needs {final * kv.token_bytes} bytes of "
                    f"KV cache; this instance's budget is {kv.budget_bytes} bytes"
                )
                seq.admitted.set()
                continue
            if not kv.ensure(len(self._rows) + 1, self._need(need), self.engine.max_context):
                break  # wait for room: rows leave as generations end
            self._waiting.popleft()
            seq.row = len(self._rows)
            self._rows.append(seq)
            seq.order = next(self._order)
            seq.phase = "prefilling"
            seq.admitted.set()

    def _need(self, length: int) -> int:
        """Columns the cache must keep: `length`, and every admitted row's next write."""
        return max([length] + [s.cached + 1 for s in self._rows])

    def _drop_waiting(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            if seq in self._waiting:
                self._waiting.remove(seq)
                seq.phase = "cancelled"
            elif seq.live:
                self.leave(seq, "cancelled")

    def _swap(self, a: int, b: int) -> None:
        if a == b:
            return
        sa, sb = self._rows[a], self._rows[b]
        assert self._kv is not None
        self._kv.swap(a, b, max(sa.cached, sb.cached))
        self._rows[a], self._rows[b] = sb, sa
        sa.row, sb.row = b, a

    def _start_decoding(self, seq: Sequence) -> None:
        assert seq.row is not None
        self._swap(seq.row, self._decoding)
        self._decoding += 1
        seq.phase = "decoding"

    def _stop_decoding(self, seq: Sequence, phase: str) -> None:
        assert seq.row is not None
        if seq.phase == "decoding":
            self._swap(seq.row, self._decoding - 1)
            self._decoding -= 1
        seq.phase = phase

    def restage(self, seq: Sequence) -> None:
        """Send a decoding or held sequence back to prefill (its tokens changed)."""
        if seq.phase == "decoding":
            self._stop_decoding(seq, "prefilling")
        elif seq.phase == "held":
            seq.phase = "prefilling"

    def leave(self, seq: Sequence, phase: str) -> None:
        """Take `seq` out of the batch (its row freed) and mark it `phase`."""
        if seq.row is None:
            if seq in self._waiting:
                self._waiting.remove(seq)
            seq.phase = phase
            seq.notify()
            return
        self._stop_decoding(seq, phase)
        assert seq.row is not None
        self._swap(seq.row, len(self._rows) - 1)
        self._rows.pop()
        seq.row = None
        seq.cached = 0
        seq.notify()

    def _preempt_youngest(self) -> bool:
        if not self._rows:
            return False
        self._preempt(max(self._rows, key=lambda s: s.order))
        return True

    def _preempt(self, victim: Sequence) -> None:
        """Free `victim`'s row; it waits first in line, to be recomputed from its tokens."""
        self.leave(victim, "waiting")
        victim.preemptions += 1
        self.preemptions += 1
        self._waiting.appendleft(victim)

    # -- prefill -------------------------------------------------------------------------------

    def _prefill(self) -> None:
        """One padded pass over the prefilling rows' next chunks, within the token budget."""
        for seq in [s for s in self._rows if s.phase == "prefilling" and s.first_from_prefill]:
            seq.first_from_prefill = False
            self._first_from_prefill(seq)
        prefilling = [s for s in self._rows if s.phase == "prefilling"]
        batch: list[tuple[Sequence, int]] = []
        budget = self._prefill_budget(len(prefilling))
        for seq in prefilling:
            source = seq.share_from
            if source is not None and source.live and source.phase == "prefilling":
                continue  # n > 1: the sibling's prefill is shared, not repeated
            count = min(len(seq.tokens) - 1 - seq.cached, budget)
            if count > 0:
                batch.append((seq, count))
                budget -= count
        for group in pad_groups([count for _, count in batch]):
            # A pass may preempt rows for room, a later group's too: those sit this one out.
            rows = [batch[i] for i in group if batch[i][0].phase == "prefilling"]
            if rows:
                self._prefill_pass(rows)
        for seq in prefilling:
            if seq.row is None or seq.phase != "prefilling":
                continue  # preempted to make room
            target = len(seq.tokens) - 1  # the last token goes through the decode pass
            source = seq.share_from
            if source is not None and seq.cached < target:
                if (
                    source.row is not None
                    and source.cached >= target
                    and source.tokens[:target] == seq.tokens[:target]
                ):
                    assert self._kv is not None
                    self._kv.copy_row(source.row, seq.row, target)
                    seq.cached = target
                if not (source.live and source.phase == "prefilling"):
                    seq.share_from = None  # copied, or the sibling left: prefill alone
            if seq.cached >= target:
                if seq.hold:
                    seq.phase = "held"
                    seq.notify()  # a migration round waits for this (wait_prefilled)
                else:
                    self._start_decoding(seq)

    def _first_from_prefill(self, seq: Sequence) -> None:
        """A migration's final round: the pass that recomputes the few tokens the source
        made since the last round also yields the next token (its last position's logits),
        so the client's pause at the switch is one pass, not a prefill pass and then a
        decode pass. Longer recomputes (stop-and-recompute) take the usual path."""
        count = len(seq.tokens) - seq.cached
        if not 2 <= count <= self.prefill_chunk:
            return
        logits = self._prefill_pass([(seq, count)])
        if seq.row is None or seq.phase != "prefilling":
            return
        try:
            if seq.plain_greedy:
                pick = Pick(int(torch.argmax(logits[0])))
            else:
                pick = seq.pick(logits[0].to(device="cpu", dtype=torch.float32))
            event = seq.append(pick, self.engine.tokenizer, self.engine.eos)
        except SllmError as error:
            seq.error = error
            self.leave(seq, "failed")
            seq.push(error)
            return
        seq.push(event)
        if seq.finish_reason is not None:
            self.leave(seq, "finished")
        else:
            self._start_decoding(seq)

    def _prefill_budget(self, prefilling: int) -> int:
        """Prompt tokens this step may prefill.

        `prefill_chunk` bounds the stall a prefill imposes on the decoding streams. While
        more sequences wait for their first token than are decoding (a burst of arrivals,
        or an idle instance), the stall costs fewer streams than it serves, so the step
        takes a chunk per decoding stream's worth of waiters, up to BURST_CHUNKS chunks:
        one large pass instead of many small ones interleaved with decode passes, as a
        prefill-first scheduler does. Example: 15 prompts of 64 tokens arrive while one
        stream decodes, chunk 256: one pass of 960 tokens rather than four of 256.
        """
        if prefilling <= self._decoding:
            return self.prefill_chunk
        return self.prefill_chunk * min(BURST_CHUNKS, -(-prefilling // max(1, self._decoding)))

    def _prefill_pass(self, batch: list[tuple[Sequence, int]]) -> torch.Tensor:
        assert self._kv is not None
        need = max(s.cached + count for s, count in batch) + 1
        while not self._kv.ensure(len(self._rows), self._need(need), self.engine.max_context):
            keep = {id(s) for s, _ in batch}
            others = [s for s in self._rows if id(s) not in keep]
            if others:
                self._preempt(max(others, key=lambda s: s.order))
            elif len(batch) > 1:
                self._preempt(batch.pop()[0])
            else:
                raise InsufficientCapacity("the KV cache budget cannot hold this generation")
        rows = [s.row for s, _ in batch]
        starts = [s.cached for s, _ in batch]
        chunks = [s.tokens[s.cached : s.cached + count] for s, count in batch]
        ids, positions, mask = prefill_inputs(chunks, starts, self.engine.device, self.engine.dtype)
        view = PrefillView(self._kv, rows, starts, [len(c) for c in chunks])  # type: ignore[arg-type]
        logits = self.engine.run(ids, positions, mask, view)
        self.passes += 1
        for seq, count in batch:
            seq.cached += count
        return logits

    # -- decode --------------------------------------------------------------------------------

    def _decode(self) -> None:
        assert self._kv is not None
        while True:
            rows = self._rows[: self._decoding]
            width = max(s.cached for s in rows) + 1
            if self._kv.ensure(len(self._rows), self._need(width), self.engine.max_context):
                break
            if not self._preempt_youngest():
                raise InsufficientCapacity("the KV cache budget cannot hold this generation")
            if not self._decoding:
                return
        device = self.engine.device
        positions = torch.tensor([s.cached for s in rows], dtype=torch.long, device=device)
        view = StepView(self._kv, rows=len(rows), positions=positions, width=width)
        logits = self.engine.run(
            torch.tensor([[s.tokens[-1]] for s in rows], dtype=torch.long, device=device),
            positions[:, None],
            decode_mask(positions + 1, width, self.engine.dtype),
            view,
        )
        self.steps += 1
        self.passes += 1
        for seq in rows:
            seq.cached += 1
        greedy = [i for i, s in enumerate(rows) if s.plain_greedy]
        chosen: dict[int, int] = {}
        if greedy:
            picked = torch.argmax(logits[greedy], dim=-1).tolist()
            chosen = dict(zip(greedy, picked, strict=False))
        cpu = logits.to(device="cpu", dtype=torch.float32) if len(greedy) < len(rows) else None
        failed: list[tuple[Sequence, SllmError]] = []
        for i, seq in enumerate(rows):
            try:
                pick = Pick(chosen[i]) if i in chosen else seq.pick(cpu[i])  # type: ignore[index]
                event = seq.append(pick, self.engine.tokenizer, self.engine.eos)
            except SllmError as error:  # this sequence's sampler gave up; the others go on
                failed.append((seq, error))
                continue
            seq.push(event)
        for seq, why in failed:
            seq.error = why  # before leave(): a waiter woken by it reads why
            self.leave(seq, "failed")
            seq.push(why)
        for seq in rows:
            if seq.finish_reason is not None and seq.live:
                self.leave(seq, "finished")

    # -- failures ------------------------------------------------------------------------------

    def _fail_running(self, exc: SllmError) -> None:
        for seq in list(self._rows):
            seq.error = exc  # before leave(): a waiter woken by it reads why
            self.leave(seq, "failed")
            seq.push(exc)

    def _fail_all(self, exc: SllmError) -> None:
        for seq in list(self._rows) + list(self._waiting):
            if seq.live:
                seq.error = exc
                self.leave(seq, "failed")
                seq.push(exc)
                seq.admitted.set()
        self._waiting.clear()
        if self._kv is not None:
            self._kv.release()


def pad_groups(counts: list[int]) -> list[list[int]]:
    """Indexes of `counts` (chunk lengths) grouped into prefill passes that pad little.

    One pass pads every row to its longest chunk, so a 1-token chunk beside a 500-token
    one costs 500 tokens of compute. Longest first, a chunk joins the current pass while
    the padding stays within PAD_SHARE of the pass's real tokens or within PAD_TOKENS
    (about what an extra pass costs); otherwise it starts the next pass.

    Example: counts [1, 501, 84, 410, 9, 77, 18, 6] -> passes of [501, 410],
    [84, 77, 18] and [9, 6, 1] (1,281 tokens computed for 1,106 real), where one pass
    would compute 8 x 501 = 4,008.
    """
    order = sorted(range(len(counts)), key=lambda i: -counts[i])
    groups: list[list[int]] = []
    longest = real = 0
    for i in order:
        c = counts[i]
        if groups:
            waste = longest * (len(groups[-1]) + 1) - (real + c)
            if waste <= max(PAD_SHARE * (real + c), PAD_TOKENS):
                groups[-1].append(i)
                real += c
                continue
        groups.append([i])
        longest = real = c
    return groups


_LOOPS: weakref.WeakSet[Batcher] = weakref.WeakSet()  # batchers whose loop may run


@atexit.register
def _stop_loops() -> None:
    """Stop every batcher's loop before the interpreter finalizes. A daemon thread that
    wakes during finalization (an idle loop's timed wait for IDLE_RELEASE ends, or a step
    returns from torch) is torn down inside C++ frames, and the process aborts
    ("terminate called without an active exception", exit status 134)."""
    for batcher in list(_LOOPS):
        batcher.close(Unavailable("the process is exiting"))


def unavailable() -> Unavailable:
    """The error of generations whose instance was unloaded."""
    return Unavailable("the model instance was unloaded", retry_after=1.0)
