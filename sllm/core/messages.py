"""Wire messages between the controller and the invokers: typed, frozen, validated.

Each message has `to_json()` and `from_json(doc)`; `from_json` raises
InvalidRequest naming the offending field, so a malformed request is a 400
wherever it arrives.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .errors import InvalidRequest
from .names import MODEL_NAME, MODEL_NAME_RULE

TASKS = ("generate", "embed")
TIERS = ("gpu", "dram", "nvme", "remote")
_FUNCTION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,254}")


def show_value(value: Any) -> str:
    """A bad value for an error message, cut short so a huge body cannot bloat it."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def require_object(doc: Any, what: str = "request body") -> Mapping[str, Any]:
    """`doc` as a JSON object, or InvalidRequest."""
    if not isinstance(doc, Mapping):
        raise InvalidRequest(f"{what} must be a JSON object, got {type(doc).__name__}")
    return doc


EmbedInput = str | list[int]  # one text, or its token ids in the model's vocabulary
# Inputs in one embeddings request, everywhere: the runtime embeds them all in one batch
# (no chunking), so the OpenAI boundary must not accept more than an invoker runs.
MAX_EMBED_INPUTS = 256


def embedding_inputs(value: Any, max_inputs: int = MAX_EMBED_INPUTS) -> list[EmbedInput]:
    """An embeddings `input` as 1..max_inputs items: OpenAI's string, list of strings, list
    of token ids or list of such lists (what LangChain sends by default).

    E.g. "a" -> ["a"], [1, 2] -> [[1, 2]], [[1, 2], [3]] -> [[1, 2], [3]].
    `max_inputs` never exceeds MAX_EMBED_INPUTS, whatever a caller passes.
    """
    max_inputs = min(max_inputs, MAX_EMBED_INPUTS)
    if isinstance(value, str) or (
        isinstance(value, list) and value and all(_is_token(t) for t in value)
    ):
        value = [value]
    rule = (
        f"'input' must be a non-empty string or token id list, or a list of 1-{max_inputs} of them"
    )
    if not isinstance(value, list) or not 1 <= len(value) <= max_inputs:
        raise InvalidRequest(f"{rule}, got {show_value(value)}", param="input")
    for i, item in enumerate(value):
        text = isinstance(item, str) and item
        ids = isinstance(item, list) and item and all(_is_token(t) for t in item)
        if not (text or ids):
            raise InvalidRequest(
                f"{rule}; 'input[{i}]' is {show_value(item)} (token ids are integers >= 0)",
                param="input",
            )
    return list(value)


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def field_str(doc: Mapping[str, Any], name: str, pattern: re.Pattern[str], rule: str) -> str:
    """A required string field matching all of `pattern`, without '..'; the error states `rule`."""
    value = doc.get(name)
    if not isinstance(value, str) or not pattern.fullmatch(value) or ".." in value:
        raise InvalidRequest(f"{name!r} must be {rule}, got {value!r}")
    return value


def field_int(doc: Mapping[str, Any], name: str, default: int, lo: int, hi: int) -> int:
    """An optional integer field within [lo, hi]."""
    value = doc.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InvalidRequest(f"{name!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


@dataclass(frozen=True)
class FunctionSpec:
    """What an invoker needs to know about a function to run it."""

    function: str  # "namespace/name" as the controller names it
    model: str  # published model name
    task: str = "generate"
    concurrency: int = 4

    @classmethod
    def from_json(cls, doc: Any, *, default_concurrency: int = 4) -> FunctionSpec:
        """Parse and validate; `concurrency` defaults to the invoker's setting."""
        d = require_object(doc)
        task = d.get("task", "generate")
        if task not in TASKS:
            raise InvalidRequest(f"'task' must be one of {list(TASKS)}, got {task!r}")
        return cls(
            function=field_str(
                d, "function", _FUNCTION_ID, "1-255 characters of letters, digits, . _ - /"
            ),
            model=field_str(
                d,
                "model",
                MODEL_NAME,
                f"a published model name: {MODEL_NAME_RULE}",
            ),
            task=task,
            concurrency=field_int(d, "concurrency", default_concurrency, 1, 1024),
        )

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)


@dataclass(frozen=True)
class LoadReport:
    """How an instance came to be ready: which tier it loaded from and how long it took."""

    function: str
    model: str
    digest: str
    tier: str  # gpu (already warm) | dram | nvme | remote
    cold: bool
    load_seconds: float
    nbytes: int
    device: str
    fetched_bytes: int = 0
    resumed_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The JSON form."""
        return asdict(self)

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> LoadReport:
        """Parse (trusted: it comes from an invoker)."""
        return cls(**{k: doc[k] for k in cls.__dataclass_fields__ if k in doc})
