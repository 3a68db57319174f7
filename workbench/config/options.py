"""A component's options, read from its factory's signature, and checks of recipe values."""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Union

REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Option:
    """One keyword parameter of a factory: what a recipe may set."""

    name: str
    default: Any
    annotation: Any

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def type_name(self) -> str:
        return type_name(self.annotation)

    def accepts(self, value: Any) -> bool:
        """Whether a recipe may set this option to ``value``; the factory's own default always
        fits, even a non-finite one, so a saved recipe runs again."""
        return accepts(value, self.annotation) or _same_float(value, self.default)

    def refusal(self, value: Any) -> str:
        """What the recipe check says of a value this option does not accept."""
        if _non_finite(value) and self.accepts(_made_finite(value)):
            if not isinstance(value, (list, dict)):
                return f"expected a finite number, got {value!r}"
            return f"expected {self.type_name()} of finite numbers, got {value!r}"
        return f"expected {self.type_name()}, got {value!r}"


def read_options(
    factory: Callable, injected: frozenset[str]
) -> tuple[dict[str, Option], frozenset[str], bool]:
    """The options of ``factory`` (its named parameters less the injected ones), the injected
    ones it takes, and whether it takes ``**kwargs`` (then further options pass unchecked)."""
    signature = inspect.signature(factory)
    try:  # a class's option hints are on its __init__, not on the class
        hints = typing.get_type_hints(factory.__init__ if inspect.isclass(factory) else factory)
    except Exception:  # an annotation naming something not importable: fall back to defaults
        hints = {}
    options: dict[str, Option] = {}
    wants = frozenset(signature.parameters) & injected
    var_keyword = False
    for param in signature.parameters.values():
        if param.kind is param.VAR_KEYWORD:
            var_keyword = True
            continue
        if param.kind is param.VAR_POSITIONAL or param.name in injected:
            continue
        annotation = hints.get(param.name, REQUIRED)
        if annotation is REQUIRED:
            annotation = _type_of_default(param.default)
        options[param.name] = Option(param.name, param.default, annotation)
    return options, wants, var_keyword


def _type_of_default(default: Any) -> Any:
    """The type an unannotated option takes, judged by its default: a builtin's type, else any.

    Defaults are tested by identity, never ``==``: an array or tensor default compares
    elementwise and cannot say whether it equals ``REQUIRED``.
    """
    if default is REQUIRED or default is None:
        return REQUIRED
    kind = type(default)
    return kind if kind.__module__ == "builtins" else Any


def accepts(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a type hint; hints this cannot judge accept anything."""
    if annotation is REQUIRED or annotation is Any:
        return True
    if annotation is None or annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:  # NaN and infinities fail a run at its first step, so not here
        return isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value)
    if annotation in (str, list, dict, tuple):
        return isinstance(value, list if annotation is tuple else annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return any(accepts(value, arg) for arg in args)
    if origin is Literal:
        return value in args
    if origin in (list, tuple) or _is_abc(origin, "Sequence"):
        if not isinstance(value, list):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(accepts, value, args))
        return not args or all(accepts(item, args[0]) for item in value)
    if origin is dict or _is_abc(origin, "Mapping"):
        return isinstance(value, dict) and (
            not args or all(accepts(item, args[1]) for item in value.values())
        )
    if isinstance(annotation, type) and annotation.__module__ == "builtins":
        return isinstance(value, annotation)
    return True


def type_name(annotation: Any) -> str:
    """A type hint as a user reads it: 'float', 'list of float', 'int or None'."""
    if annotation is REQUIRED or annotation is Any:
        return "any value"
    if annotation is None or annotation is type(None):
        return "None"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(arg) for arg in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(arg) for arg in args)
    if origin is tuple and args and args[-1] is not Ellipsis:
        return f"list of {len(args)} " + "/".join(type_name(arg) for arg in args)
    if origin in (list, tuple) or _is_abc(origin, "Sequence"):
        return f"list of {type_name(args[0])}" if args else "list"
    if origin is dict or _is_abc(origin, "Mapping"):
        return f"mapping of {type_name(args[1])}" if args else "mapping"
    if annotation is dict:
        return "mapping"
    return getattr(annotation, "__name__", str(annotation))


def _finite(number: int | float) -> bool:
    """Whether a number is finite as a float (an int too big for a float is not)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


def _non_finite(value: Any) -> bool:
    """Whether a YAML value is or holds a number that is not finite."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return not _finite(value)
    if isinstance(value, dict):
        return any(map(_non_finite, value.values()))
    return isinstance(value, list) and any(map(_non_finite, value))


def _made_finite(value: Any) -> Any:
    """``value`` with each non-finite number made 0.0: does it fit but for those numbers?"""
    if isinstance(value, dict):
        return {key: _made_finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_made_finite(item) for item in value]
    return 0.0 if _non_finite(value) else value


def _same_float(value: Any, default: Any) -> bool:
    """Whether both are the same float, NaN included (NaN != NaN)."""
    if not (isinstance(value, float) and isinstance(default, float)):
        return False
    return value == default or (math.isnan(value) and math.isnan(default))


def _is_abc(origin: Any, name: str) -> bool:
    return origin is not None and getattr(origin, "__name__", "") == name
