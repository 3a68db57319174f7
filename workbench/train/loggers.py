"""The run's loggers (experiment trackers) as one: each call goes to every logger that has
the method. A logger that raises is reported once and left out, so losing a tracker never
costs the run (see ``hookspecs.register_loggers`` for what a logger is)."""

from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path
from typing import Any

from workbench.errors import one_line
from workbench.plugins.build import build
from workbench.plugins.registry import Registry

HAND_OVER_RECORDS = 1024  # scalars queued before the loggers get them
HAND_OVER_SECONDS = 1.0  # the longest a scalar waits, while scalars come (a live TensorBoard)


class Loggers:
    """Every logger a recipe lists, called in turn. Scalars (``Train/loss`` comes every step)
    are queued with their wall time and handed over in batches, to a logger's ``scalars`` where
    it has one: a call per logger and step cost more than a fast compiled step's 10%."""

    def __init__(self, loggers: list[tuple[str, Any]]):
        self.loggers = loggers  # (name, logger)
        self._queue: list[tuple[str, float, int, float]] = []  # (tag, value, step, wall time)
        self._due = time.time() + HAND_OVER_SECONDS
        self._takers = self._scalar_takers()

    @classmethod
    def of(cls, registry: Registry, recipe: dict, run_dir: Path, start_step: int) -> Loggers:
        return cls([(section["name"], build(registry, "logger", section, run_dir=run_dir,
                                            start_step=start_step, recipe=recipe))
                    for section in recipe.get("loggers", [])])

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._takers:
            now = time.time()
            self._queue.append((tag, value, step, now))
            if now >= self._due or len(self._queue) >= HAND_OVER_RECORDS:
                self._hand_over()

    def histogram(self, tag: str, values: Any, step: int) -> None:
        self._call("histogram", tag, values, step)

    def image(self, tag: str, image: Any, step: int) -> None:
        self._call("image", tag, image, step)

    def flush(self) -> None:
        self._call("flush")

    def close(self, summary: dict | None = None) -> None:
        self._call("close", summary)

    def _hand_over(self) -> None:
        """The queued scalars, to each logger that takes them."""
        self._due = time.time() + HAND_OVER_SECONDS
        if self._queue:
            records, self._queue = self._queue, []
            self._each(self._takers, "scalar", records)

    def _scalar_takers(self) -> list[tuple[tuple[str, Any], Any]]:
        """(entry, a callable of a batch of records) for each logger that takes scalars: its
        ``scalars``, or its ``scalar`` called once a record."""
        takers = []
        for entry in self.loggers:
            batch, one = (getattr(entry[1], name, None) for name in ("scalars", "scalar"))
            if batch is not None:
                takers.append((entry, batch))
            elif one is not None:
                takers.append((entry, functools.partial(_one_by_one, one)))
        return takers

    def _methods(self, method: str) -> list[tuple[tuple[str, Any], Any]]:
        """Each logger's ``method`` (for the loggers that have it), with its entry."""
        return [(entry, getattr(entry[1], method)) for entry in self.loggers
                if getattr(entry[1], method, None) is not None]

    def _call(self, method: str, *args: Any) -> None:
        self._hand_over()  # what was logged before goes first
        self._each(self._methods(method), method, *args)

    def _each(self, found: list[tuple[tuple[str, Any], Any]], method: str, *args: Any) -> None:
        """Call each of ``found`` (``_methods``); a logger that fails is left out."""
        for entry, fn in found:
            try:
                fn(*args)
            except Exception as exc:
                if entry in self.loggers:
                    self.loggers.remove(entry)
                    self._takers = self._scalar_takers()
                warnings.warn(f"logger {entry[0]!r} failed in {method} and is left out for the "
                              f"rest of the run: {one_line(exc)}", stacklevel=3)


def _one_by_one(scalar: Any, records: list[tuple[str, float, int, float]]) -> None:
    for tag, value, step, _ in records:
        scalar(tag, value, step)
