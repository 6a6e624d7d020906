"""Checks of an exported generation state that arrives in a request (resume, continue)."""

from __future__ import annotations

from typing import Any

from sllm.core.errors import InvalidRequest

MAX_HELD_CHARS = 4096  # text a state may hold back for stop strings


def check_state(state: Any) -> dict[str, Any]:
    """Cheap shape checks of an exported state before any load (the runtime parses the rest).

    Bounds what the runtime's parse would spend time on: the sampler may not claim
    more draws than the state has generated tokens (replaying draws costs time per
    draw), and the held-back text is short.
    """
    if not isinstance(state, dict):
        raise InvalidRequest(
            "'state' must be a generation's exported state (an object)", param="state"
        )
    tokens, prompt_len = state.get("tokens"), state.get("prompt_len")
    if not isinstance(tokens, list) or not tokens:
        raise InvalidRequest(
            "'state.tokens' must be a non-empty list of token ids", param="state.tokens"
        )
    if (
        isinstance(prompt_len, bool)
        or not isinstance(prompt_len, int)
        or not 1 <= prompt_len <= len(tokens)
    ):
        raise InvalidRequest(
            f"'state.prompt_len' must be an integer in [1, {len(tokens)}], got {prompt_len!r}",
            param="state.prompt_len",
        )
    for key in ("params", "sampler", "text"):
        if state.get(key) is not None and not isinstance(state[key], dict):
            raise InvalidRequest(f"'state.{key}' must be an object", param=f"state.{key}")
    sampler = state.get("sampler") or {}
    draws = sampler.get("draws")
    generated = len(tokens) - prompt_len
    if draws is not None and (
        isinstance(draws, bool) or not isinstance(draws, int) or not 0 <= draws <= generated
    ):
        raise InvalidRequest(
            f"'state.sampler.draws' must be an integer in [0, {generated}] (one draw per "
            f"generated token at most), got {draws!r}",
            param="state.sampler.draws",
        )
    held = (state.get("text") or {}).get("held")
    if isinstance(held, str) and len(held) > MAX_HELD_CHARS:
        raise InvalidRequest(
            f"'state.text.held' must be at most {MAX_HELD_CHARS} characters",
            param="state.text.held",
        )
    return state
