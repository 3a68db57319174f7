"""``vibench compare``: run a recipe over a grid of settings and seeds, side by side.

Every combination of the ``--grid`` values, times each seed, is one ``vibench run`` in its own
child process and its own run directory inside the compare directory; a backend
(``workbench.compare.backends``) starts it here or, as a Ray task, on a Ray cluster. The combinations are
checked in this process first (no torch needed), so a misspelt key or component name stops
the comparison before anything runs. Then the runs go in parallel; a run that fails is
reported beside the others and does not stop them, as is a run over ``--timeout``. At the
end: a table on stdout (seeds combined; the ELBO and log evidence as the common yardstick,
errors in exact sds, untrusted fits marked), ``compare.csv`` (one row per run), ``compare.png``,
and TensorBoard hparams in each successful run's directory.

Ctrl-C, SIGTERM or SIGHUP asks the runs to save and stop, a second one kills them; the results
so far are written either way. The children die with compare (or with their Ray worker),
even when it is killed.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import itertools
import math
import re
import signal
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from workbench.rundir import files
from workbench.compare.backends import (BACKENDS, NOT_STARTED, POLL_SECONDS, Backend, Control, Job,
                                LocalBackend, Outcome, RayBackend, cpu_count, import_ray)
from workbench.errors import RecipeError, RunError, UsageError, VibenchError, one_line
from workbench.progress import TerminalBar
from workbench.rundir.claim import make_run_dir

METRICS = ("elbo", "elbo_se", "log_evidence", "log_evidence_se", "mean_error_sd", "sd_ratio",
           "khat", "final_loss", "mean_error", "std_error", "steps_per_second")
CSV_TAIL = ("seed", "status", "exit_code", *METRICS, "khat_reading", "steps", "wall_seconds",
            "process_seconds", "run_dir", "error")
KHAT_LIMIT = 0.7  # over it, PSIS says the guide misses the posterior's tails (Yao et al. 2018)
WORST_OF_SEEDS = ("mean_error_sd", "sd_ratio", "khat")  # the rest: the mean over seeds
SAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
MAX_NAME = 120
STOPPED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)  # a run that stopped as asked


class Interrupted(VibenchError):
    """Ctrl-C, SIGTERM or SIGHUP: the runs still going are stopped (each saves what it
    learned) or, on a second signal, killed."""

    exit_code = 130


@dataclass
class Grid:
    """One ``--grid KEY=V1,V2``: the key and each value's text (YAML, as ``--set`` reads it)."""

    key: str
    values: list[str]


@dataclass
class Spec:
    """One run: a combination of grid values and a seed."""

    combo: tuple[str, ...]  # the value text for each grid key
    seed: int
    sets: list[str]  # the --set items the child gets, in order
    name: str  # the run directory's name inside the compare directory
    refused: list[str] = field(default_factory=list)  # problems found before it ran
    hparams: dict[str, Any] = field(default_factory=dict)
    recipe: Path | None = None  # the recipe it runs (set by ``plan``)


@dataclass
class Result:
    spec: Spec
    run_dir: Path
    status: str  # ok | failed | interrupted
    exit_code: int | None = None
    error: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    khat_reading: str = ""  # what the run's k-hat says: good, ok or bad: do not trust
    draws: int | None = None  # the guide draws behind its k-hat, ELBO and log evidence
    steps: int | None = None
    wall_seconds: float | None = None
    process_seconds: float | None = None


def parse_grid(items: Sequence[str]) -> list[Grid]:
    """``KEY=V1,V2,...`` for each ``--grid``; commas inside brackets, braces or quotes do not
    split, so ``optimizer.betas=[0.9,0.99],[0.8,0.99]`` is two values."""
    grids: list[Grid] = []
    problems: list[str] = []
    for item in items:
        key, equals, text = item.partition("=")
        key = key.strip()
        if not equals or not key:
            problems.append(f"--grid {item!r}: expected KEY=V1,V2,..., e.g. "
                            "--grid optimizer.lr=0.01,0.05")
            continue
        values = [v.strip() for v in _split(text)]
        if not text.strip() or any(not v for v in values):
            problems.append(f"--grid {item!r}: an empty value; give KEY=V1,V2,...")
            continue
        if key == "seed":
            problems.append(f"--grid {item!r}: use --seeds N to run seeds 0..N-1")
            continue
        if any(g.key == key for g in grids):
            problems.append(f"--grid {item!r}: {key} is given twice; put all its values in "
                            "one --grid")
            continue
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            problems.append(f"--grid {item!r}: the value {repeated[0]!r} is given twice")
            continue
        grids.append(Grid(key, values))
    if problems:
        raise RecipeError("command line", problems)
    return grids


