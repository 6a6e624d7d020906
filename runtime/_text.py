"""Turning generated tokens into released text: incremental detokenization and stop strings.

Detokenization follows the offset scheme of TGI and vLLM. Two token offsets are kept:
`read` (text up to here has been produced) and `prefix` (a few tokens before `read`, decoded
again as context so a tokenizer that drops the leading space of a first token, or merges
bytes across tokens, yields the right characters). Each token decodes tokens[prefix:] and
produces what it adds to tokens[prefix:read]; while the text ends in U+FFFD (a multi-byte
character split across tokens) nothing is produced and the window grows.

Example (byte-level tokens): "é" is two tokens, b"\\xc3" and b"\\xa9". After the first the
window decodes to "\\ufffd", so nothing is produced; after the second it decodes to "é".

Stop strings: produced text first goes to `held`. The earliest stop string inside `held` ends
the generation and everything from it on is dropped; otherwise the longest tail of `held`
that could still begin a stop string stays held and the rest is released. Released text thus
never contains a stop string nor a piece of one that later completes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sllm.core.errors import InvalidRequest

# Prompt tokens decoded as context before the first generated token.
CONTEXT_TOKENS = 5
REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The part of a tokenizer the text stream needs."""

    def decode(self, token_ids: list[int], **kwargs: Any) -> Any:
        """Text of `token_ids`."""


class TextStream:
    """Released text of one generation; its state travels with the generation."""

    def __init__(self, stops: Sequence[str], prefix: int, read: int) -> None:
        self.stops = tuple(stops)
        self.prefix = prefix
        self.read = read
        self.held = ""
        self.released = 0  # characters released so far
        self.matched: str | None = None  # the stop string that ended the text, once one has

    @classmethod
    def after(cls, stops: Sequence[str], n_tokens: int, prompt_len: int) -> TextStream:
        """A stream whose text of the first `n_tokens` tokens counts as already released."""
        read = max(n_tokens, prompt_len)
        return cls(stops, max(0, read - CONTEXT_TOKENS), read)

    def push(self, decoder: Decoder, tokens: Sequence[int], *, final: bool) -> tuple[str, bool]:
        """Take `tokens` (the whole sequence so far); return (text to release, stop string hit).

        `final` says no token follows: text waiting on more bytes or on a stop string is let out.
        """
        produced = self._produce(decoder, tokens, final=final)
        pending = self.held + produced
        hit = self._first_stop(pending)
        if hit is not None:
            self.matched = min(
                (s for s in self.stops if pending.find(s) == hit), key=len, default=None
            )
            out, self.held = pending[:hit], ""
            self.released += len(out)
            return out, True
        keep = 0 if final else self._stop_prefix_len(pending)
        out, self.held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.released += len(out)
        return out, False

    def _produce(self, decoder: Decoder, tokens: Sequence[int], *, final: bool) -> str:
        if len(tokens) <= self.read:
            return ""
        before = _decode(decoder, tokens[self.prefix : self.read])
        after = _decode(decoder, tokens[self.prefix :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            if final:
                self.prefix, self.read = self.read, len(tokens)
            return ""
        self.prefix, self.read = self.read, len(tokens)
        return after[len(before) :]

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _stop_prefix_len(self, text: str) -> int:
        longest = max((len(s) for s in self.stops), default=1)
        for n in range(min(len(text), longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

    def to_json(self) -> dict[str, Any]:
        """The stream state: token offsets, held-back text and released length."""
        return {
            "prefix": self.prefix,
            "read": self.read,
            "held": self.held,
            "released": self.released,
        }

    @classmethod
    def from_json(cls, stops: Sequence[str], doc: Mapping[str, Any], n_tokens: int) -> TextStream:
        """Restore `to_json`'s state for a sequence of `n_tokens` tokens; InvalidRequest if bad."""
        if not isinstance(doc, Mapping):
            raise InvalidRequest("'text' must be a JSON object")
        prefix, read = _offset(doc, "prefix"), _offset(doc, "read")
        released, held = _offset(doc, "released", 0), doc.get("held", "")
        if not prefix <= read <= n_tokens:
            raise InvalidRequest(
                f"'text' offsets must satisfy prefix <= read <= {n_tokens}, got {prefix}, {read}"
            )
        if not isinstance(held, str):
            raise InvalidRequest(f"'text.held' must be a string, got {type(held).__name__}")
        stream = cls(stops, prefix, read)
        stream.held, stream.released = held, released
        return stream


def _offset(doc: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequest(f"'text.{name}' must be an integer >= 0, got {value!r}")
    return value


def _decode(decoder: Decoder, tokens: Sequence[int]) -> str:
    text = decoder.decode(
        list(tokens), skip_special_tokens=True, clean_up_tokenization_spaces=False
    )
    return str(text)
