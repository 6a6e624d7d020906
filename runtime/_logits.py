"""Logits processors of one sequence: bias, penalties, min tokens, grammar mask; min-p; logprobs.

    Processors(params, eos, grammar=None)   the processors of one sequence and their state
      .sync(tokens, prompt_len)              take in the tokens not seen yet (first step, resume)
      .accept(token)                         one more generated token
      .apply(logits) -> logits               the processed copy of one logits row
    min_p_filter(logits, min_p)              vLLM's min-p on temperature-scaled logits
    logprobs_of(raw, token, n)               the token's log-prob and the n best, best first

What each does to the row `l` (float32, one entry per model token), in vLLM's order:

    logit_bias          l[t] += bias[t]                                   (OpenAI)
    min_tokens          l[eos] = -inf while fewer than min_tokens generated  (vLLM)
    repetition_penalty  for t in prompt + generated: l[t] = l[t] / p if l[t] > 0 else l[t] * p
                        (HF / vLLM; p > 1 discourages repeats)
    frequency_penalty   l[t] -= f * count[t]        over generated tokens only (OpenAI)
    presence_penalty    l[t] -= p * (count[t] > 0)  over generated tokens only (OpenAI)
    grammar             l[t] = -inf where the structured-output grammar forbids t

Worked example: l = [2.0, -1.0, 0.5], prompt [0], generated [2, 2], repetition 2.0,
frequency 0.5, presence 0.25: repetition gives [1.0, -1.0, 0.25]; the counts [0, 0, 2]
then give [1.0, -1.0, 0.25 - 1.0 - 0.25] = [1.0, -1.0, -1.0].

State is incremental: per-token counts and the set of seen tokens are dense tensors over
the vocabulary updated by one entry per token, never recounted from the whole sequence.
`ignore_eos` is not applied here (eos stays possible; the engine does not end on it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sllm.core.errors import FunctionError

from ._grammar import GrammarMatcher
from ._params import SamplingParams


class Processors:
    """The logits processors of one sequence, with what they remember of its tokens."""

    def __init__(
        self,
        params: SamplingParams,
        eos: Sequence[int] = (),
        grammar: GrammarMatcher | None = None,
    ) -> None:
        self.params = params
        self.eos = sorted(set(eos))
        self.grammar = grammar
        self._seen_len = 0  # tokens of the sequence taken in (prompt + generated)
        self._prompt_len = 0
        self._synced = False
        self._repeat = params.repetition_penalty != 1.0
        self._count = bool(params.presence_penalty or params.frequency_penalty)
        self._pending: list[
            tuple[int, int]
        ] = []  # (position, token) taken in before the vocab size was known
        self._seen: torch.Tensor | None = None  # bool [V]: in prompt + generated
        self._counts: torch.Tensor | None = None  # float32 [V]: times generated
        bias = params.logit_bias
        self._bias_ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
        self._bias_values = torch.tensor([b for _, b in bias], dtype=torch.float32)

    @property
    def active(self) -> bool:
        """Whether applying changes anything (some processor on)."""
        p = self.params
        return bool(p.logit_bias or p.min_tokens or self._repeat or self._count or self.grammar)

    @property
    def generated(self) -> int:
        """Generated tokens taken in so far."""
        return self._seen_len - self._prompt_len

    def sync(self, tokens: Sequence[int], prompt_len: int) -> None:
        """Take in `tokens` (prompt + generated) past what was seen; restart if they differ."""
        if not self._synced or self._prompt_len != prompt_len or len(tokens) < self._seen_len:
            if self._synced and self.grammar is not None and self.grammar.consumed:
                raise FunctionError("a sequence with a grammar cannot be rewound")
            self._reset(prompt_len)
        for token in tokens[self._seen_len :]:
            self._take(int(token))

    def accept(self, token: int) -> None:
        """One more generated token (after `sync` saw the sequence up to here)."""
        if not self._synced:
            self._reset(0)
        self._take(int(token))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """A processed float32 copy of the 1-D `logits` (the input is left as it was)."""
        out = logits.to(torch.float32, copy=True)
        vocab = out.numel()
        self._ensure(vocab)
        p = self.params
        if p.logit_bias:
            keep = self._bias_ids < vocab  # checked against the vocab at start; never index past
            out.index_add_(0, self._bias_ids[keep], self._bias_values[keep])
        if p.min_tokens and self.generated < p.min_tokens and self.eos:
            out[[t for t in self.eos if t < vocab]] = -torch.inf
        if self._seen is not None:
            seen = out[self._seen]
            out[self._seen] = torch.where(
                seen > 0, seen / p.repetition_penalty, seen * p.repetition_penalty
            )
        if self._counts is not None:
            out -= p.frequency_penalty * self._counts
            out -= p.presence_penalty * (self._counts > 0).to(torch.float32)
        if self.grammar is not None:
            out[~self.grammar.allowed()] = -torch.inf
        return out

    # -- internals -------------------------------------------------------------------------

    def _reset(self, prompt_len: int) -> None:
        self._synced = True
        self._prompt_len, self._seen_len = prompt_len, 0
        self._pending = []
        self._seen = None if self._seen is None else torch.zeros_like(self._seen)
        self._counts = None if self._counts is None else torch.zeros_like(self._counts)

    def _ensure(self, vocab: int) -> None:
        """Allocate the dense state once the vocabulary size is known; replay what came before."""
        if (self._repeat and self._seen is None) or (self._count and self._counts is None):
            if self._repeat:
                self._seen = torch.zeros(vocab, dtype=torch.bool)
            if self._count:
                self._counts = torch.zeros(vocab, dtype=torch.float32)
            pending, self._pending = self._pending, []
            for position, token in pending:
                self._mark(token, generated=position >= self._prompt_len)

    def _take(self, token: int) -> None:
        position = self._seen_len
        self._seen_len += 1
        if self._repeat or self._count:
            if self._seen is None and self._counts is None:
                self._pending.append((position, token))
            else:
                self._mark(token, generated=position >= self._prompt_len)

    def _mark(self, token: int, *, generated: bool) -> None:
        if self._seen is not None and token < self._seen.numel():
            self._seen[token] = True
        if generated and self._counts is not None and token < self._counts.numel():
            self._counts[token] += 1


def min_p_filter(scaled: torch.Tensor, min_p: float) -> torch.Tensor:
    """`scaled` (temperature applied) with tokens below min_p x the top probability at -inf.

    vLLM's min-p: with probabilities [0.5, 0.3, 0.15, 0.05] and min_p 0.2 the cut is 0.1, so
    the last token goes. The most likely token always stays.
    """
    if min_p <= 0.0:
        return scaled
    probs = torch.softmax(scaled, dim=0)
    return scaled.masked_fill(probs < min_p * probs.max(), -torch.inf)


def logprobs_of(raw: torch.Tensor, token: int, n: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-prob of `token` and the `n` most likely (token, log-prob), best first.

    vLLM's default ("raw_logprobs"): log-softmax of the model's logits, before any
    processor, penalty, grammar mask or temperature.
    """
    logp = torch.log_softmax(raw.to(torch.float32), dim=0)
    top: list[tuple[int, float]] = []
    if n > 0:
        values, ids = torch.topk(logp, min(n, logp.numel()))
        top = [(int(i), float(v)) for i, v in zip(ids, values, strict=True)]
    return float(logp[token]), top