def _split(text: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def plan(recipe: Path, grids: list[Grid], sets: Sequence[str], steps: int | None,
         seeds: int) -> tuple[list[Spec], str]:
    """Every run of the comparison, each checked as ``vibench run`` would check it, and the
    recipe's name.

    A problem with a grid value itself (an unknown key, component or a bad value), or one
    that every combination has, is bad input: a UsageError listing every such problem. A
    problem only some combinations have (``guide.name=auto_normal`` keeping options of the
    old guide that do not fit) refuses just those combinations.
    """
    from workbench.config import recipe as recipes
    from workbench.plugins.registry import get_registry

    raw = recipes.load(recipe)
    registry = get_registry()
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    base_sets = list(sets) + ([f"train.steps={steps}"] if steps is not None else [])
    base, base_keys = recipes.apply_overrides(raw, base_sets)  # a bad --set: exit 2 here
    for item in sets:
        key = item.partition("=")[0].strip()
        hidden = [g.key for g in grids if key == g.key or key.startswith(g.key + ".")]
        if hidden:
            print(f"note: --grid {hidden[0]} goes on top of --set {item}, so each run has "
                  f"the grid's {hidden[0]}", file=sys.stderr)
    bad: list[str] = []
    unsettable: set[str] = set()
    for g in grids:  # each value's key, alone: a key vibench cannot set is bad whatever varies
        for value in g.values:
            try:
                recipes.apply_overrides(base, [f"{g.key}={value}"])
            except RecipeError as exc:
                bad += [line.replace("--set ", "--grid ", 1) for line in exc.lines()]
                unsettable.add(g.key)
    grids = [g for g in grids if g.key not in unsettable]  # still check the others' values
    checked: list[tuple[tuple[str, ...], list[str], list[str], str | None]] = []
    for combo in itertools.product(*(g.values for g in grids)):
        grid_sets = [f"{g.key}={v}" for g, v in zip(grids, combo)]
        try:  # the grid goes on top of --set, as the child applies them
            combined, grid_keys = recipes.apply_overrides(base, grid_sets)
        except RecipeError as exc:  # keys that clash with each other
            bad += [line.replace("--set ", "--grid ", 1) for line in exc.lines()]
            continue
        try:
            resolved = recipes.resolve(combined, registry, str(recipe), base_keys | grid_keys)
        except RecipeError as exc:
            lines = [f"{exc.source}: {p}" for p in exc.problems]
            bad += [line for p, line in zip(exc.problems, lines)
                    if _inside(p, [g.key for g in grids])]
            checked.append((combo, grid_sets, lines, None))
            continue
        checked.append((combo, grid_sets, [], resolved["name"]))
    if checked and all(refused for _, _, refused, _ in checked):  # no combination can run:
        common = set.intersection(*(set(r) for _, _, r, _ in checked))  # bad whatever varies
        bad += [line for line in checked[0][2] if line in common]
    if bad:
        raise _Problems(_unique(bad))
    name = next((n for *_, n in checked if n), raw.get("name") or recipe.stem)
    specs: list[Spec] = []
    names: set[str] = set()
    for combo, grid_sets, refused, _ in checked:
        for seed in range(seeds):
            label = ",".join([*grid_sets, f"seed={seed}"])
            run_name = _safe_name(label, names)
            hparams = {g.key: _hparam(v) for g, v in zip(grids, combo)}
            specs.append(Spec(combo, seed, [*base_sets, *grid_sets], run_name, refused,
                              {**hparams, "seed": seed}, recipe))
    _consistent_hparams(specs, grids)
    return specs, str(name)


def plan_suite(recipes: Sequence[Path], grids: list[Grid], sets: Sequence[str],
               steps: int | None, seeds: int) -> tuple[list[Spec], list[Grid], str]:
    """``plan`` for each of several recipes (a suite, such as the posteriordb recipes), the
    recipe becoming the first grid key, named by its file's stem; one recipe is plain
    ``plan``. Returns the specs, the grids the table shows, and the comparison's name."""
    if len(recipes) == 1:
        specs, name = plan(recipes[0], grids, sets, steps, seeds)
        return specs, grids, name
    labels = [r.stem for r in recipes]
    if len(set(labels)) < len(labels):
        labels = [str(r) for r in recipes]
    if len(set(labels)) < len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise UsageError(f"the recipe {twice} is given twice")
    specs: list[Spec] = []
    names: set[str] = set()
    problems: list[str] = []
    for recipe, label in zip(recipes, labels):
        try:
            found, _ = plan(recipe, grids, sets, steps, seeds)
        except RecipeError as exc:
            problems += [line if line.startswith(str(recipe)) else f"{recipe}: {line}"
                         for line in exc.lines()]
            continue
        for spec in found:
            spec.combo = (label, *spec.combo)
            spec.name = _safe_name(f"recipe={label},{spec.name}", names)
            spec.hparams = {"recipe": label, **spec.hparams}
            specs.append(spec)
    if problems:
        raise _Problems(_unique(problems))
    return specs, [Grid("recipe", labels), *grids], "suite"


class _Problems(UsageError):
    """Lines that are already ``source: problem``."""

    def __init__(self, lines: list[str]):
        self._lines = lines
        super().__init__("\n".join(lines))

    def lines(self) -> list[str]:
        return self._lines


def _inside(problem: str, keys: list[str]) -> bool:
    """Whether a ``path: message`` problem is about a grid key's own value."""
    path = problem.partition(": ")[0]
    return any(path == key or path.startswith(key + ".") for key in keys)


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _safe_name(label: str, taken: set[str]) -> str:
    name = SAFE.sub("_", label)
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


def _hparam(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def _consistent_hparams(specs: list[Spec], grids: list[Grid]) -> None:
    """TensorBoard wants one type per hparam: a key whose values mix types becomes text."""
    for grid in grids:
        kinds = {_kind(s.hparams[grid.key]) for s in specs}
        if len(kinds) > 1:
            for s in specs:
                s.hparams[grid.key] = s.combo[[g.key for g in grids].index(grid.key)]


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else "str"


class Runner:
    """Runs specs on a backend (child processes here, or Ray tasks), ``jobs`` at a time, each
    for at most ``timeout`` seconds.

    ``signals`` counts Ctrl-C, SIGTERM and SIGHUP (see ``counting_signals``): the first stops
    new runs and asks the live ones to save and stop, the second kills them. Every spec gets a
    result either way.
    """

    def __init__(self, recipe: Path, compare_dir: Path, jobs: int, backend: Backend,
                 timeout: float | None = None):
        self.recipe = recipe
        self.compare_dir = compare_dir
        self.jobs = jobs
        self.backend = backend
        self.lock = threading.Lock()
        self.signals = 0
        self.control = Control(timeout)

    @property
    def timeout(self) -> float | None:
        return self.control.timeout

    def run_one(self, spec: Spec) -> Result:
        """Run one spec on the backend and read what it left."""
        run_dir = self.compare_dir / spec.name
        if spec.refused:
            run_dir.mkdir(parents=True, exist_ok=True)
            lines = [f"error: {line}" for line in spec.refused]
            files.write_atomic(run_dir / "stderr.txt", ("\n".join(lines) + "\n").encode())
            return Result(spec, run_dir, "failed", 2, lines[-1])
        job = Job(spec.recipe or self.recipe, run_dir, spec.seed, spec.sets)
        with self.lock:
            if self.control.stopping:
                return Result(spec, run_dir, "interrupted", error=NOT_STARTED)
            handle = self.backend.start(job)
        outcome = self.backend.wait(handle, job, self.control)
        if outcome.lost == NOT_STARTED:
            return Result(spec, run_dir, "interrupted", error=NOT_STARTED)
        run_dir.mkdir(parents=True, exist_ok=True)  # a run refused before training made none
        stderr = outcome.stderr + (f"error: {outcome.lost}\n" if outcome.lost else "")
        files.write_atomic(run_dir / "stderr.txt", stderr.encode())
        files.write_atomic(run_dir / "stdout.txt", outcome.stdout.encode())
        result = Result(spec, run_dir, "failed", outcome.exit_code,
                        process_seconds=outcome.seconds)
        self.classify(result, outcome)
        return result

    def classify(self, result: Result, outcome: Outcome) -> None:
        """A finished run's status, error and numbers. What it saved decides: a run whose
        summary.json says completed or interrupted is ok or interrupted whatever its exit
        code (it may have been killed after saving); else its exit code, or why its task
        was lost, does."""
        summary = read_summary(result)
        saved = summary.get("status") if summary else None
        code, reason = outcome.exit_code, outcome.reason
        lines = [line.strip() for line in outcome.stderr.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if saved == "completed" or (saved is None and code == 0):
            result.status, result.error = "ok", ""
        elif reason == "timed out":
            at = f", at step {result.steps}" if result.steps is not None else ""
            result.status, result.error = "failed", f"timed out after {self.timeout:g} s{at}"
        elif code is None:  # its task was lost; what the run saved may still be there
            result.status = "interrupted" if reason else "failed"
            result.error = outcome.lost or "lost"
        elif saved in ("interrupted", "failed"):
            result.status = saved
            result.error = last or str(summary.get("error") or saved)
        else:
            stopped = bool(reason) or code in STOPPED_CODES
            result.status = "interrupted" if stopped else "failed"
            killed = code < 0 and code != -signal.SIGINT
            result.error = (f"killed by {_signal_name(-code)}" if killed
                            else last or f"exit code {code}")

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
        """Act on the signals counted so far: the first stops, the second kills."""
        if self.signals and not self.control.stopping:
            with self.lock:
                self.control.stopping = True
            _quietly(on_note, "stopping: no new runs; each running one saves what it learned "
                              "and stops (Ctrl-C again to kill them)")
        if self.signals > 1 and not self.control.killing:
            self.control.killing = True
            _quietly(on_note, "killing the runs still going")


@contextlib.contextmanager
def counting_signals(runner: Runner) -> Iterator[None]:
    """While this lasts, Ctrl-C, SIGTERM and SIGHUP only count in ``runner.signals``, so no
    signal cuts the runs' results or the writing of them short (the main thread only; a
    signal ignored when compare started, as under nohup, stays ignored)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def count(signum: int, frame: Any) -> None:
        runner.signals += 1

    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if signum is not None and signal.getsignal(signum) is not signal.SIG_IGN:
            previous[signum] = signal.signal(signum, count)
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


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def read_summary(result: Result) -> dict | None:
    """Fill in a result's metrics from its run's summary.json, and return it, where there is
    one."""
    import json

    path = result.run_dir / "summary.json"
    try:
        summary = json.loads(files.read_bounded(path))
    except (OSError, ValueError, files.UnsafeFile):
        return None
    if not isinstance(summary, dict):
        return None
    result.metrics = metrics(summary)
    diagnostics = summary.get("diagnostics")
    if isinstance(diagnostics, dict):
        result.khat_reading = str(diagnostics.get("reading") or "")
        draws = diagnostics.get("num_draws")
        result.draws = draws if isinstance(draws, int) else None
    result.steps = summary.get("steps")
    result.wall_seconds = _number(summary.get("wall_seconds"))
    return summary


def metrics(summary: dict) -> dict[str, float | None]:
    """One run's numbers from its summary.json.

    The same yardstick for every run whatever its loss: the ELBO and the importance-sampled
    log evidence, each with its Monte Carlo se, from the report's guide draws. Where the exact
    posterior is known (or a reference one: its report's z and r), errors in units of its sd,
    so sites of any scale compare:
    ``mean_error_sd`` the largest |mean - exact mean| / exact sd, ``sd_ratio`` the guide sd /
    exact sd furthest from 1, over every site and element; and the raw ``mean_error`` and
    ``std_error`` (largest absolute differences) that compare.csv always had. Then k-hat, the
    run's own final loss and steps/s. None where the run has no such number.
    """
    entries = [e for e in (summary.get("posterior") or {}).values() if isinstance(e, dict)]
    both = [(m, s, em, es) for e in entries
            for m, s, em, es in _elements(e, ("mean", "std", "exact_mean", "exact_std"))
            if es > 0]
    diagnostics = summary.get("diagnostics")
    diagnostics = diagnostics if isinstance(diagnostics, dict) else {}
    khat = [v for v in _flatten(diagnostics.get("khat")) if _number(v) is not None]
    z = [abs(m - em) / es for m, _, em, es in both]
    r = [s / es for _, s, _, es in both]
    reference = summary.get("reference")
    scored = reference.get("params") if isinstance(reference, dict) else None
    if not both and isinstance(scored, dict):  # a reference posterior known by its moments
        z = [v for e in scored.values() if isinstance(e, dict)
             for v in [_number(e.get("z"))] if v is not None]
        r = [v for e in scored.values() if isinstance(e, dict)
             for v in [_number(e.get("r"))] if v is not None]
    return {
        **{key: _number(diagnostics.get(key))
           for key in ("elbo", "elbo_se", "log_evidence", "log_evidence_se")},
        "mean_error_sd": _largest(z),
        "sd_ratio": _furthest_from_one(r),
        "khat": _largest(khat),
        "final_loss": _number(summary.get("final_loss")),
        "mean_error": _largest([abs(a - b) for e in entries
                                for a, b in _elements(e, ("mean", "exact_mean"))]),
        "std_error": _largest([abs(a - b) for e in entries
                               for a, b in _elements(e, ("std", "exact_std"))]),
        "steps_per_second": _number(summary.get("steps_per_second")),
    }


def _elements(entry: dict, keys: tuple[str, ...]) -> list[tuple[float, ...]]:
    """A posterior entry's values under ``keys``, element by element, where each is a number
    (none where a key is missing: the exact posterior is not known)."""
    if not all(key in entry for key in keys):
        return []
    columns = zip(*(_flatten(entry[key]) for key in keys))
    return [tuple(map(float, row)) for row in columns
            if all(_number(v) is not None for v in row)]


def _flatten(value: Any):
    if isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _largest(values: list[float]) -> float | None:
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _furthest_from_one(ratios: list[float]) -> float | None:
    """The ratio furthest from 1 on a log scale, where half is as far off as twice; NaN if
    any is."""
    if not ratios:
        return None
    if any(math.isnan(r) for r in ratios):
        return math.nan
    return max(ratios, key=lambda r: abs(math.log(r)) if 0 < r < math.inf else math.inf)


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def combined(runs: list[Result], key: str) -> float | None:
    """A combination's number over its seeds: the worst seed for the accuracy numbers (one
    seed's bad fit must not hide behind a good one), the se of the mean for a standard error,
    the mean for the rest."""
    values = [r.metrics.get(key) for r in runs]
    known = [v for v in values if v is not None]
    if key == "sd_ratio":
        return _furthest_from_one(known)
    if key in WORST_OF_SEEDS:
        return _largest(known)
    if key.endswith("_se") and known:
        return math.sqrt(sum(v * v for v in known)) / len(known)
    return _mean(values)


def untrusted(khat: float | None) -> bool:
    """Whether a k-hat says not to trust the fit: over KHAT_LIMIT, or not a number."""
    return khat is not None and not khat <= KHAT_LIMIT


def group(results: list[Result]) -> list[list[Result]]:
    """The results per combination, in the grid's order."""
    groups: dict[tuple[str, ...], list[Result]] = {}
    for result in results:
        groups.setdefault(result.spec.combo, []).append(result)
    return list(groups.values())


def write_csv(path: Path, grids: list[Grid], results: list[Result]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*(g.key for g in grids), *CSV_TAIL])
        for r in results:
            row = {"seed": r.spec.seed, "status": r.status, "exit_code": r.exit_code,
                   **r.metrics, "khat_reading": r.khat_reading, "steps": r.steps,
                   "wall_seconds": r.wall_seconds,
                   "process_seconds": r.process_seconds, "run_dir": str(r.run_dir),
                   "error": r.error}
            writer.writerow([*r.spec.combo,
                             *("" if row.get(c) is None else row.get(c) for c in CSV_TAIL)])


def label(grids: list[Grid], combo: tuple[str, ...]) -> str:
    return ", ".join(f"{g.key}={v}" for g, v in zip(grids, combo)) or "recipe"


PANELS = (  # the plot's panels: metric, axis label, format of the written values
    ("elbo", "ELBO (nats, higher is better)", ".3f"),
    ("log_evidence", "log evidence, importance-sampled (nats)", ".3f"),
    ("mean_error_sd", "mean error / sd:\n|guide mean - exact mean| / exact sd", ".3f"),
    ("sd_ratio", "sd ratio: guide sd / exact sd\n(log scale; 1 is right)", ".2f"),
    ("khat", f"PSIS k-hat\n(shaded: over {KHAT_LIMIT}, do not trust)", ".2f"),
)
RATIO_TICKS = (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10)
UNTRUSTED = "tab:red"


def write_plot(path: Path, grids: list[Grid], results: list[Result]) -> bool:
    """A dot plot, a row per combination and a dot per run, of the numbers that compare
    across losses: ELBO, log evidence, the errors in exact sds where the exact posterior is
    known, and k-hat. Each axis spans the values (written above them), not 0 onwards; a run
    with k-hat over KHAT_LIMIT is an open red dot and its combination's label and values are
    red and marked "!"."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
    except ImportError:
        print("warning: matplotlib is not installed, so there is no compare.png "
              "(pip install matplotlib)", file=sys.stderr)
        return False
    groups = group(results)
    runs = [[r for r in g if r.status == "ok"] for g in groups]
    panels = [p for p in PANELS if p[0] in ("elbo", "log_evidence")
              or any(r.metrics.get(p[0]) is not None for rs in runs for r in rs)]
    seeds = max(len(g) for g in groups)
    note = _plot_note(results)
    bottom = 0.75 + 0.15 * note.count("\n")  # inches for the legend and the note
    height = 0.6 * len(groups) + 1.6 + bottom
    figure, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 2.5, height),
                                squeeze=False, sharey=True)
    suite = bool(grids) and grids[0].key == "recipe" and len(grids[0].values) > 1
    for ax, panel in zip(axes[0], panels):
        if suite and panel[0] in ("elbo", "log_evidence"):
            metric, title, spec = panel
            name = "ELBO" if metric == "elbo" else "log evidence"
            panel = (metric, f"{name} - best of its recipe (nats)", spec)
            _dot_panel(ax, panel, _from_best(runs, metric))
        else:
            _dot_panel(ax, panel, runs)
    first = axes[0][0]
    first.set_yticks(range(len(groups)), [_plot_label(grids, g, rs)
                                          for g, rs in zip(groups, runs)])
    for tick, rs in zip(first.get_yticklabels(), runs):
        tick.set_color(UNTRUSTED if untrusted(combined(rs, "khat")) else
                       "0.5" if not rs else "black")
    first.set_ylim(len(groups) - 0.5, -0.7)
    first.set_ylabel("combination")
    handles = [Line2D([], [], ls="", marker="o", color="tab:blue", label="one run"),
               Line2D([], [], ls="", marker="o", mfc="white", mec=UNTRUSTED,
                      label=f"k-hat > {KHAT_LIMIT}: do not trust (red, !)"),
               Line2D([], [], color="0.4", lw=1, label="± 2 Monte Carlo se")]
    figure.legend(handles=handles, loc="lower center", ncol=3, frameon=False,
                  bbox_to_anchor=(0.5, (bottom - 0.4) / height))
    figure.text(0.5, 0.08 / height, note, ha="center", va="bottom", fontsize=8, color="0.3")
    per = f"{seeds} seeds per combination, a dot per run; written: the mean over seeds " \
          "(ELBO, log evidence), the worst seed (the rest)" if seeds > 1 else \
          "one run per combination"
    figure.suptitle(per, fontsize=10)
    figure.tight_layout(rect=(0, bottom / height, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _from_best(runs: list[list[Result]], metric: str) -> list[list[Result]]:
    """In a suite each recipe is its own model, and ELBOs of different models share no scale:
    each run's value less the best of its recipe's runs (0 for the best, negative below)."""
    best: dict[Any, float] = {}
    for run in (r for rs in runs for r in rs):
        value = run.metrics.get(metric)
        if value is not None and math.isfinite(value):
            recipe = run.spec.combo[0]
            best[recipe] = max(best.get(recipe, value), value)
    return [[replace(r, metrics={**r.metrics, metric: r.metrics[metric] - best[r.spec.combo[0]]})
             if r.metrics.get(metric) is not None and r.spec.combo[0] in best
             and math.isfinite(r.metrics[metric]) else r for r in rs] for rs in runs]


def _plot_label(grids: list[Grid], runs: list[Result], ok: list[Result]) -> str:
    """A combination's row label: its grid values, and why it has no dots if it has none."""
    text = label(grids, runs[0].spec.combo)
    return text if ok else f"{text} (failed)"


def _plot_note(results: list[Result]) -> str:
    """The plot's footnote: why these numbers, and which are missing."""
    draws = {r.draws for r in results if r.draws is not None}
    counted = f"the same {draws.pop()}" if len(draws) == 1 else "the same number of"
    note = (f"ELBO and log evidence: importance weights of {counted} guide draws for every "
            "run, whatever loss trained it (training losses are different objectives: "
            "final_loss in compare.csv)")
    if not any(r.metrics.get("mean_error_sd") is not None for r in results):
        note += "\nno exact posterior: mean error / sd and sd ratio are n/a"
    return note


def _dot_panel(ax: Any, panel: tuple[str, str, str], runs: list[list[Result]]) -> None:
    """One metric's panel: each run a dot (with ± 2 se where it has one), each combination's
    value written above its dots."""
    metric, title, spec = panel
    extents: list[float] = []
    for y, rs in enumerate(runs):
        step = min(0.12, 0.4 / max(len(rs) - 1, 1))
        for i, run in enumerate(rs):
            value = run.metrics.get(metric)
            if value is None or not math.isfinite(value):
                continue
            se = run.metrics.get(f"{metric}_se")
            spread = 2 * se if se is not None and math.isfinite(se) else 0.0
            bad = untrusted(run.metrics.get("khat"))
            ax.errorbar(value, y + (i - (len(rs) - 1) / 2) * step, xerr=spread or None,
                        fmt="o", ms=6, mfc="white" if bad else "tab:blue",
                        mec=UNTRUSTED if bad else "tab:blue", ecolor="0.4", elinewidth=1,
                        capsize=2, zorder=3)
            extents += [value - spread, value + spread]
    low, high = _span(metric, extents)
    _axis(ax, metric, low, high)
    for y, rs in enumerate(runs):
        _write_value(ax, y, rs, metric, spec, low, high)
    ax.set_xlabel(title)
    ax.grid(axis="x", alpha=0.3)


def _span(metric: str, values: list[float]) -> tuple[float, float]:
    """The x range of a panel: the values and room to write them; 0 for an error, 1 for a
    ratio, KHAT_LIMIT for k-hat; at least 0.1 nats wide for ELBO and log evidence, so Monte
    Carlo noise does not fill the panel."""
    if metric == "sd_ratio":
        values = [v for v in values if v > 0] + [1.0]
        return min(values) / 1.6, max(values) * 1.6
    if metric == "mean_error_sd":
        high = max(values + [0.1]) * 1.25
        return -0.1 * high, high
    if metric == "khat":
        low, high = min(values + [0.0]), max(values + [1.0])
        return low - 0.15 * (high - low), high + 0.15 * (high - low)
    if not values:
        return -1.0, 1.0
    low, high = min(values), max(values)
    middle, half = (low + high) / 2, max(high - low, 0.1) / 2
    return middle - 1.3 * half, middle + 1.3 * half


def _axis(ax: Any, metric: str, low: float, high: float) -> None:
    """A panel's x axis from ``low`` to ``high``, with plain tick labels (no offset) and its
    reference: 1 for a ratio (log scale), the k-hat limit, 0 for an error."""
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

    if metric == "sd_ratio":
        ax.set_xscale("log")
        ticks = [t for t in RATIO_TICKS if low <= t <= high]
        if high / low > 50:  # a point mass's sd ratio, say: one tick a decade
            ticks = [10.0 ** k for k in range(math.ceil(math.log10(low)),
                                              math.floor(math.log10(high)) + 1)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.axvline(1.0, color="0.3", lw=1, zorder=1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    if metric == "mean_error_sd":
        ax.axvline(0.0, color="0.3", lw=1, zorder=1)
    if metric == "khat":
        ax.axvspan(KHAT_LIMIT, high, color=UNTRUSTED, alpha=0.1, lw=0, zorder=0)
        ax.axvline(KHAT_LIMIT, color=UNTRUSTED, lw=1, ls="--", zorder=1)
    ax.set_xlim(low, high)


def _write_value(ax: Any, y: int, runs: list[Result], metric: str, spec: str, low: float,
                 high: float) -> None:
    """A combination's value for a panel, above its dots: red and marked "!" where a seed's
    k-hat says not to trust it; "n/a" where its runs have no such number."""
    if not runs:
        return
    value = combined(runs, metric)
    bad = untrusted(combined(runs, "khat"))
    text = "n/a" if value is None else format(value, spec) + (" !" if bad else "")
    if value is not None and math.isfinite(value) and low <= value <= high:
        x = value
    else:  # in the middle of the panel
        x = math.sqrt(low * high) if metric == "sd_ratio" else (low + high) / 2
    ax.text(x, y - 0.3, text, ha="center", va="bottom", fontsize=8,
            color=UNTRUSTED if bad else "0.15")


def write_hparams(results: list[Result]) -> None:
    """Each successful run's hparams (the grid's keys and the seed) and final metrics, as one
    TensorBoard HParams session in its own run directory.

    No experiment summary is written: TensorBoard then builds the table from the sessions,
    with every value each key took, also when several comparisons share a log directory
    (an experiment summary per run, as tensorboardX's add_hparams writes, lists only that
    run's value, and TensorBoard would filter the other runs out). The events go in a file of
    their own (suffix .hparams): tensorboardX names files by the second, and a second writer
    in the same second would truncate the run's own events file.
    """
    done = [result for result in results if result.status == "ok"]
    if not done:
        return
    from tensorboardX import SummaryWriter
    from tensorboardX.summary import hparams

    for result in done:
        scalars = {f"hparam/{k}": v for k, v in result.metrics.items() if v is not None}
        _, start, end = hparams(dict(result.spec.hparams), scalars)
        writer = SummaryWriter(logdir=str(result.run_dir), filename_suffix=".hparams")
        try:
            writer.file_writer.add_summary(start)
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, result.steps or 0)
            writer.file_writer.add_summary(end)
        finally:
            writer.close()


COLUMNS = (  # the table's number columns: header, the metric, its format
    ("ELBO", "elbo", ".3f"),
    ("log evidence", "log_evidence", ".3f"),
    ("mean error / sd", "mean_error_sd", ".3f"),
    ("sd ratio", "sd_ratio", ".2f"),
    ("k-hat", "khat", ".2f"),
    ("train loss", "final_loss", ".4f"),
    ("steps/s", "steps_per_second", ".0f"),
)


def print_table(grids: list[Grid], results: list[Result]) -> None:
    """One row per combination, the seeds combined, and under it what the columns mean; the
    status column gives way first on a narrow terminal, and every failure's error follows the
    table in full."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    rows = [[*g[0].spec.combo, *_row(g)] for g in group(results)]
    headers = [*(g.key for g in grids), "runs", *(c[0] for c in COLUMNS), "wall s"]
    console = Console() if sys.stdout.isatty() else Console(width=200, no_color=True)
    # Column widths are set here, not by rich: the grid's values and the numbers keep their
    # width (their headers wrap on a narrow terminal) and the status column gives way.
    cells = [max(len(row[i]) for row in rows) for i in range(len(headers))]
    natural = [max(len(h), c) for h, c in zip(headers, cells)]
    compact = [max(max(len(w) for w in re.split(r"[ .]", h)), c) for h, c in zip(headers, cells)]
    frame = 3 * (len(headers) + 1) + 1  # each column's padding and rule, and the edges
    widths = natural if sum(natural) + frame + 12 <= console.width else compact
    # A grid value wraps at its spaces past 24 characters, never inside a word: a component's
    # name (auto_lowrank_multivariate_normal) stays whole on one line.
    words = [max(len(w) for row in rows for w in row[i].split() or [""]) for i in range(len(grids))]
    widths = [min(w, max(24, words[i])) if i < len(grids) else w for i, w in enumerate(widths)]
    room = max(12, console.width - sum(widths) - frame)
    if sum(widths) + frame + room > console.width:  # too narrow: keep every cell whole and
        console = Console(width=sum(widths) + frame + room)  # let the terminal wrap lines
    table = Table(box=box.SIMPLE_HEAD)
    for i, header in enumerate(headers):
        table.add_column(header, width=widths[i], overflow="fold",
                         justify="left" if i < len(grids) else "right")
    table.add_column("status", width=min(room, max(len(row[-1]) for row in rows + [["status"]])),
                     no_wrap=True, overflow="ellipsis")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for line in table_notes(results):
        console.print(line, markup=False, highlight=False, overflow="fold")
    for r in results:  # the table may cut an error short: each in full
        if r.status != "ok":
            console.print(f"{r.status}: {r.run_dir.name}: {r.error}",
                          markup=False, highlight=False, overflow="fold")


def _row(runs: list[Result]) -> list[str]:
    """A combination's cells after its grid values: runs done, the COLUMNS, wall time and
    status. "-": no run to read it from; "n/a": the runs do not have it (no exact posterior,
    no diagnostics); "!" after the k-hat: do not trust this fit."""
    ok = [r for r in runs if r.status == "ok"]
    shown = ok or [r for r in runs if r.status == "interrupted"]  # what it had learned
    cells = [f"{len(ok)}/{len(runs)}"]
    for _, key, spec in COLUMNS:
        value = combined(shown, key)
        cells.append("-" if not shown else "n/a" if value is None else format(value, spec))
    if untrusted(combined(shown, "khat")):
        cells[1 + [c[1] for c in COLUMNS].index("khat")] += " !"
    se = combined(shown, "log_evidence_se")
    if se is not None and cells[2] not in ("-", "n/a"):
        cells[2] += f" ± {se:.3f}"
    wall = _mean([r.wall_seconds for r in shown])
    return [*cells, "-" if wall is None else f"{wall:.1f}", _status_cell(runs)]


def table_notes(results: list[Result]) -> list[str]:
    """What the table's columns mean, the lines that apply to these results."""
    shown = [r for r in results if r.status in ("ok", "interrupted")]
    draws = {r.draws for r in shown if r.draws is not None}
    counted = f"the same {draws.pop()}" if len(draws) == 1 else "the same number of"
    notes = [f"ELBO, log evidence ± se: from {counted} guide draws for every run, whatever its "
             "loss; train loss is each run's own objective, not comparable across losses or "
             "guides."]
    if any(r.metrics.get("mean_error_sd") is not None for r in shown):
        notes.append("mean error / sd = |guide mean - exact mean| / exact sd, sd ratio = guide "
                     "sd / exact sd (1 is right): the worst site or element (against a "
                     "reference posterior: the report's z and r, worst parameter).")
    if any(r.metrics.get(key) is None for r in shown for _, key, _ in COLUMNS):
        notes.append("n/a: not known for these runs (mean error / sd, sd ratio: no exact "
                     "posterior; ELBO, log evidence, k-hat: no diagnostics).")
    if any(len(g) > 1 for g in group(results)):
        notes.append("seeds: mean error / sd, sd ratio and k-hat are the worst seed's; the "
                     "other numbers, the mean over seeds.")
    if any(untrusted(r.metrics.get("khat")) for r in shown):
        notes.append(f"! k-hat > {KHAT_LIMIT} in at least one seed: do not trust this fit; the "
                     "guide misses the posterior's tails and its numbers, log evidence "
                     "included, may be far off.")
    return notes


def _status_cell(runs: list[Result]) -> str:
    """ok, or how many of a combination's runs failed or were interrupted, and the first one's
    error."""
    bad = [r for r in runs if r.status != "ok"]
    if not bad:
        return "ok"
    word = "interrupted" if all(r.status == "interrupted" for r in bad) else "failed"
    first = next(r for r in bad if r.status == word)
    error = first.error.removeprefix("error: ")
    if len(bad) < len(runs):
        return f"{len(bad)} of {len(runs)} {word}: {error}"
    return error if error.startswith(word) else f"{word}: {error}"


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
    grids = parse_grid(grid)
    specs, grids, name = plan_suite([Path(r) for r in recipes], grids, sets, steps, seeds)
    runs = sum(not s.refused for s in specs) or 1
    if backend == "ray":
        jobs = max(1, min(jobs or runs, runs))
        chosen: Backend = RayBackend(address, cpus_per_run or 1.0, gpus_per_run or 0.0,
                                     timeout)
    else:
        jobs = max(1, min(jobs or cpu_count(), runs))
        chosen = LocalBackend(jobs)
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
    failures = [r for r in results if r.status != "ok"]
    if runner.signals:
        raise Interrupted(f"interrupted: {len(results) - len(failures)} of {len(results)} runs "
                          f"finished; results so far in {compare_dir}")
    if failures:
        raise RunError(f"{len(failures)} of {len(results)} runs failed; see the table and "
                       f"each run's stderr.txt in {compare_dir}")


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
