"""Structured output: a GrammarSpec compiled for one model's tokenizer, and a matcher per sequence.

    Grammars(tokenizer, vocab, eos)       one per model: its llguidance tokenizer and a cache
      .factory(spec) -> GrammarMatcherFactory     compiled once per spec (bounded LRU cache)
    GrammarMatcherFactory.matcher() -> GrammarMatcher   one per sequence
      .allowed() -> bool tensor [vocab]   which tokens may come next
      .accept(token)                      advance; .done when only eos may follow

Built on llguidance (Rust, no dependencies, CPU): an Earley parser over the tokenizer's
token trie that computes the next-token mask in well under a millisecond for JSON
schemas. Why it and not xgrammar: both install from the package index and run on the CPU;
llguidance is a small abi3 wheel without a torch or C++-runtime pin, takes Lark and GBNF
grammars as well as JSON schemas and regexes, and bounds its own work per step
(LLParserLimits), so a hostile grammar cannot stall a batch.

Compiling is bounded in time twice: the spec text is at most MAX_SPEC_CHARS (checked when
the request is parsed), and the parser limits below cap the lexer and grammar sizes. A spec
that does not compile is a 400 naming `response_format`.

The model's vocabulary may be larger than the tokenizer's (padded embedding rows): the
llguidance tokenizer is built with the model's size, and ids without bytes are never
allowed. Matcher state is not exported: a resumed sequence replays its generated tokens.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from sllm.core.errors import FunctionError, InvalidRequest

from ._formats import GrammarSpec

CACHE_SIZE = 64  # compiled specs per model
_LIMITS = {
    "initial_lexer_fuel": 2_000_000,  # ~40 ms of regex building
    "step_lexer_fuel": 200_000,
    "max_grammar_size": 200_000,
}

# JSON is written in json.dumps' style with no other whitespace: with "any whitespace"
# (llguidance's and vLLM's default) small models tend to emit blanks until max_tokens.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance() -> Any:
    """The llguidance module, imported on first use (a runtime without grammars never loads it)."""
    import llguidance
    import llguidance.hf

    return llguidance


class GrammarMatcher:
    """The grammar state of one sequence: which tokens may come next; advance with `accept`."""

    def __init__(self, matcher: Any, vocab: int) -> None:
        self._matcher = matcher
        self._vocab = vocab
        self.consumed = 0  # tokens accepted so far

    @property
    def done(self) -> bool:
        """Whether the output is complete: the grammar allows nothing but eos from here."""
        return bool(self._matcher.is_stopped())

    def allowed(self) -> torch.Tensor:
        """A bool tensor of the model's vocabulary size: True where the token may come next."""
        mask = self._matcher.compute_bitmask()
        self._check("computing the next-token mask")
        bits = np.unpackbits(np.frombuffer(mask, dtype=np.uint8), bitorder="little")
        allowed = np.zeros(self._vocab, dtype=bool)
        n = min(self._vocab, bits.size)
        allowed[:n] = bits[:n].astype(bool)
        return torch.from_numpy(allowed)

    def accept(self, token: int) -> None:
        """Advance past `token`; FunctionError if the grammar does not allow it."""
        if not self._matcher.consume_token(int(token)):
            raise FunctionError(
                f"token {token} does not follow the requested format: "
                f"{self._matcher.get_error() or 'rejected'}"
            )
        self.consumed += 1

    def replay(self, tokens: list[int]) -> None:
        """Accept `tokens` (a resumed sequence's output); InvalidRequest if they do not match."""
        for token in tokens:
            if not self._matcher.consume_token(int(token)):
                raise InvalidRequest(
                    f"the generated tokens do not follow 'response_format' (token {token} at "
                    f"{self.consumed}): {self._matcher.get_error() or 'rejected'}",
                    param="response_format",
                )
            self.consumed += 1

    def _check(self, doing: str) -> None:
        if self._matcher.is_error():
            raise FunctionError(f"structured output failed {doing}: {self._matcher.get_error()}")


