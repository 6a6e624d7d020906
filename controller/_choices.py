"""The choices of one generation, gathered from its invoker events (n >= 1, logprobs, stop reasons).

    Choices().feed(event)        token / finish / done events, in order
    .result(reason, usage)       the stored result: {"text", "finish_reason", "stop_reason",
                                 "usage", "choices": [{"index", "text", "finish_reason",
                                 "stop_reason", "logprobs"?}]}

Token events name their choice (`"choice": i`, 0 when absent, as older invokers send);
each choice ends with a "finish" event, and "done" repeats every choice's end. A token's
logprob entry is {"token": id, "logprob": lp, "top_logprobs": [[id, lp], ...],
"token_text"?: str}; the text of a token travels only when the invoker sends it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ._activations import Run


def _choice_of(event: Mapping[str, Any]) -> int:
    choice = event.get("choice")
    return choice if isinstance(choice, int) and not isinstance(choice, bool) else 0


def logprob_entry(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """A token event's logprob entry, or None when the event carries none."""
    if event.get("logprob") is None:
        return None
    entry = {
        "token": event.get("token"),
        "logprob": event.get("logprob"),
        "top_logprobs": event.get("top_logprobs") or [],
    }
    if isinstance(event.get("token_text"), str):
        entry["token_text"] = event["token_text"]
    return entry


class Choices:
    """Per-choice text, logprobs and ends of one generation, fed its events in order."""

    def __init__(self) -> None:
        self._text: dict[int, list[str]] = {}
        self._logprobs: dict[int, list[dict[str, Any]]] = {}
        self._ends: dict[int, tuple[Any, Any]] = {}
        self.tokens = 0  # token events with text, the count when usage is missing

    def feed(self, event: Mapping[str, Any]) -> None:
        """Take in one invoker event; events other than token / finish / done are ignored."""
        kind = event.get("event")
        if kind == "token":
            i = _choice_of(event)
            text = event.get("text") or ""
            self._text.setdefault(i, []).append(text)
            self.tokens += bool(text)
            entry = logprob_entry(event)
            if entry is not None:
                self._logprobs.setdefault(i, []).append(entry)
        elif kind == "finish":
            self._ends[_choice_of(event)] = (event.get("finish_reason"), event.get("stop_reason"))
        elif kind == "done":
            for choice in event.get("choices") or []:
                if isinstance(choice, Mapping):
                    i = _choice_of({"choice": choice.get("index")})
                    end = (choice.get("finish_reason"), choice.get("stop_reason"))
                    self._ends.setdefault(i, end)
            self._ends.setdefault(0, (event.get("finish_reason"), event.get("stop_reason")))

    def text(self, index: int = 0) -> str:
        """The text of choice `index` so far."""
        return "".join(self._text.get(index, []))

    def result(self, reason: Any, usage: Mapping[str, Any]) -> dict[str, Any]:
        """The stored result; a choice without an end of its own takes `reason`."""
        indexes = sorted(set(self._text) | set(self._ends) | {0})
        choices = []
        for i in indexes:
            finish, stop = self._ends.get(i, (reason, None))
            choice: dict[str, Any] = {
                "index": i,
                "text": self.text(i),
                "finish_reason": finish if finish is not None else reason,
                "stop_reason": stop,
            }
            if i in self._logprobs:
                choice["logprobs"] = self._logprobs[i]
            choices.append(choice)
        first = choices[0]
        return {
            "text": first["text"],
            "finish_reason": reason,
            "stop_reason": first["stop_reason"],
            "usage": dict(usage),
            "choices": choices,
        }


def partial_result(
    run: Run, text: Choices, reason: str | None, usage: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The stored result of a generation from what was relayed (`usage` when known)."""
    tokens_out = run.tokens_out if run.tokens_out is not None else text.tokens
    return text.result(
        reason,
        usage
        or {
            "prompt_tokens": run.tokens_in or 0,
            "completion_tokens": tokens_out,
            "total_tokens": (run.tokens_in or 0) + tokens_out,
        },
    )
