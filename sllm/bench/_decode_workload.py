"""The decode benchmark's workload: request lengths from a trace, prompts, Poisson arrivals.

All of it is pure and seeded, so a run can be repeated and the unit tests
check it without a model.

Lengths come from ShareGPT conversations (prompt and output lengths counted
with the Llama-2 tokenizer, `num_prefill_tokens,num_decode_tokens,...`).
Its longest request has 8149 tokens, more than the benchmark model takes, so
every length is multiplied by one factor, `context / longest total in the
file`: the shape of the distribution stays, and every request of the trace
fits. Example: context 1024 gives a factor of 1024 / 8149 = 0.126; the
median request (1730 prompt, 415 output tokens) becomes (217, 52).
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TRACE = Path("data") / "traces" / "sharegpt_lengths_llama2_tokenizer.csv"
FIRST_TOKEN = 4  # the benchmark tokenizer's ids 0-3 are special (<s>, </s>, <unk>, <pad>)


@dataclass(frozen=True)
class Request:
    """One request's shape: prompt tokens in, output tokens out."""

    prompt_len: int
    output_len: int


def find_trace(start: Path) -> Path | None:
    """The ShareGPT lengths file in `shared/` beside `start` or beside one of its parents.

    The repository's convention is `../shared/data/traces/...`; a git worktree
    lives one or more folders deeper, so the search walks up.
    """
    for folder in (start, *start.parents):
        candidate = folder.parent / "shared" / TRACE
        if candidate.is_file():
            return candidate
    return None


def read_lengths(path: Path) -> list[tuple[int, int]]:
    """(prompt, output) token counts per row; rows with a zero or missing count are skipped."""
    pairs: list[tuple[int, int]] = []
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            try:
                prompt, output = int(row["num_prefill_tokens"]), int(row["num_decode_tokens"])
            except (KeyError, TypeError, ValueError):
                continue
            if prompt > 0 and output > 0:
                pairs.append((prompt, output))
    if not pairs:
        raise ValueError(f"{path}: no rows with num_prefill_tokens and num_decode_tokens > 0")
    return pairs


def scale_factor(pairs: Sequence[tuple[int, int]], context: int) -> float:
    """The factor that makes the longest (prompt + output) of `pairs` fit in `context` tokens."""
    longest = max(p + o for p, o in pairs)
    return min(1.0, context / longest)


def scale(pair: tuple[int, int], factor: float, context: int) -> Request:
    """One pair scaled by `factor` (each length at least 1, the sum at most `context`).

    Example: (1730, 415) with factor 0.126 and context 1024 -> Request(218, 52).
    """
    prompt = max(1, round(pair[0] * factor))
    output = max(1, round(pair[1] * factor))
    if prompt + output > context:  # rounding up can cross the limit by a token
        prompt = max(1, context - output)
        output = min(output, context - prompt)
    return Request(prompt, output)


def draw_requests(
    pairs: Sequence[tuple[int, int]], n: int, *, context: int, seed: int
) -> list[Request]:
    """`n` requests drawn (seeded, without replacement) from the trace, scaled to `context`."""
    if n > len(pairs):
        raise ValueError(f"cannot draw {n} requests from {len(pairs)} rows")
    factor = scale_factor(pairs, context)
    return [scale(p, factor, context) for p in random.Random(seed).sample(list(pairs), n)]


def poisson_arrivals(n: int, rate: float, *, seed: int) -> list[float]:
    """Arrival times (seconds from the start) of `n` requests at `rate` per second on average.

    Exponential gaps with mean 1 / rate; the first request arrives at 0.
    Example: n=3, rate=2 -> [0.0, ~0.5, ~1.0] (gaps vary with the seed).
    """
    if not rate > 0 or not math.isfinite(rate):
        raise ValueError(f"rate must be a positive number of requests per second, got {rate}")
    rng = random.Random(seed)
    times = [0.0]
    for _ in range(n - 1):
        times.append(times[-1] + rng.expovariate(rate))
    return times[:n]


def rates_from_saturation(saturation_rps: float, fractions: Sequence[float]) -> list[float]:
    """Arrival rates as fractions of the measured saturation rate (requests per second)."""
    if not saturation_rps > 0:
        raise ValueError(f"the saturation rate must be > 0, got {saturation_rps}")
    return [saturation_rps * f for f in fractions]


def prompt_tokens(length: int, *, seed: int, vocab: int) -> list[int]:
    """`length` random token ids in [FIRST_TOKEN, vocab) (no special tokens), seeded."""
    rng = random.Random(seed)
    return [rng.randrange(FIRST_TOKEN, vocab) for _ in range(length)]


def rotation(systems: Sequence[str], round_index: int) -> list[str]:
    """`systems` rotated left by `round_index`: each goes first in turn, round after round."""
    k = round_index % len(systems) if systems else 0
    return [*systems[k:], *systems[:k]]