class GrammarMatcherFactory:
    """One compiled spec for one model; `matcher()` gives each sequence its own state."""

    def __init__(self, spec: GrammarSpec, grammar: str, tokenizer: Any, vocab: int) -> None:
        self.spec = spec
        self._grammar = grammar
        self._tokenizer = tokenizer
        self._vocab = vocab

    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the start of the output."""
        llg = _llguidance()
        inner = llg.LLMatcher(
            self._tokenizer, self._grammar, log_level=0, limits=llg.LLParserLimits(**_LIMITS)
        )
        if inner.is_error():  # compiled before, so only a resource limit can get here
            raise InvalidRequest(
                f"'response_format' cannot be used: {inner.get_error()}", param="response_format"
            )
        return GrammarMatcher(inner, self._vocab)


class Grammars:
    """The grammar compiler of one model: its tokenizer for llguidance and compiled specs.

    `vocab` is the model's logits size, `eos` its end-of-sequence ids. Thread-safe.
    """

    def __init__(self, tokenizer: Any, vocab: int, eos: Iterable[int]) -> None:
        self._hf_tokenizer = tokenizer
        self.vocab = vocab
        self.eos = sorted(set(eos))
        self._tokenizer: Any = None
        self._cache: OrderedDict[GrammarSpec, GrammarMatcherFactory] = OrderedDict()
        self._lock = threading.Lock()

    def factory(self, spec: GrammarSpec) -> GrammarMatcherFactory:
        """The compiled `spec` (from the cache when it was compiled before); 400 if it cannot be."""
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
            tokenizer = self._llg_tokenizer()
        grammar = _compile(spec, tokenizer)
        factory = GrammarMatcherFactory(spec, grammar, tokenizer, self.vocab)
        with self._lock:
            self._cache[spec] = factory
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return factory

    def _llg_tokenizer(self) -> Any:
        if self._tokenizer is None:
            llg = _llguidance()
            try:
                self._tokenizer = llg.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab, eos_token=self.eos or None
                )
            except (ValueError, TypeError, RuntimeError) as exc:
                raise InvalidRequest(
                    f"'response_format' is not supported for this model's tokenizer: {exc}",
                    param="response_format",
                ) from exc
        return self._tokenizer


def _grammar_text(spec: GrammarSpec) -> str:
    """The llguidance grammar for `spec` (not yet checked)."""
    llg = _llguidance()
    if spec.kind == "json_object":
        return str(llg.LLMatcher.grammar_from_json_schema({"type": "object"}, _JSON_STYLE))
    if spec.kind == "json_schema":
        return str(llg.LLMatcher.grammar_from_json_schema(spec.text, _JSON_STYLE))
    if spec.kind == "regex":
        return str(llg.LLMatcher.grammar_from_regex(spec.text))
    if spec.kind == "choice":
        choices = json.loads(spec.text)
        return str(
            llg.LLMatcher.grammar_from_lark("start: " + " | ".join(map(json.dumps, choices)))
        )
    return str(llg.grammar_from("grammar", spec.text))  # Lark, or GBNF converted to it


def _compile(spec: GrammarSpec, tokenizer: Any) -> str:
    """`spec` compiled and validated for `tokenizer`; InvalidRequest naming response_format."""
    llg = _llguidance()
    try:
        grammar = _grammar_text(spec)
        failed, messages = llg.LLMatcher.validate_grammar_with_warnings(
            grammar, tokenizer, limits=llg.LLParserLimits(**_LIMITS)
        )
        error = "; ".join(messages) if failed else ""
    except (ValueError, TypeError, RuntimeError) as exc:
        error = str(exc)
    if error:
        raise InvalidRequest(
            f"'response_format' ({spec.kind}) cannot be compiled: {error[:500]}",
            param="response_format",
        )
    return grammar
