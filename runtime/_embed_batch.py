"""Embedding micro-batches: concurrent embed calls on one instance share padded forward passes.

Each call brings its inputs already tokenized and checked (a too-long input
fails its own call before it joins, never the others'). Calls queue; when
no forward pass is running, the first waiting caller becomes the leader: it
takes the queued calls in arrival order, whole, up to `max_inputs` inputs
and `max_cells` padded tokens (always at least one call), runs them as one
right-padded batch, hands every caller its own rows, and repeats until its
own call is done. Then the next waiting caller leads. Nothing waits for a
batch to fill: an idle instance runs a lone call at once, and a busy one
collects whatever arrived during the pass in flight.

Example: calls A (1 input), B (2), C (1) arrive while the engine is idle,
A a moment first. A leads and runs [A]; B and C queue meanwhile. A's pass
ends, A returns, B leads and runs [B, C] in one pass: 2 passes for 3 calls.

Right padding keeps every real token's positions and attention as alone,
so a call's vectors do not depend on who shared its batch (up to float
rounding of the batched matmuls).

Caveat: a failed forward pass fails every call of that batch (the model
failed, not an input); the calls queued behind it still run.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sllm.core.messages import MAX_EMBED_INPUTS

MAX_EMBED_CELLS = 256 * 512  # padded tokens in one pass (rows x longest row)


@dataclass
class _Call:
    ids: list[list[int]]
    vectors: list[list[float]] | None = None
    error: BaseException | None = None
    done: bool = False
    width: int = field(init=False)

    def __post_init__(self) -> None:
        self.width = max(len(row) for row in self.ids)


def right_padded(ids: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of `ids`, each row left-aligned and padded on the right.

    Example: [[5, 6], [7]] with pad 0 -> input_ids [[5, 6], [7, 0]], mask [[1, 1], [1, 0]].
    """
    width = max(len(row) for row in ids)
    batch = {
        "input_ids": torch.full((len(ids), width), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros((len(ids), width), dtype=torch.long),
    }
    for i, row in enumerate(ids):
        batch["input_ids"][i, : len(row)] = torch.tensor(row, dtype=torch.long)
        batch["attention_mask"][i, : len(row)] = 1
    return batch


class EmbedBatcher:
    """Coalesces concurrent `embed` calls into padded forward passes (see the module docstring)."""

    def __init__(
        self,
        forward: Callable[[dict[str, torch.Tensor]], torch.Tensor],
        *,
        max_inputs: int = MAX_EMBED_INPUTS,
        max_cells: int = MAX_EMBED_CELLS,
    ) -> None:
        self._forward = forward
        self.max_inputs = max_inputs
        self.max_cells = max_cells
        self._cond = threading.Condition()
        self._queue: deque[_Call] = deque()
        self._busy = False
        self.passes = 0  # forward passes run so far (for tests and metrics)

    def embed(self, ids: list[list[int]], pad_id: int) -> list[list[float]]:
        """One vector per row of `ids` (checked token ids), computed with whatever else is queued."""
        call = _Call(ids)
        with self._cond:
            self._queue.append(call)
            while self._busy and not call.done:
                self._cond.wait()
            if call.done:
                return _result(call)
            self._busy = True
            batch = self._take()
        try:
            self._run(batch, pad_id)
            while not call.done:
                with self._cond:
                    batch = self._take()
                self._run(batch, pad_id)
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()
        return _result(call)

    def _take(self) -> list[_Call]:
        """Queued calls in arrival order, whole, within the bounds (at least one)."""
        batch = [self._queue.popleft()]
        rows, width = len(batch[0].ids), batch[0].width
        while self._queue:
            nxt = self._queue[0]
            r, w = rows + len(nxt.ids), max(width, nxt.width)
            if r > self.max_inputs or r * w > self.max_cells:
                break
            batch.append(self._queue.popleft())
            rows, width = r, w
        return batch

    def _run(self, batch: list[_Call], pad_id: int) -> None:
        rows = [row for call in batch for row in call.ids]
        try:
            self.passes += 1
            vectors = self._forward(right_padded(rows, pad_id)).tolist()
        except BaseException as exc:
            with self._cond:
                for call in batch:
                    call.error, call.done = exc, True
                self._cond.notify_all()
            if not isinstance(exc, Exception):
                raise
            return
        with self._cond:
            at = 0
            for call in batch:
                call.vectors, call.done = vectors[at : at + len(call.ids)], True
                at += len(call.ids)
            self._cond.notify_all()


def _result(call: _Call) -> list[list[float]]:
    if call.error is not None:
        raise call.error
    assert call.vectors is not None
    return call.vectors
