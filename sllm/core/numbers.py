"""JSON numbers as request fields take them: integers that are no booleans, finite floats."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """Whether `value` is a JSON integer (true/false arrive as bool, which Python counts as int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """Whether `value` is a JSON integer or a finite float (never an OverflowError on a big int)."""
    return is_int(value) or (isinstance(value, float) and math.isfinite(value))
