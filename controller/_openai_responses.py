"""OpenAI response objects built from invoker events: n choices, logprobs, stop reasons, echo.

    CompletionStream(kind, model, activation_id, created, ...).feed(event) -> chunks
    completion_response(kind, model, activation_id, created, text, finish_reason, usage, ...)
    error_from_event(event)

Logprobs take OpenAI's two shapes. Chat: `choices[i].logprobs.content` is a list of
`{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`. Completions:
`choices[i].logprobs` is `{tokens, token_logprobs, top_logprobs: [{token: logprob}],
text_offset}`. A token is shown by the text the invoker sent for it (`token_text`, or a
third element of a top entry); without one it is vLLM's `token_id:<id>` form.

`stop_reason` (vLLM's field) sits beside `finish_reason`: the stop string that ended a
choice, else null (also for eos, as vLLM reports it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sllm.core.errors import PlatformError, SllmError

USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")


def finish_reason(reason: Any) -> str:
    """OpenAI knows "stop" and "length"; any other end (e.g. a stop sequence) is a stop."""
    return reason if reason in ("stop", "length") else "stop"


def stop_reason(reason: Any, stop: Any) -> str | int | None:
    """vLLM's stop_reason: the stop string (or id) that ended a choice; null for eos and length."""
    if reason in ("eos", "length") or isinstance(stop, bool):
        return None
    return stop if isinstance(stop, (str, int)) else None


def usage_of(usage: Mapping[str, Any], keys: tuple[str, ...] = USAGE_KEYS) -> dict[str, int]:
    """The token counts OpenAI reports; a count the invoker left out is 0."""
    return {key: int(usage.get(key) or 0) for key in keys}


def head(
    kind: str, model: str, activation_id: str, created: float, *, chunk: bool
) -> dict[str, Any]:
    """The fields every completion object starts with; ids are the activation's, prefixed."""
    if kind == "chat":
        obj = "chat.completion.chunk" if chunk else "chat.completion"
        return {
            "id": f"chatcmpl-{activation_id}",
            "object": obj,
            "created": int(created),
            "model": model,
            "system_fingerprint": None,
        }
    return {
        "id": f"cmpl-{activation_id}",
        "object": "text_completion",
        "created": int(created),
        "model": model,
    }


def error_from_event(event: Mapping[str, Any]) -> SllmError:
    """The SllmError an invoker's `{"event": "error", "error": {code, message}}` stands for.

    The class is found by its `code`; an unknown code is a PlatformError.
    """
    default = "the invoker reported an error without a message"
    return PlatformError.from_json(event.get("error"), default)


# ---------------------------------------------------------------------- logprobs
def _token_text(token: Any, text: Any) -> str:
    return text if isinstance(text, str) else f"token_id:{token}"


def _tops(entry: Mapping[str, Any]) -> list[tuple[str, float]]:
    """The alternatives as (text, logprob); the chosen token among them shows its own text."""
    out = []
    for top in entry.get("top_logprobs") or []:
        if isinstance(top, (list, tuple)) and len(top) >= 2:
            text = top[2] if len(top) > 2 else None
            if text is None and top[0] == entry.get("token"):
                text = entry.get("token_text")
            out.append((_token_text(top[0], text), float(top[1])))
    return out


def _chat_entry(entry: Mapping[str, Any]) -> dict[str, Any]:
    token = _token_text(entry.get("token"), entry.get("token_text"))
    return {
        "token": token,
        "logprob": float(entry.get("logprob") or 0.0),
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in _tops(entry)
        ],
    }


