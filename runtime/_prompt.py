"""From a request's prompt or chat messages to token ids."""

from __future__ import annotations

from typing import Any

from sllm.core.errors import InvalidRequest

ROLES = ("system", "user", "assistant", "tool")
MAX_MESSAGES = 4096


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer: Any, prompt: Any) -> list[int]:
    """Token ids of a text prompt, with the special tokens the model usually sees around it."""
    if not isinstance(prompt, str):
        raise InvalidRequest(f"'prompt' must be a string, got {type(prompt).__name__}")
    return [int(t) for t in tokenizer(prompt, add_special_tokens=True)["input_ids"]]


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """Chat messages as `{"role", "content"}` dicts, or InvalidRequest naming the bad one.

    Content may also be OpenAI's list of parts; only text parts are accepted, joined.
    """
    if not isinstance(messages, list) or not 1 <= len(messages) <= MAX_MESSAGES:
        raise InvalidRequest(f"'messages' must be a list of 1-{MAX_MESSAGES} message objects")
    out = []
    for i, message in enumerate(messages):
        where = f"'messages[{i}]'"
        if not isinstance(message, dict):
            raise InvalidRequest(f"{where} must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in ROLES:
            raise InvalidRequest(f"{where}.role must be one of {list(ROLES)}, got {role!r}")
        out.append({"role": role, "content": _content(message.get("content"), where)})
    return out


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise InvalidRequest(f"{where}.content parts must be text parts")
            text = part.get("text")
            if not isinstance(text, str):
                raise InvalidRequest(f"{where}.content text part needs a string 'text'")
            texts.append(text)
        return "".join(texts)
    raise InvalidRequest(f"{where}.content must be a string, got {type(content).__name__}")


def encode_messages(tokenizer: Any, messages: Any) -> list[int]:
    """Token ids of a chat through the tokenizer's template, ending with the assistant's turn."""
    from jinja2 import TemplateError

    checked = check_messages(messages)
    if not has_chat_template(tokenizer):
        raise InvalidRequest("model has no chat template; use prompt")
    try:
        ids = tokenizer.apply_chat_template(checked, add_generation_prompt=True, tokenize=True)
    except TemplateError as exc:  # templates reject e.g. roles out of order with raise_exception
        raise InvalidRequest(f"the model's chat template rejected the messages: {exc}") from exc
    # transformers 5 returns a BatchEncoding here; 4.x returned the list itself.
    if not isinstance(ids, list):
        ids = ids["input_ids"]
    return [int(t) for t in ids]
