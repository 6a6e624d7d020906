"""The decode benchmark's baseline: `model.generate` on a static batch, in this process.

What a user without a batching server does: put the requests in one batch,
pad the prompts on the left to the longest, and generate greedily until the
longest output is done. Every row runs every step; a shorter request's
tokens past its own length are waste, so only its own length counts
("useful" tokens), while the batch's user waits for the whole `generate`.

A streamer records when each step's tokens exist (generate calls it once
with the prompt, then once per step), so the baseline reports TTFT and TPOT
the way the served runs do.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch

from ._decode_stats import StreamTimes


class _StepClock:
    """A generate streamer that only notes the time of every call."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def left_padded(prompts: Sequence[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every prompt right-aligned to the longest.

    Example: [[5, 6], [7]] with pad 3 -> ids [[5, 6], [3, 7]], mask [[1, 1], [0, 1]].
    """
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p) :] = 1
    return ids, mask


def static_generate(
    model: Any, prompts: Sequence[list[int]], output_lens: Sequence[int], pad: int
) -> tuple[list[StreamTimes], float, list[list[int]]]:
    """One greedy `generate` over all prompts; per-request times, the batch's end, tokens.

    Each request's StreamTimes counts its own output length of the batch's
    steps; the end is when `generate` returned (what the user waits for).
    """
    ids, mask = left_padded(prompts, pad)
    device = getattr(model, "device", None) or torch.device("cpu")
    longest = max(output_lens)
    clock = _StepClock()
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad,
            streamer=clock,
        )
        end = time.perf_counter()
    steps = clock.times[1:]  # the first call carries the prompt
    if out.shape[1] - ids.shape[1] != longest or len(steps) != longest:
        raise RuntimeError(
            f"generate produced {out.shape[1] - ids.shape[1]} tokens ({len(steps)} steps), "
            f"asked for {longest}"
        )
    times = [StreamTimes(sent=start, tokens=list(steps), useful=n) for n in output_lens]
    out = out.cpu()
    tokens = [out[i, ids.shape[1] : ids.shape[1] + n].tolist() for i, n in enumerate(output_lens)]
    return times, end, tokens
