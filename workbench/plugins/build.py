"""Making a component from its recipe section: the factory's options from the recipe, the
run's context where the factory asks for it, and a check that it made the right kind of thing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from workbench.config.kinds import COMPONENTS, LISTS
from workbench.config.recipe import options
from workbench.errors import UsageError, one_line
from workbench.plugins.registry import Registry

LOGGER_METHODS = ("scalar", "histogram", "image", "flush", "close")


def build(registry: Registry, kind: str, section: dict, **context: Any) -> Any:
    """Make one component from its recipe section; a factory that refuses its options is a
    recipe problem."""
    component = registry.get(kind, section["name"])
    path = next(p for p, k in {**COMPONENTS, **LISTS}.items() if k == kind)
    try:
        made = component.build(options(section, path), **context)
    except Exception as exc:
        raise UsageError(f"{kind} {component.name!r}: {one_line(exc)}") from exc
    import pyro.optim

    fits = {"optimizer": lambda m: isinstance(m, pyro.optim.PyroOptim),
            "dataset": lambda m: isinstance(m, Mapping),
            "logger": lambda m: any(hasattr(m, method) for method in LOGGER_METHODS),
            "stage": lambda m: callable(getattr(m, "run", None)),
            }.get(kind, callable)
    if not fits(made):
        origin = "that file" if component.plugin.endswith(".py") else "that plugin"
        raise UsageError(f"{kind} {component.name!r} from {component.plugin!r} made "
                         f"{type(made).__name__}, which is not a {kind}: a bug in {origin}")
    return made
