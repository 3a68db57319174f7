"""JSON that strict readers accept: NaN and infinities become null, never bare ``NaN``."""

from __future__ import annotations

import json
import math
from typing import Any


def plain(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None and tuples made lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    return value


def numbers(value: Any) -> list[float]:
    """A summary.json value, a number or nested lists of numbers (a site's mean, say), as one
    flat list of floats."""
    if isinstance(value, list):
        return [x for item in value for x in numbers(item)]
    return [float(value)]


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` of ``plain(value)``; what JSON cannot hold is written as its repr."""
    return json.dumps(plain(value), allow_nan=False, default=repr, **kwargs)
