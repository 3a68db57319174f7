"""A rich progress bar on stderr, when stderr is a terminal; the CLI's run and compare share it.
Also a spinner for silent work of unknown length (compiling the step)."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Any


class TerminalBar:
    """One task's bar on stderr: label, bar, done of total, then ``columns`` (a format string
    over the task's ``fields``, or a rich column class, or a class's name in
    ``rich.progress``, such as "TimeElapsedColumn", so that rich is imported only for a
    terminal). ``self.bar`` is None when stderr is no terminal, and the subclass prints plain
    lines instead."""

    def __init__(self, label: str, total: int, columns: list[Any], **fields: Any):
        self.bar = None
        if sys.stderr.isatty():
            import rich.progress
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            def column(c: Any) -> Any:
                if isinstance(c, str):
                    named = getattr(rich.progress, c, None) if c.endswith("Column") else None
                    return named() if named is not None else TextColumn(c)
                return c()

            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                *[column(c) for c in columns], console=Console(stderr=True))
            self.task = self.bar.add_task(label, total=total, **fields)

    def __enter__(self) -> TerminalBar:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()


@contextlib.contextmanager
def working(line: str, done: str) -> Iterator[None]:
    """Say on stderr what a long, silent piece of work is doing. On a terminal: ``line`` with
    a spinner and the seconds so far, then, if the work ends well, ``done`` formatted with
    ``seconds`` (the spinner leaves nothing when the work fails or a stop signal ends it:
    whoever handles that says so). Elsewhere (a file, a pipe, a notebook's stream): ``line``
    alone, at the start."""
    if not sys.stderr.isatty():
        print(line, file=sys.stderr, flush=True)
        yield
        return
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column

    console = Console(stderr=True)
    began = time.monotonic()
    # a narrow terminal shortens the text, never the spinner or the seconds
    text = Column(ratio=1, no_wrap=True, overflow="ellipsis")
    with Progress(SpinnerColumn(), TextColumn(line, markup=False, table_column=text),
                  TimeElapsedColumn(), expand=True, console=console,
                  transient=True) as spinner:
        spinner.add_task(line, total=None)
        yield
    console.print(done.format(seconds=time.monotonic() - began), highlight=False, markup=False)
