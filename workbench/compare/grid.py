"""``vibench compare``: run a recipe over a grid of settings and seeds, side by side.

Every combination of the ``--grid`` values, times each seed, is one ``vibench run`` in its own
child process and its own run directory inside the compare directory; a backend
(``workbench.compare.backends``) starts it here or, as a Ray task, on a Ray cluster. The
combinations are checked in this process first (``plan``; no torch needed), so a misspelt key
or component name stops the comparison before anything runs. Then the runs go in parallel
(``scheduler``); a run that fails is reported beside the others and does not stop them, as is
a run over ``--timeout`` (``results``). At the end: a table on stdout (seeds combined; the
ELBO and log evidence as the common yardstick, errors in exact sds, untrusted fits marked;
``metrics``, ``table``), ``compare.csv`` (one row per run), ``compare.png`` (``plot``), and
TensorBoard hparams in each successful run's directory (``hparams``).

Ctrl-C, SIGTERM or SIGHUP asks the runs to save and stop, a second one kills them; the results
so far are written either way, and compare exits as ``vibench run`` does, 128 + the first
signal's number. The children die with compare (or with their Ray worker), even when it is
killed.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from workbench.compare.backends import (
    BACKENDS,
    Backend,
    LocalBackend,
    RayBackend,
    cpu_count,
    import_ray,
)
from workbench.compare.hparams import write_hparams
from workbench.compare.plan import Grid, Spec, parse_grid, plan_suite
from workbench.compare.plot import write_plot
from workbench.compare.results import Result
from workbench.compare.scheduler import Reporter, Runner, counting_signals
from workbench.compare.table import print_table, write_csv
from workbench.errors import Interrupted, RunError, UsageError
from workbench.rundir.claim import make_run_dir


def compare(recipe: Path | Sequence[Path], grid: Sequence[str], sets: Sequence[str], seeds: int,
            steps: int | None, jobs: int | None, out: Path | None,
            timeout: float | None = None, backend: str = "local", address: str | None = None,
            cpus_per_run: float | None = None, gpus_per_run: float | None = None) -> None:
    """The ``vibench compare`` command, over one recipe or several (a suite); raises a
    VibenchError for a non-zero exit."""
    if timeout is not None and not timeout > 0:
        raise UsageError(f"--timeout {timeout:g}: give the seconds each run may take, more than 0")
    check_backend(backend, address, cpus_per_run, gpus_per_run)
    recipes = [recipe] if isinstance(recipe, (str, Path)) else list(recipe)
    if not recipes:
        raise UsageError("give a recipe (or several) to compare")
    specs, grids, name = plan_suite([Path(r) for r in recipes], parse_grid(grid), sets, steps,
                                    seeds)
    chosen, jobs = choose_backend(backend, specs, jobs, address, cpus_per_run, gpus_per_run,
                                  timeout)
    with chosen:  # a cluster that is not there stops compare before it writes anything
        compare_dir = make_run_dir(f"compare-{name}", out)
        chosen.prepare(compare_dir)
        print(f"compare directory: {compare_dir}", file=sys.stderr)
        limit = f", each for at most {timeout:g} s" if timeout is not None else ""
        print(chosen.describe(len(specs), jobs) + limit, file=sys.stderr, flush=True)
        runner = Runner(Path(recipes[0]), compare_dir, jobs, chosen, timeout)
        with counting_signals(runner):
            with Reporter(len(specs), grids) as reporter:
                results = runner.run_all(specs, reporter, reporter.note)
            write_report(compare_dir, grids, results)
    exit_status(results, runner.signals, compare_dir)


def check_backend(backend: str, address: str | None, cpus_per_run: float | None,
                  gpus_per_run: float | None) -> None:
    """The backend options make sense together, and Ray is there if asked for; before
    anything is written."""
    if backend not in BACKENDS:
        raise UsageError(f"--backend {backend}: choose from {', '.join(BACKENDS)}")
    if backend != "ray":
        given = [name for name, value in (("--address", address), ("--cpus-per-run", cpus_per_run),
                                          ("--gpus-per-run", gpus_per_run)) if value is not None]
        if given:
            raise UsageError(f"{given[0]} is for --backend ray")
        return
    if cpus_per_run is not None and not cpus_per_run > 0:
        raise UsageError(f"--cpus-per-run {cpus_per_run:g}: give a number more than 0")
    if gpus_per_run is not None and not gpus_per_run >= 0:
        raise UsageError(f"--gpus-per-run {gpus_per_run:g}: give 0 or more")
    import_ray()


def choose_backend(backend: str, specs: list[Spec], jobs: int | None, address: str | None,
                   cpus_per_run: float | None, gpus_per_run: float | None,
                   timeout: float | None) -> tuple[Backend, int]:
    """The backend to run on, and how many runs go at once: ``--jobs``, else every run on Ray
    (it queues them) or a run a core here; never more than there are runs to start."""
    runs = sum(not s.refused for s in specs) or 1
    if backend == "ray":
        jobs = max(1, min(jobs or runs, runs))
        return RayBackend(address, cpus_per_run or 1.0, gpus_per_run or 0.0, timeout), jobs
    jobs = max(1, min(jobs or cpu_count(), runs))
    return LocalBackend(jobs), jobs


def write_report(compare_dir: Path, grids: list[Grid], results: list[Result]) -> None:
    """compare.csv, compare.png and the hparams, then the table: the files first, so that
    they are written even when the terminal has gone."""
    csv_path = compare_dir / "compare.csv"
    write_csv(csv_path, grids, results)
    png_path = compare_dir / "compare.png"
    plotted = write_plot(png_path, grids, results)
    write_hparams(results)
    print_table(grids, results)
    print(f"compare.csv: {csv_path}")
    if plotted:
        print(f"compare.png: {png_path}")


def exit_status(results: list[Result], signals: list[int], compare_dir: Path) -> None:
    """How compare ends: Interrupted (128 + the first stop signal's number) if one came, else
    a RunError if any run failed, else nothing."""
    failures = [r for r in results if r.status != "ok"]
    if signals:
        raise Interrupted(f"interrupted: {len(results) - len(failures)} of {len(results)} runs "
                          f"finished; results so far in {compare_dir}", signals[0])
    if failures:
        raise RunError(f"{len(failures)} of {len(results)} runs failed; see the table and "
                       f"each run's stderr.txt in {compare_dir}")
