"""Test hook, on PYTHONPATH of an invoker process only: every decode step sleeps first.

SLLM_TEST_STEP_DELAY seconds (unset or 0: nothing is patched). A tiny test model
decodes a whole answer in milliseconds; slowed down, a test can pause or cancel
a generation while it runs, without racing its end. SLLM_TEST_PREFILL_DELAY
likewise slows each prefill pass of the batching engine (a migration round that
does not finish within its wait).
"""

from __future__ import annotations

import os
import time
from typing import Any

_DELAY = float(os.environ.get("SLLM_TEST_STEP_DELAY") or 0)
_PREFILL_DELAY = float(os.environ.get("SLLM_TEST_PREFILL_DELAY") or 0)


def _slowed(step: Any, delay: float) -> Any:
    def _slow_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(delay)
        return step(self, *args, **kwargs)

    return _slow_step


def _patch(methods: tuple[tuple[str, str, str], ...], delay: float) -> None:
    import importlib

    for module, name, method in methods:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        cls = getattr(mod, name, None)
        if (
            isinstance(cls, type)
            and method in vars(cls)
            and not getattr(cls, "_is_protocol", False)
        ):
            setattr(cls, method, _slowed(getattr(cls, method), delay))


if _DELAY > 0:
    # Whatever decodes one step in this runtime: a serial generation's step(), or the
    # batching engine's decode pass (its thread runs ahead of the streams' step() calls).
    _patch(
        (
            ("sllm.runtime._generation", "Generation", "step"),
            ("sllm.runtime._serial", "SerialGeneration", "step"),
            ("sllm.runtime._batch", "Batcher", "_decode"),
        ),
        _DELAY,
    )
if _PREFILL_DELAY > 0:
    _patch((("sllm.runtime._batch", "Batcher", "_prefill_pass"),), _PREFILL_DELAY)