def chat_logprobs(entries: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Chat's `logprobs` object for a choice's (or a chunk's) tokens."""
    return {"content": [_chat_entry(e) for e in entries], "refusal": None}


def completion_logprobs(entries: Sequence[Mapping[str, Any]], offset: int = 0) -> dict[str, Any]:
    """The completions `logprobs` object; `offset` is where the first token's text starts."""
    doc: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for entry in entries:
        token = _token_text(entry.get("token"), entry.get("token_text"))
        doc["tokens"].append(token)
        doc["token_logprobs"].append(float(entry.get("logprob") or 0.0))
        doc["top_logprobs"].append(dict(_tops(entry)))
        doc["text_offset"].append(offset)
        offset += len(token)
    return doc


# --------------------------------------------------------------------- responses
class CompletionStream:
    """Turns one generation's invoker events into OpenAI stream chunks, in order.

    For chat, each choice's first chunk carries the assistant role (for completions with
    `echo`, the prompt text); token text follows as content deltas; each choice's end
    ("finish", or "done" for invokers that send none) is a chunk with only its finish
    reason; with `include_usage`, a last chunk with no choices carries the usage (every
    other chunk then has `"usage": null`, as OpenAI sends them).
    """

    def __init__(
        self,
        kind: str,
        model: str,
        activation_id: str,
        created: float,
        *,
        include_usage: bool = False,
        echo: str = "",
        logprobs: bool = False,
    ) -> None:
        self._kind = kind
        self._head = head(kind, model, activation_id, created, chunk=True)
        self._usage: dict[str, Any] = {"usage": None} if include_usage else {}
        self._echo = echo
        self._logprobs = logprobs
        self._started: set[int] = set()
        self._finished: set[int] = set()
        self._offsets: dict[int, int] = {}
        self._n = 1

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        """The chunks for one invoker event; an "error" event raises its SllmError."""
        name = event.get("event")
        if name == "error":
            raise error_from_event(event)
        if name not in ("start", "token", "finish", "done"):
            return []
        chunks: list[dict[str, Any]] = []
        if name == "start":
            n = event.get("n")
            self._n = n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 1
        for i in range(self._n) if name == "start" else [_index(event)]:
            chunks += self._start(i)
        if name == "token":
            chunks += self._token(event)
        elif name == "finish":
            chunks += self._finish(
                _index(event), event.get("finish_reason"), event.get("stop_reason")
            )
        elif name == "done":
            ends = {_index({"choice": c.get("index")}): c for c in event.get("choices") or []}
            for i in sorted(set(range(self._n)) | set(ends) | self._started):
                end = ends.get(i, event if i == 0 else {})
                chunks += self._start(i)
                chunks += self._finish(i, end.get("finish_reason"), end.get("stop_reason"))
            if self._usage:
                usage = usage_of(event.get("usage") or {})
                chunks.append({**self._head, "choices": [], "usage": usage})
        return chunks

    def _start(self, i: int) -> list[dict[str, Any]]:
        if i in self._started:
            return []
        self._started.add(i)
        self._offsets[i] = len(self._echo)
        if self._kind == "chat":
            return [self._chunk(i, {"delta": {"role": "assistant", "content": ""}})]
        return [self._chunk(i, {"text": self._echo})] if self._echo else []

    def _token(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        i, text = _index(event), event.get("text") or ""
        entry = _entry(event) if self._logprobs else None
        if not text and entry is None:
            return []
        logprobs = None
        if entry is not None and self._kind == "chat":
            logprobs = chat_logprobs([entry])
        elif entry is not None:
            logprobs = completion_logprobs([entry], self._offsets[i])
        self._offsets[i] += len(text)
        return [self._chunk(i, self._text(text), logprobs=logprobs)]

    def _finish(self, i: int, reason: Any, stop: Any) -> list[dict[str, Any]]:
        if i in self._finished:
            return []
        self._finished.add(i)
        body = {**self._text(""), "stop_reason": stop_reason(reason, stop)}
        return [self._chunk(i, body, finish_reason(reason))]

    def _text(self, text: str) -> dict[str, Any]:
        if self._kind != "chat":
            return {"text": text}
        return {"delta": {"content": text} if text else {}}

    def _chunk(
        self,
        i: int,
        body: dict[str, Any],
        reason: str | None = None,
        *,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice = {"index": i, **body, "logprobs": logprobs, "finish_reason": reason}
        return {**self._head, "choices": [choice], **self._usage}


def _index(event: Mapping[str, Any]) -> int:
    choice = event.get("choice")
    return choice if isinstance(choice, int) and not isinstance(choice, bool) else 0


def _entry(event: Mapping[str, Any]) -> dict[str, Any] | None:
    if event.get("logprob") is None:
        return None
    return {k: event.get(k) for k in ("token", "logprob", "top_logprobs", "token_text")}


def completion_response(
    kind: str,
    model: str,
    activation_id: str,
    created: float,
    text: str,
    finish: str | None,
    usage: Mapping[str, Any],
    *,
    choices: Sequence[Mapping[str, Any]] | None = None,
    echo: str = "",
    logprobs: bool = False,
) -> dict[str, Any]:
    """A whole `chat.completion` (kind "chat") or `text_completion` object.

    `choices` are the stored result's (index, text, finish_reason, stop_reason, logprobs);
    without them, one choice of `text` ending with `finish`.
    """
    if not choices:
        choices = [{"index": 0, "text": text, "finish_reason": finish}]
    out = []
    for choice in choices:
        body_text = choice.get("text") or ""
        reason = choice.get("finish_reason") or finish
        entries = choice.get("logprobs") or []
        if kind == "chat":
            body: dict[str, Any] = {"message": {"role": "assistant", "content": body_text}}
            lp = chat_logprobs(entries) if logprobs else None
        else:
            body = {"text": echo + body_text}
            lp = completion_logprobs(entries, len(echo)) if logprobs else None
        out.append(
            {
                "index": choice.get("index", 0),
                **body,
                "logprobs": lp,
                "finish_reason": finish_reason(reason),
                "stop_reason": stop_reason(reason, choice.get("stop_reason")),
            }
        )
    base = head(kind, model, activation_id, created, chunk=False)
    return {**base, "choices": out, "usage": usage_of(usage)}
