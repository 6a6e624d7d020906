"""Picking the next token of one sequence: processors, then greedy or seeded sampling; logprobs.

    Sampler(params, seed, grammar=factory, eos=ids)   one per sequence
      .sample(logits, tokens, prompt_len) -> Pick     the next token (and its logprobs)
      .accept(token)                                  the engine took it: advance state
      .grammar_done, .plain_greedy, .draws, .seed, .to_json(), Sampler.from_json(...)

Per step: the processors of runtime/_logits.py (bias, min tokens, penalties, grammar
mask), then argmax (temperature 0), or temperature, min-p, top-k, top-p and one draw.
Logprobs are vLLM's default: the log-softmax of the model's own logits, before any
processor or temperature, so they describe the model, not the constrained sampler.

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
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch

from sllm.core.errors import FunctionError, InvalidRequest

from ._grammar import GrammarMatcher, GrammarMatcherFactory
from ._logits import Processors, logprobs_of, min_p_filter
from ._params import MAX_SEED, SamplingParams


class Pick(NamedTuple):
    """One sampled token, with its log-prob and the best alternatives when logprobs are asked."""

    token: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


class Sampler:
    """The token picker of one sequence: owns its random generator, processors and grammar state.

    `grammar` is the compiled `params.response_format` for this model (required when it is
    set); `eos` are the model's end ids, which `min_tokens` holds back. The engine calls
    `sample` then `accept` once per step; state it missed is taken from `tokens` on the next
    `sample`, and a resumed sequence replays its tokens (`from_json`).
    """

    def __init__(
        self,
        params: SamplingParams,
        seed: int | None = None,
        *,
        grammar: GrammarMatcherFactory | None = None,
        eos: Sequence[int] = (),
    ) -> None:
        self.params = params
        # A request without a seed still gets one seed, drawn once, so its state stays (seed, k).
        given = seed if seed is not None else params.seed
        self.seed: int = given if given is not None else secrets.randbelow(MAX_SEED + 1)
        self.draws = 0
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(self.seed)
        if params.response_format is not None and grammar is None:
            raise InvalidRequest(
                "'response_format' needs this model's grammar compiler, which the runtime did "
                "not provide",
                param="response_format",
            )
        matcher: GrammarMatcher | None = None
        if params.response_format is not None and grammar is not None:
            matcher = grammar.matcher()
        self._grammar = matcher
        self._processors = Processors(params, eos, matcher)

    @property
    def plain_greedy(self) -> bool:
        """Greedy with no processor, grammar or logprobs: a batched argmax picks the same token."""
        p = self.params
        return p.greedy and not p.processed and p.logprobs is None and self._grammar is None

    @property
    def grammar_done(self) -> bool:
        """Whether the structured output is complete (only eos may follow): end with "stop"."""
        return self._grammar is not None and self._grammar.done

    def advance(self, draws: int) -> None:
        """Skip `draws` uniform draws, as if that many tokens had been sampled already."""
        if self.params.greedy:
            return
        for _ in range(draws):
            # One at a time: a vectorised draw need not consume the stream the same way.
            torch.rand(1, generator=self._generator, dtype=torch.float64)
        self.draws += draws

    def sample(self, logits: torch.Tensor, tokens: Sequence[int], prompt_len: int) -> Pick:
        """The next token for the 1-D float logits over the vocabulary (on the CPU).

        `tokens` is the sequence so far (prompt + generated) and `prompt_len` its prompt's
        length; state the sampler missed since its last token is taken from them.
        """
        self._sync(tokens, prompt_len)
        row = self._processors.apply(logits) if self._processors.active else logits
        token = self._greedy(row) if self.params.greedy else self._draw(row)
        if self.params.logprobs is None:
            return Pick(token)
        logprob, top = logprobs_of(logits, token, self.params.logprobs)
        return Pick(token, logprob, top)

    def accept(self, token: int) -> None:
        """Advance the grammar and the penalty counts past `token`, the sequence's next one."""
        if self._grammar is not None:
            self._grammar.accept(token)
        self._processors.accept(token)

    def _sync(self, tokens: Sequence[int], prompt_len: int) -> None:
        self._processors.sync(tokens, prompt_len)
        if self._grammar is not None:
            self._grammar.replay(list(tokens[prompt_len + self._grammar.consumed :]))

    def _greedy(self, row: torch.Tensor) -> int:
        token = int(torch.argmax(row))
        if self._processors.active and not bool(torch.isfinite(row[token])):
            raise FunctionError("no token is possible: every logit is -inf after the processors")
        return token

    def _draw(self, logits: torch.Tensor) -> int:
        """Inverse-CDF sampling with one uniform draw; temperature, min-p, top-k, top-p."""
        params = self.params
        scaled = min_p_filter(logits.to(torch.float64) / params.temperature, params.min_p)
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
        """The sampler state: seed, number of draws and the raw generator state (base64).

        Processor counts and grammar state are not in it: they follow from the tokens.
        """
        raw = self._generator.get_state().numpy().tobytes()
        return {
            "seed": self.seed,
            "draws": self.draws,
            "rng": base64.b64encode(raw).decode("ascii"),
        }

    @classmethod
    def from_json(
        cls,
        params: SamplingParams,
        doc: Mapping[str, Any],
        tokens: Sequence[int],
        prompt_len: int,
        *,
        grammar: GrammarMatcherFactory | None = None,
        eos: Sequence[int] = (),
    ) -> Sampler:
        """Restore `to_json`'s state for `params` after `tokens` (prompt + generated).

        The generated tokens are replayed into the processors and the grammar, so the next
        mask is the one the sequence had; tokens the grammar rejects are an InvalidRequest.
        Without `rng` the generator is rebuilt from the seed and the number of draws
        (default: one per generated token). The draws can be at most the generated tokens.
        """
        if not isinstance(doc, Mapping):
            raise InvalidRequest("'sampler' must be a JSON object")
        if not 0 <= prompt_len <= len(tokens):
            raise InvalidRequest(f"'prompt_len' must be in [0, {len(tokens)}]")
        generated = len(tokens) - prompt_len
        seed, draws, rng = doc.get("seed"), doc.get("draws", generated), doc.get("rng")
        for name, value in (("seed", seed), ("draws", draws)):
            if value is None and name == "seed":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
                raise InvalidRequest(f"'sampler.{name}' must be an integer >= 0, got {value!r}")
        if draws > generated:
            raise InvalidRequest(
                f"'sampler.draws' is {draws}, more than the {generated} generated tokens"
            )
        sampler = cls(params, seed=seed, grammar=grammar, eos=eos)
        sampler._sync(tokens, prompt_len)
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
