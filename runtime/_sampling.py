"""Picking the next token from logits: greedy, or temperature / top-k / top-p with a seeded RNG.

Every sampled token consumes exactly one uniform draw from the generation's own CPU
`torch.Generator` (inverse-CDF sampling), and greedy tokens consume none. So the sampler's
state after k tokens is fully determined by (seed, k); it is exported as the generator's
raw state as well, so a generation moved to another host (or another device: the generator
always lives on the CPU) continues with exactly the draws it would have made.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Mapping
from typing import Any

import torch

from sllm.core.errors import FunctionError, InvalidRequest

from ._params import MAX_SEED, SamplingParams


class Sampler:
    """The token picker of one generation; owns its random generator."""

    def __init__(self, params: SamplingParams, seed: int | None = None) -> None:
        self.params = params
        # A request without a seed still gets one seed, drawn once, so its state stays (seed, k).
        self.seed = seed if seed is not None else params.seed
        if self.seed is None:
            self.seed = secrets.randbelow(MAX_SEED + 1)
        self.draws = 0
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)

    def advance(self, draws: int) -> None:
        """Skip `draws` uniform draws, as if that many tokens had been sampled already."""
        if self.params.greedy:
            return
        for _ in range(draws):
            # One at a time: a vectorised draw need not consume the stream the same way.
            torch.rand(1, generator=self._generator, dtype=torch.float64)
        self.draws += draws

    def sample(self, logits: torch.Tensor) -> int:
        """The next token id for the 1-D float logits over the vocabulary (on the CPU)."""
        params = self.params
        if params.greedy:
            return int(torch.argmax(logits))
        scaled = logits.to(torch.float64) / params.temperature
        # Sorted once: top-k and top-p both cut the tail, and the CDF is walked in this order.
        values, order = torch.sort(scaled, descending=True, stable=True)
        if 0 < params.top_k < values.numel():
            values[params.top_k :] = -torch.inf
        probs = torch.softmax(values, dim=0)
        if params.top_p < 1.0:
            # Keep the smallest head whose mass reaches top_p (the first token always stays).
            before = torch.cumsum(probs, dim=0) - probs
            probs[before >= params.top_p] = 0.0
        cdf = torch.cumsum(probs, dim=0)
        total = float(cdf[-1])
        if not total > 0.0 or total == float("inf"):
            raise FunctionError("the model produced logits that are not finite numbers")
        u = float(torch.rand(1, generator=self._generator, dtype=torch.float64)) * total
        self.draws += 1
        index = int(torch.searchsorted(cdf, torch.tensor([u], dtype=cdf.dtype), right=True))
        # u < total, so index is in range unless rounding pushed it past the last kept token.
        index = min(index, int(torch.count_nonzero(probs)) - 1)
        return int(order[index])

    def to_json(self) -> dict[str, Any]:
        """The sampler state: seed, number of draws and the raw generator state (base64)."""
        raw = self._generator.get_state().numpy().tobytes()
        return {
            "seed": self.seed,
            "draws": self.draws,
            "rng": base64.b64encode(raw).decode("ascii"),
        }

    @classmethod
    def from_json(cls, params: SamplingParams, doc: Mapping[str, Any], draws: int) -> Sampler:
        """Restore `to_json`'s state for `params`; InvalidRequest if it is malformed.

        Without `rng` the state is rebuilt from the seed (the request's, else a fresh one)
        and the number of draws (default: `draws`, the tokens generated so far).
        """
        if not isinstance(doc, Mapping):
            raise InvalidRequest("'sampler' must be a JSON object")
        seed, draws, rng = doc.get("seed"), doc.get("draws", draws), doc.get("rng")
        for name, value in (("seed", seed), ("draws", draws)):
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
                raise InvalidRequest(f"'sampler.{name}' must be an integer >= 0, got {value!r}")
        sampler = cls(params, seed=seed)
        if rng is None:
            sampler.advance(draws)
            return sampler
        if not isinstance(rng, str):
            raise InvalidRequest("'sampler.rng' must be a base64 string")
        try:
            raw = base64.b64decode(rng, validate=True)
            state = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
            sampler._generator.set_state(state)
        except (binascii.Error, ValueError, RuntimeError) as exc:
            raise InvalidRequest(f"'sampler.rng' is not a generator state: {exc}") from exc
        sampler.draws = draws
        return sampler
