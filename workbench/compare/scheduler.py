"""Running a comparison's runs on a backend, ``jobs`` at a time, each for at most its
``--timeout``, with its progress on stderr.

A stop signal (workbench.signals.STOP_SIGNALS: Ctrl-C, SIGTERM, SIGHUP) only counts while the
runs go: the first stops new runs and asks the live ones to save and stop, the second kills
them. Every run gets a result either way, and the results are written in full.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from workbench.compare.backends import NOT_STARTED, POLL_SECONDS, Backend, Control, Job
from workbench.compare.metrics import untrusted
from workbench.compare.plan import Grid, Spec, label
from workbench.compare.results import Result, collect, refused
from workbench.errors import one_line
from workbench.progress import TerminalBar
from workbench.signals import STOP_SIGNALS


class Runner:
    """Runs specs on a backend (child processes here, or Ray tasks), ``jobs`` at a time, each
    for at most ``timeout`` seconds.

    ``signals`` holds the stop signals received, in order (see ``counting_signals``): the
    first stops new runs and asks the live ones to save and stop, the second kills them.
    Every spec gets a result either way.
    """

    def __init__(self, recipe: Path, compare_dir: Path, jobs: int, backend: Backend,
                 timeout: float | None = None):
        self.recipe = recipe
        self.compare_dir = compare_dir
        self.jobs = jobs
        self.backend = backend
        self.lock = threading.Lock()
        self.signals: list[int] = []
        self.control = Control(timeout)

    @property
    def timeout(self) -> float | None:
        return self.control.timeout

    def run_one(self, spec: Spec) -> Result:
        """Run one spec on the backend and read what it left."""
        run_dir = self.compare_dir / spec.name
        if spec.refused:
            return refused(spec, run_dir)
        job = Job(spec.recipe or self.recipe, run_dir, spec.seed, spec.sets)
        with self.lock:
            if self.control.stopping:
                return Result(spec, run_dir, "interrupted", error=NOT_STARTED)
            handle = self.backend.start(job)
        outcome = self.backend.wait(handle, job, self.control)
        if outcome.lost == NOT_STARTED:
            return Result(spec, run_dir, "interrupted", error=NOT_STARTED)
        return collect(spec, run_dir, outcome, self.timeout)

    def run_all(self, specs: list[Spec], on_done: Callable[[Result], None],
                on_note: Callable[[str], None]) -> list[Result]:
        """Each spec's result, in order; ``on_done`` gets each as it finishes (but not the runs
        a stop kept from starting), ``on_note`` a line when the signals stop or kill the runs."""
        results: dict[int, Result] = {}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            futures = {pool.submit(self.run_one, spec): i for i, spec in enumerate(specs)}
            pending = set(futures)
            while pending:
                done, pending = wait(pending, timeout=POLL_SECONDS, return_when=FIRST_COMPLETED)
                for future in done:
                    spec = specs[futures[future]]
                    try:
                        result = future.result()
                    except Exception as exc:  # e.g. no more processes or files: this run only
                        result = Result(spec, self.compare_dir / spec.name, "failed",
                                        error=f"could not run it: {one_line(exc)}")
                    results[futures[future]] = result
                    if result.error != NOT_STARTED:
                        _quietly(on_done, result)
                self.heed(on_note)
        return [results[i] for i in range(len(specs))]

    def heed(self, on_note: Callable[[str], None]) -> None:
        """Act on the signals received so far: the first stops, the second kills."""
        if self.signals and not self.control.stopping:
            with self.lock:
                self.control.stopping = True
            _quietly(on_note, "stopping: no new runs; each running one saves what it learned "
                              "and stops (Ctrl-C again to kill them)")
        if len(self.signals) > 1 and not self.control.killing:
            self.control.killing = True
            _quietly(on_note, "killing the runs still going")


@contextlib.contextmanager
def counting_signals(runner: Runner) -> Iterator[None]:
    """While this lasts, the stop signals are only recorded in ``runner.signals``, so no
    signal cuts the runs' results or the writing of them short (the main thread only; a
    signal ignored when compare started, as under nohup, stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def record(signum: int, frame: Any) -> None:
        runner.signals.append(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, record)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _quietly(call: Callable[[Any], None], arg: Any) -> None:
    """Call a progress callback; a terminal gone (SIGHUP) must not stop the runs."""
    try:
        call(arg)
    except OSError:
        pass


class Reporter(TerminalBar):
    """Progress on stderr: a bar with runs done and failed on a terminal, else a line a run."""

    def __init__(self, total: int, grids: list[Grid]):
        from rich.progress import TimeElapsedColumn

        super().__init__("compare", total, ["runs, {task.fields[failed]} failed",
                                            TimeElapsedColumn], failed=0)
        self.total, self.done, self.failed = total, 0, 0
        self.grids = grids

    def __call__(self, result: Result) -> None:
        self.done += 1
        self.failed += result.status != "ok"
        what = label(self.grids, result.spec.combo) + f", seed={result.spec.seed}"
        if result.status == "ok":
            line = f"ok: {what}" + _run_numbers(result)
        else:
            line = f"{result.status}: {what}: {result.error}"
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
            self.bar.update(self.task, completed=self.done, failed=self.failed)
        else:
            print(f"[{self.done}/{self.total}] {line}", file=sys.stderr, flush=True)

    def note(self, line: str) -> None:
        """A line about the comparison as a whole, above the bar on a terminal."""
        if self.bar is not None:
            self.bar.console.print(line, markup=False, highlight=False)
        else:
            print(line, file=sys.stderr, flush=True)


def _run_numbers(result: Result) -> str:
    """A finished run's ELBO and k-hat, marked where it is not to be trusted, for its line."""
    elbo, khat = result.metrics.get("elbo"), result.metrics.get("khat")
    parts = ([f"ELBO {elbo:.3f}"] if elbo is not None else []) + (
        [f"k-hat {khat:.2f}" + (": do not trust" if untrusted(khat) else "")]
        if khat is not None else [])
    return f" ({', '.join(parts)})" if parts else ""
