"""The KV cache of a batch: one preallocated row ("slot") per sequence, compacted on leave.

Layout, per attention layer: keys and values of shape (rows, kv_heads, capacity, head_dim).
A sequence owns one row and keeps its tokens' states at columns [0, length) of it; rows
[0, n) hold the sequences that decode this step, so a decode pass attends over the view
`keys[:n, :, :longest]` (no copy) with a mask hiding each row's columns past its length.

Why this layout rather than pages or transformers' own continuous batching:

- Join and leave copy at most two rows (a leaving row's hole is filled by swapping the
  last decoding row into it), never the batch; capacity grows by doubling, so a token's
  state is copied O(1) times amortized. A step writes the new token of each row with one
  indexed copy instead of concatenating the whole cache as `DynamicCache` does.
- Attention reads contiguous rows through plain SDPA with a 4-D mask, which every
  transformers decoder accepts as-is; a paged layout would need a gather (a copy of every
  row's keys each step) or a paged-attention kernel, which the CPU build does not have.
- transformers 5.24's `generate_batch` (paged, continuous) gave 46 tokens/s for 8 streams
  of a 400 MB Llama on this 2-core machine against 147 for a static `generate` batch, and it
  offers no step-level join/leave/export/resume, which migration needs.

The price is padding: a row holds `capacity` columns whatever its length, so memory is
`rows x capacity` token states, budgeted per instance (`Budget`); the batcher preempts the
youngest sequence when growth would exceed it.

Example: rows 0-2 decode (lengths 5, 9, 7), row 3 is prefilling. Row 1 finishes: rows 1
and 2 swap, rows 2 and 3 swap, and the decode view is rows [0, 2) again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import Cache

MIN_CAPACITY = 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclass(frozen=True)
class LayerShape:
    """One attention layer's cached state per token: heads, head size and dtype."""

    heads: int
    head_dim: int
    dtype: torch.dtype


class SlotCache:
    """Rows of key/value states for every layer, grown by doubling within a byte budget."""

    def __init__(
        self, layers: Sequence[LayerShape], device: torch.device, *, budget_bytes: int
    ) -> None:
        self.layers = list(layers)
        self.device = device
        self.budget_bytes = budget_bytes
        self.token_bytes = sum(
            2 * s.heads * s.head_dim * torch.empty((), dtype=s.dtype).element_size()
            for s in self.layers
        )
        self.rows = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def allocated_bytes(self) -> int:
        """Bytes held by the tensors now."""
        return self.rows * self.capacity * self.token_bytes

    def fits(self, rows: int, length: int) -> bool:
        """Whether `rows` rows of `length` token states fit the budget at all."""
        return rows * length * self.token_bytes <= self.budget_bytes

    def ensure(self, rows: int, length: int, max_length: int) -> bool:
        """Make room for `rows` rows of `length` columns; False if over budget.

        `rows` and `length` must cover every row in use and its longest need: growing may
        also drop spare rows or columns beyond them. Grows to the next power of two (at most
        `max_length` columns), or to what the budget allows when doubling would not fit;
        rows in use keep their contents.
        """
        if rows <= self.rows and length <= self.capacity:
            return True
        if not self.fits(rows, length):
            return False
        new_rows = _next_pow2(rows)  # rows join one by one: double, never grow by one
        new_len = max(length, min(max_length, max(MIN_CAPACITY, _next_pow2(length))))
        if not self.fits(new_rows, new_len):
            # Near the budget: as many columns as it allows, so growth is not one by one.
            new_rows = rows
            room = self.budget_bytes // (rows * self.token_bytes)
            new_len = max(length, min(max_length, room))
        self._reallocate(new_rows, new_len)
        return True

    def _reallocate(self, rows: int, capacity: int) -> None:
        keys, values = [], []
        for i, shape in enumerate(self.layers):
            size = (rows, shape.heads, capacity, shape.head_dim)
            # Zeros, not empty: masked columns get weight 0, and 0 * NaN garbage is NaN.
            k = torch.zeros(size, dtype=shape.dtype, device=self.device)
            v = torch.zeros(size, dtype=shape.dtype, device=self.device)
            keep_rows, keep_len = min(rows, self.rows), min(capacity, self.capacity)
            if keep_rows and keep_len:
                k[:keep_rows, :, :keep_len] = self.keys[i][:keep_rows, :, :keep_len]
                v[:keep_rows, :, :keep_len] = self.values[i][:keep_rows, :, :keep_len]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values
        self.rows, self.capacity = rows, capacity

    def release(self) -> None:
        """Free every tensor (nothing is running)."""
        self.keys, self.values = [], []
        self.rows = self.capacity = 0

    def swap(self, a: int, b: int, length: int) -> None:
        """Exchange the first `length` columns of rows `a` and `b`."""
        if a == b or length <= 0 or not self.keys:
            return
        order, back = [a, b], [b, a]
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[order, :, :length] = t[back, :, :length]

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first `length` columns of row `src` into row `dst` (n > 1 shares a prefill)."""
        if src == dst or length <= 0:
            return
        for tensors in (self.keys, self.values):
            for t in tensors:
                t[dst, :, :length] = t[src, :, :length]


class _SlotView(Cache):
    """A forward pass's view of the slot cache, `width` columns wide (not compilable)."""

    _width: int

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._width

    @property
    def is_compileable(self) -> bool:
        return False


