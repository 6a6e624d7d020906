"""Test hook, on PYTHONPATH of an invoker process only: every Generation.step sleeps first.

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
    from sllm.runtime import Generation

    _step = Generation.step

    def _slow_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        time.sleep(_DELAY)
        return _step(self, *args, **kwargs)

    Generation.step = _slow_step  # type: ignore[method-assign]
