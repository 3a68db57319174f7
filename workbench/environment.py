"""The numbers and switches vibench reads from environment variables (``VIBENCH_DIST_TIMEOUT``,
``VIBENCH_COMPILE_MAX_OPS``, ``VIBENCH_PLUGIN_TIMEOUT``, ``VIBENCH_BACKGROUND_COMPILE``), read
one way: unset or empty is the default; anything else must be a value of the right kind, or it
is one line naming the variable, its value and what was expected."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

from workbench.errors import UsageError


def seconds(name: str, default: float) -> float:
    """A positive, finite number of seconds from ``name``, else ``default`` where unset."""
    return _read(name, default, float, lambda v: math.isfinite(v) and v > 0,
                   f"a number of seconds above 0 (default {default:g})")


def count(name: str, default: int, what: str) -> int:
    """A whole number >= 0 of ``what`` from ``name``, else ``default`` where unset."""
    return _read(name, default, int, lambda v: v >= 0,
                   f"a whole number of {what} (default {default})")


def switch(name: str, default: bool) -> bool:
    """true or false (also 1 or 0, yes or no, on or off) from ``name``, else ``default``."""
    return _read(name, default, lambda text: _SWITCHES[text.lower()], lambda v: True,
                   f"true or false (default {str(default).lower()})")


_SWITCHES = {"true": True, "1": True, "yes": True, "on": True,
             "false": False, "0": False, "no": False, "off": False}


def _read(name: str, default: Any, parse: Callable[[str], Any],
            valid: Callable[[Any], bool], expected: str) -> Any:
    """``name``'s value parsed, ``default`` where unset or empty; one line where it does not
    parse or is not ``valid``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = parse(text)
    except (ValueError, KeyError):
        value = None
    if value is None or not valid(value):
        raise UsageError(f"{name}={text!r}: expected {expected}")
    return value
