"""The run's loggers (experiment trackers) as one: each call goes to every logger that has
the method. A logger that raises is reported once and left out, so losing a tracker never
costs the run (see ``hookspecs.register_loggers`` for what a logger is)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from workbench.errors import one_line
from workbench.plugins.build import build
from workbench.plugins.registry import Registry


class Loggers:
    """Every logger a recipe lists, called in turn."""

    def __init__(self, loggers: list[tuple[str, Any]]):
        self.loggers = loggers  # (name, logger)
        self._scalars = self._methods("scalar")  # called every step: looked up once

    @classmethod
    def of(cls, registry: Registry, recipe: dict, run_dir: Path, start_step: int) -> Loggers:
        return cls([(section["name"], build(registry, "logger", section, run_dir=run_dir,
                                            start_step=start_step, recipe=recipe))
                    for section in recipe.get("loggers", [])])

    def scalar(self, tag: str, value: float, step: int) -> None:
        self._each(self._scalars, "scalar", tag, value, step)

    def histogram(self, tag: str, values: Any, step: int) -> None:
        self._call("histogram", tag, values, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        self._call("image", tag, image, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self, summary: dict | None = None) -> None:
        self._call("close", summary)

    def _methods(self, method: str) -> list[tuple[tuple[str, Any], Any]]:
        """Each logger's ``method`` (for the loggers that have it), with its entry."""
        return [(entry, getattr(entry[1], method)) for entry in self.loggers
                if getattr(entry[1], method, None) is not None]

    def _call(self, method: str, *args: Any) -> None:
        self._each(self._methods(method), method, *args)

    def _each(self, found: list[tuple[tuple[str, Any], Any]], method: str, *args: Any) -> None:
        """Call each of ``found`` (``_methods``); a logger that fails is left out."""
        for entry, fn in found:
            try:
                fn(*args)
            except Exception as exc:
                if entry in self.loggers:
                    self.loggers.remove(entry)
                    self._scalars = self._methods("scalar")
                warnings.warn(f"logger {entry[0]!r} failed in {method} and is left out for the "
                              f"rest of the run: {one_line(exc)}", stacklevel=3)
