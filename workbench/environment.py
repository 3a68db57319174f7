"""The numbers vibench reads from environment variables (``VIBENCH_DIST_TIMEOUT``,
``VIBENCH_COMPILE_MAX_OPS``, ``VIBENCH_PLUGIN_TIMEOUT``), read one way: unset or empty is the
default; anything else must be a number of the right kind, or it is one line naming the
variable, its value and what was expected."""

from __future__ import annotations

import math
import os

from workbench.errors import UsageError


def seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds from ``name``, else ``default`` where unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"{name}={text!r}: expected a number of seconds above 0 "
                         f"(default {default:g})")
    return value


def count(name: str, default: int, what: str) -> int:
    """A whole number >= 0 of ``what`` from ``name``, else ``default`` where unset."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise UsageError(f"{name}={text!r}: expected a whole number of {what} "
                         f"(default {default})")
    return value