class StepView(_SlotView):
    """What a decode pass sees as its cache: rows [0, n), one new token each, written at
    column `positions[i]` of row i; attention reads columns [0, width) of those rows (a
    view, no copy)."""

    def __init__(self, slots: SlotCache, *, rows: int, positions: torch.Tensor, width: int) -> None:
        super().__init__(layers=[])
        self._slots = slots
        self._rows = rows
        self._positions = positions
        self._row_index = torch.arange(rows, device=slots.device)
        self._width = width

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._slots.keys[layer_idx], self._slots.values[layer_idx]
        keys[self._row_index, :, self._positions] = key_states[:, :, 0]
        values[self._row_index, :, self._positions] = value_states[:, :, 0]
        n, width = self._rows, self._width
        return keys[:n, :, :width], values[:n, :, :width]


class PrefillView(_SlotView):
    """A prefill pass over several rows: row i's `counts[i]` new tokens go from column
    `starts[i]`; attention reads columns [0, width) of those rows (one row: a view, else a
    gathered copy; prefill is compute-bound, so the copy is cheap beside it).

    Inputs are right-padded to the longest chunk; padded positions are never written.
    """

    def __init__(
        self, slots: SlotCache, rows: list[int], starts: list[int], counts: list[int]
    ) -> None:
        super().__init__(layers=[])
        self._slots = slots
        self._rows, self._starts, self._counts = rows, starts, counts
        self._width = max(s + c for s, c in zip(starts, counts, strict=True))
        self._index = torch.tensor(rows, device=slots.device)

    def update(
        self,
        key_states: torch.Tensor,
        value_states: torch.Tensor,
        layer_idx: int,
        *args: Any,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        keys, values = self._slots.keys[layer_idx], self._slots.values[layer_idx]
        for i, (row, start, count) in enumerate(
            zip(self._rows, self._starts, self._counts, strict=True)
        ):
            keys[row, :, start : start + count] = key_states[i, :, :count]
            values[row, :, start : start + count] = value_states[i, :, :count]
        if len(self._rows) == 1:
            row = self._rows[0]
            return keys[row : row + 1, :, : self._width], values[row : row + 1, :, : self._width]
        index = self._index
        return keys[index, :, : self._width], values[index, :, : self._width]


def prefill_inputs(
    chunks: list[list[int]], starts: list[int], device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, positions and the additive mask (rows, 1, longest, width).

    A padded query repeats its row's last real position, so it stays inside the model's
    position range and sees only what that token sees; its output is never used.
    """
    longest = max(len(c) for c in chunks)
    width = max(s + len(c) for s, c in zip(starts, chunks, strict=True))
    ids = torch.zeros((len(chunks), longest), dtype=torch.long)
    positions = torch.empty((len(chunks), longest), dtype=torch.long)
    steps = torch.arange(longest)
    for i, (chunk, start) in enumerate(zip(chunks, starts, strict=True)):
        ids[i, : len(chunk)] = torch.tensor(chunk)
        positions[i] = start + torch.clamp(steps, max=len(chunk) - 1)
    cols = torch.arange(width)
    hidden = cols[None, None, :] > positions[:, :, None]
    mask = torch.zeros(hidden.shape, dtype=dtype)
    mask.masked_fill_(hidden, torch.finfo(dtype).min)
    return ids.to(device), positions.to(device), mask[:, None].to(device)


def decode_mask(lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (rows, 1, 1, width): row i sees its first `lengths[i]` columns."""
    cols = torch.arange(width, device=lengths.device)
    hidden = cols[None, :] >= lengths[:, None]
    mask = torch.zeros(hidden.shape, dtype=dtype, device=lengths.device)
    mask.masked_fill_(hidden, torch.finfo(dtype).min)
    return mask[:, None, None, :]
