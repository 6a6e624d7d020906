"""Test hook, on PYTHONPATH of an invoker process only: every decode step sleeps first.

SLLM_TEST_STEP_DELAY seconds (unset or 0: nothing is patched). A tiny test model
decodes a whole answer in milliseconds; slowed down, a test can pause or cancel
a generation while it runs, without racing its end.
"""

from __future__ import annotations

import os
import time
from typing import Any

_DELAY = float(os.environ.get("SLLM_TEST_STEP_DELAY") or 0)

if _DELAY > 0:
    import importlib

    def _slowed(step: Any) -> Any:
        def _slow_step(self: Any, *args: Any, **kwargs: Any) -> Any:
            time.sleep(_DELAY)
            return step(self, *args, **kwargs)

        return _slow_step

    # Whatever decodes one step in this runtime: a serial generation's step(), or the
    # batching engine's decode pass (its thread runs ahead of the streams' step() calls).
    for _module, _name, _method in (
        ("sllm.runtime._generation", "Generation", "step"),
        ("sllm.runtime._serial", "SerialGeneration", "step"),
        ("sllm.runtime._batch", "Batcher", "_decode"),
    ):
        try:
            _mod = importlib.import_module(_module)
        except ImportError:
            continue
        _cls = getattr(_mod, _name, None)
        if (
            isinstance(_cls, type)
            and _method in vars(_cls)
            and not getattr(_cls, "_is_protocol", False)
        ):
            setattr(_cls, _method, _slowed(getattr(_cls, _method)))
