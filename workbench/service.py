"""The work behind the commands: check a recipe, start a run, go on with a stopped one, find
and read the runs already made, export a run's posterior, and the report's lines.

The CLI parses and prints; ``run``, ``compare``, the Python API (``workbench.api``), the tests
and any later command share these functions, so a recipe is checked, a run directory claimed,
a checkpoint trusted and a report worded in one way.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from workbench.config import recipe as recipes
from workbench.config.kinds import COMPONENTS
from workbench.errors import RunError, UsageError, VibenchError, one_line
from workbench.plugins.registry import Registry
from workbench.progress import TerminalBar
from workbench.rundir import files
from workbench.rundir import summary as schema
from workbench.rundir.claim import RunDir, claim, reopen
from workbench.rundir.layout import CHECKPOINT, FITS, LOCK, LOSSES, RECIPE, SUMMARY

# What --resume may change: the remedies for a run that diverged or needs more steps, and how
# a step runs (train.compile: the state is the same either way; a run made before the key
# existed resumes).
RESUMABLE = ("optimizer", "train.steps", "train.skip_bad_steps", "train.compile")
DICT_SOURCE = "<dict>"  # how a recipe handed in as a dict (the Python API) is named in messages
SESSION = "notebook:"  # the name's prefix of a component handed in as a Python object
DEFAULT_THREADS = 1  # torch's CPU threads without --threads or OMP_NUM_THREADS (set_threads)


@dataclass
class Job:
    """A run set up and holding its run directory's lock, ready to train."""

    run: Any  # workbench.train.runner.Run
    run_dir: RunDir
    resume: dict | None = None
    changes: dict = field(default_factory=dict)

    @property
    def path(self) -> Path:
        return self.run_dir.path

    def train(self, on_step=None) -> dict:
        """Train (or go on), write the run directory, and let the directory go (and, under
        torchrun, the other processes)."""
        from workbench import distributed

        try:
            return self.run.train(self.run_dir.path, on_step, self.resume, self.changes)
        finally:
            self.run_dir.release()
            distributed.finish()


def set_threads(count: int | None) -> None:
    """Use ``count`` CPU threads for torch's operations; None: one thread, or as many as
    OMP_NUM_THREADS says where it is set (as ``vibench compare`` sets it for each run).

    One thread by default: the same recipe and seed then give the same numbers bit for bit
    (torch's reductions split over threads add in an order that varies run to run), and a
    small model, whose tensors are too small to share out, runs several times faster on one
    thread than on every core of a busy machine (benchmarks/threads.py)."""
    if count is None and os.environ.get("OMP_NUM_THREADS"):
        said = os.environ["OMP_NUM_THREADS"].strip()
        if not said.isdigit() or int(said) < 1:
            return  # torch read it at import, and made of it what it could
        count = int(said)  # again: an earlier run in this process may have set another count
    import torch

    torch.set_num_threads(count or DEFAULT_THREADS)


def prepare(source: Path | dict, sets: Sequence[str], registry: Registry,
            values: dict | None = None) -> dict:
    """A recipe with ``--set`` overrides, checked whole and with every default filled. The
    recipe is a file, or one already read (a dict, as YAML would give it: named ``<dict>`` in
    messages, its relative paths taken from the working directory, its name "run" if it has
    none). ``values`` sets whole sections to Python values, as ``--set SECTION=...`` would,
    before ``sets`` (the Python API's keywords: ``guide="auto_normal"``, ``data={...}``)."""
    if isinstance(source, dict):
        raw, where = {"name": "run", **source}, DICT_SOURCE
    else:
        raw, where = recipes.load(source), str(source)
    raw, overridden = recipes.apply_overrides({**raw, **(values or {})}, list(sets))
    return recipes.resolve(raw, registry, where, overridden | set(values or {}),
                           code=_notice_code)


def _notice_code(name: str) -> None:
    """For ``recipes.resolve``: say, before it is imported, that a recipe runs code from a
    module it names (not a registered plugin), as pip says it runs a package's build. A file
    the recipe names by its path (``model.py:model``) is the user's own model: no note."""
    where, _, attr = name.rpartition(":")
    if not where.endswith(".py"):
        print(f"note: the recipe runs code from module {where}: {attr}", file=sys.stderr,
              flush=True)


def start(source: Path | dict, sets: Sequence[str], out: Path | None, registry: Registry,
          values: dict | None = None) -> Job:
    """A new run of a recipe (a file, or a dict: see ``prepare``): checked, its run directory
    claimed, its components built. A recipe that fails to set up leaves no run directory
    behind."""
    from workbench import distributed
    from workbench.train import stepsize
    from workbench.train.runner import Run

    world = distributed.start()
    resolved = prepare(source, sets, registry, values)
    automatic = "auto" in resolved  # no guide named: the automatic pipeline
    if automatic and world.distributed:
        raise UsageError("the automatic pipeline runs as one process; run it without torchrun")
    held = _claim_as(world, resolved["name"], out)
    try:
        if automatic:
            from workbench.auto import pipeline

            return pipeline.start(resolved, registry, held)
        if not stepsize.wanted(resolved):
            return Job(Run.setup(resolved, registry), held)
        run = Run.setup(stepsize.placeholder(resolved), registry, compile=False)
        stepsize.adapt(run)
        return Job(run, held)
    except BaseException:
        held.abandon()
        raise


def shorthands(device: str | None = None, seed: int | None = None,
               steps: int | None = None) -> list[str]:
    """``--device``, ``--seed`` and ``--steps`` (``device=``, ``seed=``, ``steps=`` in Python)
    as the ``--set`` items they stand for."""
    given = {"device": device, "seed": seed, "train.steps": steps}
    return [f"{key}={value}" for key, value in given.items() if value is not None]


def run_recipe(source: Path | dict | None, sets: Sequence[str], out: Path | None,
               registry: Registry, *, values: dict | None = None,
               resume_dir: Path | None = None, threads: int | None = None,
               progress: Callable[[int], Any] | None = None,
               say: Callable[[str], None] | None = None,
               setup: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
               ) -> tuple[dict, Path] | None:
    """What ``vibench run`` and ``workbench.fit`` do, one way: warn of plugins that failed to
    load, start the run (or go on with ``resume_dir``), say its notes and its directory, train
    it with ``progress(total)`` (a context manager whose ``update(step, loss)`` is called
    after each step) and return its summary and directory. ``say`` takes each line for the
    user (default: stderr); ``setup`` is a context manager set-up runs inside. Under
    torchrun, a process other than rank 0 trains and returns None."""
    from workbench import distributed

    say = say or _say
    leader = distributed.detect().leader  # under torchrun rank 0 speaks for all
    for problem in registry.problems if leader else []:
        say(f"warning: {problem}")
    set_threads(threads)
    with setup():
        job = (start(source, sets, out, registry, values) if resume_dir is None
               else resume(resume_dir, sets, registry, threads))
    job.run.threads = getattr(job.run, "threads", None) or threads
    if hasattr(job, "pipeline"):  # the automatic pipeline's lines as its stages start
        job.pipeline.say = say
    if not leader:
        job.train()
        return None
    for note in job.run.notes:
        say(f"note: {note}")
    say(f"run directory: {job.path}")
    with (progress or Progress)(job.run.recipe["train"]["steps"]) as bar:
        if hasattr(job, "pipeline"):  # each fit's steps, counted afresh
            job.pipeline.on_fit = getattr(bar, "restart", None)
        try:
            summary = job.train(bar.update)
        except (UsageError, RunError):
            if resume_dir is None:
                _abandon_unused(job.run_dir)
            raise
    return summary, job.path


def _say(line: str) -> None:
    print(line, file=sys.stderr)


class Progress(TerminalBar):
    """A progress bar with the current loss on a terminal; otherwise a line every tenth (none
    with ``lines=False``)."""

    def __init__(self, total: int, lines: bool = True):
        super().__init__("SVI", total, ["loss {task.fields[loss]}", "TimeElapsedColumn",
                                        "TimeRemainingColumn"], loss="-")
        self.total = total
        self.lines = lines
        self.last = 0.0
        self.label = ""  # the piece of work whose steps these are (restart), if not the run

    def restart(self, label: str, total: int) -> None:
        """Count the steps of the next piece of work afresh (the automatic pipeline's next
        fit): ``label``'s steps out of ``total``."""
        self.total, self.label = total, label
        if self.bar is not None:
            self.bar.reset(self.task, total=total, completed=0, loss="-", description=label)

    def update(self, step: int, loss: float) -> None:
        if self.bar is None:
            if self.lines and (step == self.total or step % max(1, self.total // 10) == 0):
                fit = f"{self.label}: " if self.label else ""
                _say(f"{fit}step {step}/{self.total}  loss {loss:.4f}")
            return
        now = time.monotonic()
        if step == self.total or now - self.last >= 0.1:
            self.last = now
            self.bar.update(self.task, completed=step, loss=f"{loss:.4f}")


def with_objects(registry: Registry, values: dict, names: dict[str, str] | None = None
                 ) -> tuple[Registry, dict]:
    """For the Python API: each component section in ``values`` given as a Python object (a
    model function defined in a notebook) registered, for this run only, in a copy of
    ``registry`` under ``notebook:<its qualified name>`` (or the name ``names`` gives its
    section: a run's own, to read it back), as a ``file.py:attr`` name would be read; and
    ``values`` naming it there, so the recipe stays data and is checked as any other. A run
    directory cannot hold such an object: ``load`` needs it handed in again."""
    objects = {key: value for key, value in values.items()
               if (key,) in COMPONENTS and callable(value) and not isinstance(value, str)}
    if not objects:
        return registry, values
    named, added = dict(values), {}
    for key, value in objects.items():
        name = (names or {}).get(key) or SESSION + getattr(value, "__qualname__",
                                                           type(value).__qualname__)
        added[(COMPONENTS[(key,)], name)] = value
        named[key] = {"name": name}
    return registry.with_objects(added), named


def session_names(recipe: Any) -> dict[str, str]:
    """The component sections of a recipe (or a summary's) that name a Python object of the
    session that ran it (``notebook:...``), each with that name."""
    found = {}
    for path in COMPONENTS:
        section: Any = recipe
        for part in path:
            section = section.get(part) if isinstance(section, dict) else None
        name = section.get("name") if isinstance(section, dict) else None
        if isinstance(name, str) and name.startswith(SESSION):
            found[".".join(path)] = name
    return found


def resume(run_dir: Path, sets: Sequence[str], registry: Registry,
           threads: int | None = None) -> Job:
    """A stopped run, set up to go on from its checkpoint. ``sets`` may change only what
    RESUMABLE names; a recipe.yaml edited to another model, guide, loss or data, or data that
    changed on disk, is refused, since the result would be no run at all."""
    from workbench import distributed
    from workbench.rundir.jsonsafe import plain
    from workbench.train import checkpoint
    from workbench.train.runner import Run

    world = distributed.start()
    where = f"--resume {run_dir}"
    for item in sets:
        key = item.partition("=")[0].strip()
        if not _resumable(key):
            raise UsageError(f"{where}: --set {key} cannot change when a run goes on; only "
                             "--steps and --set optimizer.* (or train.skip_bad_steps) can")
    held = reopen(run_dir, where) if world.leader else RunDir(run_dir, -1)
    try:
        if _is_stopped_pipeline(run_dir):
            return _resume_pipeline(run_dir, sets, registry, held, where)
        saved = checkpoint.load(run_dir, where)
        threads = threads or saved.get("threads")  # the run's own, unless given again
        set_threads(threads)
        _check_world(saved, world.size, where)
        source = run_dir / RECIPE
        raw, overridden = recipes.apply_overrides(recipes.load(source), list(sets))
        resolved = recipes.resolve(raw, registry, str(source), overridden,
                                   code=_announce_code(where))
        changes = differences(plain(saved["recipe"]), plain(resolved))
        edited = [key for key in changes if not _resumable(key)]
        if edited:
            key = next((k for k in edited if k.endswith(".name")), edited[0])
            raise UsageError(
                f"{where}: recipe.yaml no longer describes this run ({key}: "
                f"{changes[key][0]!r} -> {changes[key][1]!r}); a run goes on with its own "
                "model, guide, loss, data and settings: start a new run for that")
        _check_steps(saved["state"], resolved["train"]["steps"], "train.steps" in changes,
                     where)
        run = Run.setup(resolved, registry)
        if run.data_hash and run.data_hash != saved["data_hash"]:  # "": a rank's rows only
            raise UsageError(f"{where}: the data are not the data this run started with "
                             "(a data file changed?); start a new run for new data")
        run.threads = threads
        return Job(run, held, saved, changes)
    except BaseException:
        held.release()
        raise


def _is_stopped_pipeline(run_dir: Path) -> bool:
    """Whether ``run_dir`` is an automatic pipeline's (its fits in ``fits/``, or its
    recipe.yaml naming guide auto), which has no checkpoint of its own."""
    if (run_dir / CHECKPOINT).is_file():
        return False
    if is_pipeline_dir(run_dir):
        return True
    if (run_dir / RECIPE).is_file():
        with contextlib.suppress(VibenchError):  # a damaged recipe: the checkpoint's error
            guide = recipes.load(run_dir / RECIPE).get("guide")
            return isinstance(guide, dict) and guide.get("name") == recipes.AUTO
    return False


def _resume_pipeline(run_dir: Path, sets: Sequence[str], registry: Registry, held: RunDir,
                     where: str) -> Any:
    """A stopped automatic pipeline, set up to run its stages again from its recipe.yaml,
    keeping each fit that finished before the stop (``Pipeline.fit``)."""
    from workbench.auto import pipeline

    if sets:
        raise UsageError(f"{where}: an automatic pipeline goes on with its own recipe; "
                         "--steps and --set cannot change it")
    source = run_dir / RECIPE
    resolved = recipes.resolve(recipes.load(source), registry, str(source), set(),
                               code=_announce_code(where))
    if "auto" not in resolved:
        raise UsageError(f"{where}: {source} no longer names the automatic pipeline "
                         "(guide: auto); start a new run for that")
    return pipeline.start(resolved, registry, held, resumed=True)


def load(run_dir: Path, registry: Registry, trust_code: bool = False,
         where: str | None = None) -> Any:
    """A run rebuilt from its directory with what it learned (its last checkpoint), for use
    in Python: ``load(path, get_registry()).guide`` draws from the fitted posterior. Reads
    the checkpoint safely; takes no lock, changes nothing. A run whose recipe names code
    (``file.py:attr``) is refused unless ``trust_code``: the directory may come from anyone."""
    from workbench.device import run_context
    from workbench.train import checkpoint
    from workbench.train.runner import Run

    where = where or f"load {run_dir}"
    saved = checkpoint.load(run_dir, where)
    for path, name in session_names(saved["recipe"]).items():
        kind = COMPONENTS[tuple(path.split("."))]
        if name not in registry.components[kind]:
            raise UsageError(
                f"{where}: its {kind} ({name}) was a Python object of the session that ran it "
                f"(fit({path.split('.')[0]}=...)), which a run directory cannot hold; use what "
                f"fit returned, or hand it in again: load(run_dir, {path.split('.')[0]}=...)")
    # a run from before defaults were stored as lists holds tuples (Adam's betas)
    resolved = recipes.resolve(recipes.as_yaml(saved["recipe"]), registry, str(run_dir / RECIPE),
                               code=None if trust_code else _refuse_code(where))
    run = Run.setup(resolved, registry, compile=False)  # it draws; it never steps
    with run_context(run.device, run.dtype):
        checkpoint.restore_params(saved["params"], saved["buffers"], run.guide, str(run_dir))
    return run


def _announce_code(where: str) -> Callable[[str], None]:
    """For ``recipes.resolve``: say, before it is imported, that a run names code."""
    def announce(name: str) -> None:
        print(f"note: {where}: this run names code ({name}), which goes on running now: "
              "resume only run directories you trust", file=sys.stderr, flush=True)
    return announce


def _refuse_code(where: str) -> Callable[[str], None]:
    """For ``recipes.resolve``: refuse a run directory's code, which only its user's say-so
    on the command line (``--trust-code``) may import."""
    def refuse(name: str) -> None:
        raise UsageError(f"names code ({name}), which vibench imports only when you say so "
                         f"({where.split()[0]} --trust-code, or trust_code=True in Python); "
                         "read it first: a run directory may come from anyone")
    return refuse


def export(run_dir: Path, registry: Registry, trust_code: bool = False) -> Path:
    """posterior.nc (ArviZ InferenceData) for a run, written from what it learned (its last
    checkpoint) on the random stream its report uses, so a run from before posterior.nc
    gets the file its report would have written. For the automatic pipeline's directory, the
    draws of its answer, from its fits' checkpoints (``workbench.auto.answer``), as the
    pipeline writes them. Holds the run directory's lock meanwhile."""
    from workbench.device import run_context
    from workbench.report import inference_data

    where = f"export {run_dir}"
    if not (run_dir / CHECKPOINT).is_file():
        if is_pipeline_dir(run_dir):
            return _export_pipeline(run_dir, registry, trust_code, where)
        raise UsageError(f"{run_dir}: not a vibench run directory (no {CHECKPOINT}); "
                         "give the directory `vibench run` wrote")
    held = reopen(run_dir, where)
    try:
        run = _load_fitted(run_dir, registry, trust_code, where)
        with run_context(run.device, run.dtype):
            return inference_data.write(run, run_dir)
    finally:
        held.release()


def is_pipeline_dir(run_dir: Path) -> bool:
    """Whether the automatic pipeline wrote ``run_dir``: its fits, each a run directory,
    are in ``fits/``."""
    return (run_dir / FITS).is_dir() and not (run_dir / CHECKPOINT).is_file()


def _export_pipeline(run_dir: Path, registry: Registry, trust_code: bool, where: str) -> Path:
    """posterior.nc of a finished pipeline's directory, rewritten from its fits."""
    from workbench.auto import answer

    summary = read_summary(run_dir)
    if "auto" not in summary:
        raise UsageError(f"{where}: its {SUMMARY} is not the automatic pipeline's (no auto "
                         "section), and it has no checkpoint.pt")
    held = reopen(run_dir, where)
    try:
        path, _ = answer.write(run_dir, summary, lambda fit: _load_fitted(
            fit, registry, trust_code, f"{where}: fit {fit.name}"))
        return path
    finally:
        held.release()


def _load_fitted(run_dir: Path, registry: Registry, trust_code: bool, where: str) -> Any:
    """``load``, refused where the data are not those the run was fitted to."""
    from workbench.train import checkpoint

    run = load(run_dir, registry, trust_code, where)
    if run.data_hash != checkpoint.load(run_dir, where)["data_hash"]:
        raise UsageError(f"{where}: the data are not the data this run was fitted to (a data "
                         "file changed?); its posterior would not match them")
    return run


def differences(old: Any, new: Any, prefix: str = "") -> dict[str, list]:
    """The dotted keys whose values differ between two recipes, each with [old, new]."""
    if isinstance(old, dict) and isinstance(new, dict):
        found: dict[str, list] = {}
        for key in sorted({*old, *new}, key=str):
            found.update(differences(old.get(key), new.get(key), f"{prefix}{key}."))
        return found
    return {} if old == new else {prefix.rstrip("."): [old, new]}


def _check_steps(state: dict, steps: int, more: bool, where: str) -> None:
    if state["step"] > steps:
        raise UsageError(f"{where}: --steps {steps} is fewer than the {state['step']} steps "
                         "the run has taken")
    if state["reported"] and state["stopped_early"] and not more:
        raise UsageError(f"{where}: the run stopped early at step {state['stopped_early']} "
                         "(its loss stopped improving); give --steps to run longer")
    if state["reported"] and state["step"] >= steps:
        raise UsageError(f"{where}: the run already took all its {steps} steps; give --steps "
                         "to run longer")


def _claim_as(world: Any, name: str, out: Path | None) -> RunDir:
    """The run directory: claimed (made and locked) by rank 0 alone; under torchrun it must be
    named with --out, so every rank knows it."""
    if not world.distributed:
        return claim(name, out)
    if out is None:
        raise UsageError("under torchrun give --out RUN_DIR: every process must know the run "
                         "directory (rank 0 alone writes it)")
    return claim(name, out) if world.leader else RunDir(out, -1)


def _check_world(saved: dict, size: int, where: str) -> None:
    """A run goes on with as many processes as it trained on: the ranks' shards and random
    streams are part of its state."""
    was = saved.get("world_size", 1)
    if was != size:
        how = (f"under torchrun with {was} processes in all (--nproc-per-node times nodes)"
               if was > 1 else "as one process, without torchrun")
        raise UsageError(f"{where}: the run trained on {was} process(es), not {size}; go on "
                         f"{how}, so that it continues exactly")


def _resumable(key: str) -> bool:
    return any(key == allowed or key.startswith(allowed + ".") for allowed in RESUMABLE)


def _abandon_unused(held: RunDir) -> None:
    """Remove a new run's directory that failed before it learned anything: no checkpoint and
    no summary in it or its fits (the README's "nothing is written" for a run that fails to
    set up, the automatic pipeline's included)."""
    if not any(held.path.rglob(CHECKPOINT)) and not any(held.path.rglob(SUMMARY)):
        held.abandon()


def list_runs(root: Path) -> list[dict]:
    """The runs under ``root``, newest first, each as ``run_info`` reads it. Torch is imported
    only for a run without summary.json, so listing finished runs is quick."""
    if not root.is_dir():
        raise UsageError(f"{root}: no such directory")
    found = sorted(((_updated(path), path) for path in find_runs(root)), reverse=True)
    return [run_info(path) for _, path in found]


def find_runs(root: Path) -> list[Path]:
    """The run directories ``root`` holds: itself, its folders, and the folders of a folder
    that is no run (a compare directory keeps its runs there)."""
    found = [root] if is_run_dir(root) else []
    for child in _folders(root):
        if is_run_dir(child):
            found.append(child)
        else:
            found.extend(grandchild for grandchild in _folders(child) if is_run_dir(grandchild))
    return found


def is_run_dir(path: Path) -> bool:
    """Whether a run wrote ``path``: it holds summary.json or a checkpoint, or only what a run
    writes before them, its lock and recipe.yaml (a run still setting up, or one that failed
    there)."""
    return path.is_dir() and any((path / name).is_file()
                                 for name in (SUMMARY, CHECKPOINT, RECIPE, LOCK))


def run_info(run_dir: Path) -> dict:
    """One line's worth of a run: its recipe's name, status, steps, final loss, k-hat and wall
    time, from summary.json, or from the checkpoint while the run is running or when it was
    killed before its first summary. The status is "running" while a live process holds the
    directory's lock, "failed" (with ``error``) for a run that stopped in set-up (neither
    file; its name from recipe.yaml if it got that far) or an automatic pipeline that stopped
    before its summary, and "unreadable" (with ``error``) when neither file can be read. An
    automatic pipeline's directory is one run (its summary.json the pipeline's answer); its
    fits are runs in its ``fits/``."""
    info: dict[str, Any] = {
        "name": None, "status": "unreadable", "steps": None, "final_loss": None, "khat": None,
        "wall_seconds": None, "path": str(run_dir),
        "updated": datetime.fromtimestamp(_updated(run_dir)).isoformat(timespec="seconds"),
        "source": None,
    }
    running = is_running(run_dir)
    errors = []
    if (run_dir / SUMMARY).is_file():
        try:
            info.update(_from_summary(read_summary(run_dir)), source=SUMMARY)
        except UsageError as exc:
            errors.append(str(exc))
    if (running or info["source"] is None) and (run_dir / CHECKPOINT).is_file():
        try:
            info.update(_from_checkpoint(run_dir), source=CHECKPOINT)
        except UsageError as exc:
            errors.append(str(exc))
    if running:
        info.update(status="running", pid=_lock_pid(run_dir))
    if info["source"] is None and not errors:  # neither file: set-up is going on, or failed
        info["name"] = _recipe_name(run_dir)
        if not running:
            info.update(status="failed", error=(
                f"the automatic pipeline stopped before its summary (interrupted, or no fit "
                f"succeeded); its fits are runs in {FITS}/" if is_pipeline_dir(run_dir)
                else "stopped in set-up, before its first checkpoint"))
    elif info["source"] is None:
        info["error"] = "; ".join(errors)
    return info


def _recipe_name(run_dir: Path) -> str | None:
    """The name in the run's recipe.yaml, if it has one that can be read."""
    import yaml

    try:
        recipe = yaml.safe_load((run_dir / RECIPE).read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    name = recipe.get("name") if isinstance(recipe, dict) else None
    return name if isinstance(name, str) else None


def read_summary(run_dir: Path) -> dict:
    """A run's summary.json, checked to hold what a report needs, or a UsageError saying why
    it cannot be shown."""
    path = run_dir / SUMMARY
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir}: no such run directory")
    if not path.is_file():
        if (run_dir / CHECKPOINT).is_file():
            if is_running(run_dir):
                raise UsageError(f"{run_dir}: no {SUMMARY} yet: the run is still running")
            raise UsageError(f"{run_dir}: no {SUMMARY}: the run was stopped before writing "
                             f"one; go on with: vibench run --resume {run_dir}")
        raise UsageError(f"{run_dir}: not a run directory (no {SUMMARY} or {CHECKPOINT})")
    try:
        summary = json.loads(files.read_bounded(path))
    except (OSError, ValueError, RecursionError) as exc:  # JSON and UTF-8 errors are ValueErrors
        raise UsageError(f"{path}: cannot be read: {one_line(exc)}") from None
    problem = schema.check(summary)
    if problem:
        raise UsageError(f"{path}: not a vibench summary ({problem})")
    return summary


def is_running(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's lock: then a shared lock cannot be had
    (the kernel drops a dead process's lock, so a killed run never looks alive)."""
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def data_arguments(factory: Callable) -> list[str] | None:
    """The data a model takes, read from its class's ``__call__`` without building it (which
    may need torch); None when the factory is no class or its model takes any argument."""
    if not inspect.isclass(factory) or not any("__call__" in vars(c) for c in factory.__mro__):
        return None
    raw = inspect.getattr_static(factory, "__call__")
    try:
        signature = inspect.signature(factory.__call__)
    except (TypeError, ValueError):
        return None
    parameters = list(signature.parameters.values())
    if not isinstance(raw, (staticmethod, classmethod)):
        parameters = parameters[1:]  # self
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind is not p.VAR_POSITIONAL]


def _from_summary(data: dict) -> dict:
    summary = schema.read(data)
    missing = summary.report_missing
    return {"name": summary.name, "status": summary.status, "steps": summary.steps,
            "final_loss": summary.final_loss, "khat": summary.khat,
            "wall_seconds": summary.wall_seconds,
            **({"report_missing": missing} if missing else {})}


def _from_checkpoint(run_dir: Path) -> dict:
    """What the checkpoint says of a run that has no summary yet (or a stale one): a stopped
    run, which ``--resume`` goes on with."""
    saved = _read_checkpoint(run_dir)
    state, recipe = saved["state"], saved.get("recipe")
    return {
        "name": recipe.get("name") if isinstance(recipe, dict) else None,
        "status": "interrupted",
        "steps": state["step"],
        "final_loss": _final_loss(run_dir / LOSSES, state.get("losses")),
        "khat": None,
        "wall_seconds": state.get("wall"),
    }


def _read_checkpoint(run_dir: Path) -> dict:
    """The checkpoint read as ``--resume`` reads it, without running code it may hold
    (``weights_only``), and memory-mapped, so a large guide costs no time."""
    from workbench.train import checkpoint

    path = run_dir / CHECKPOINT
    return checkpoint.read(path, str(path), mmap=True)


def _final_loss(path: Path, count: Any) -> float | None:
    """The mean of the last losses a checkpoint counts, as summary.json's final_loss is."""
    if not isinstance(count, int) or count <= 0:
        return None
    tail = array.array("d")
    start = max(0, count - schema.FINAL_LOSS_STEPS)
    try:
        with open(path, "rb") as handle:
            handle.seek(start * tail.itemsize)
            tail.fromfile(handle, count - start)
    except (OSError, EOFError):
        return None
    return sum(tail) / len(tail)


def _folders(path: Path) -> list[Path]:
    """The folders in ``path``, none if it cannot be read."""
    try:
        return [child for child in path.iterdir() if child.is_dir()]
    except OSError:
        return []


def _updated(run_dir: Path) -> float:
    """When the run last wrote its summary or checkpoint (its folder's time if neither can be
    read)."""
    times = []
    for path in (run_dir / SUMMARY, run_dir / CHECKPOINT):
        try:
            times.append(path.stat().st_mtime)
        except OSError:
            pass
    if not times:
        try:
            times.append(run_dir.stat().st_mtime)
        except OSError:
            pass
    return max(times, default=0.0)


def _lock_pid(run_dir: Path) -> int | None:
    """The pid the run directory's writer wrote into its lock."""
    try:
        text = (run_dir / LOCK).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


# --------------------------------------------------------------------------------------------
# the report


def report_lines(summary: dict, limit: int = 10) -> list[str]:
    """One line per latent site (per element for a tensor site, up to ``limit``): mean +- sd,
    and the exact posterior's beside it where known; under it the 90% interval, the KL to the
    exact posterior and the importance-weighted estimate; then PSIS k-hat and its reading,
    and the ELBO and log evidence from the same draws; then, where the model has a reference
    posterior, z and r per parameter and the verdict."""
    read = schema.read(summary)
    lines = []
    for site, entry in read.posterior.items():
        keys = [k for k in ("mean", "std", "exact_mean", "exact_std", "q05", "q95",
                            "iw_mean", "iw_std") if k in entry]
        flat = {k: list(_flatten(entry[k])) for k in keys}
        count = len(flat["mean"])
        for i in range(min(count, limit)):
            label = site if not isinstance(entry["mean"], list) else f"{site}[{i}]"
            line = f"{label}: {flat['mean'][i]:.3f} +- {flat['std'][i]:.3f}"
            if "exact_mean" in flat:
                line += f" (exact {flat['exact_mean'][i]:.3f} +- {flat['exact_std'][i]:.3f})"
            lines.append(line)
            details = []
            if "q05" in flat:
                details.append(f"90% in [{flat['q05'][i]:.3f}, {flat['q95'][i]:.3f}]")
            if "iw_mean" in flat:
                details.append(f"importance-weighted {flat['iw_mean'][i]:.3f} +- "
                               f"{flat['iw_std'][i]:.3f}")
            if details:
                lines.append("    " + "; ".join(details))
        if "kl" in entry:
            lines.append(f"    KL(guide || exact) {entry['kl']:.4f} ({entry['kl_method']})")
        if count > limit:
            lines.append(f"{site}: {count - limit} more elements in summary.json")
    if isinstance(read, schema.PipelineSummary):
        from workbench.auto.pipeline import lines as auto_lines

        lines.extend(auto_lines(summary))
    lines += khat_lines(read.diagnostics)
    lines += mcse_lines(read.posterior)
    if read.reference:
        from workbench.report import reference

        lines += reference.lines(read.reference)
    return lines


def final_line(summary: dict, run_dir: Path | str) -> str:
    """The report's last line: final loss, steps, time and speed, and where the run is."""
    read = schema.read(summary)
    loss = read.final_loss
    return (f"final loss {'-' if loss is None else format(loss, '.4f')} | {read.steps} "
            f"steps in {read.wall_seconds:.1f} s ({read.steps_per_second:.0f} "
            f"steps/s) | {run_dir}")


def khat_lines(diagnostics: schema.Diagnostics) -> list[str]:
    """The report's trust verdict: PSIS k-hat and its reading (or why there is none), then
    the ELBO and log evidence from the same draws; where the answer is HMC draws (the
    automatic pipeline's hmc stage), the chains' own verdict instead."""
    lines = []
    if diagnostics.get("sampler"):
        return [sampler_line(diagnostics["sampler"])]
    if diagnostics.get("khat") is not None:
        se = diagnostics.get("khat_se")
        lines.append(f"PSIS k-hat {diagnostics['khat']:.2f}"
                     + ("" if se is None else f" +- {se:.2f}")
                     + f" ({diagnostics['reading']}); importance-sampling ESS "
                     f"{diagnostics['ess']:.0f} of {diagnostics['num_draws']}")
        for said in ("sized", "more_draws"):
            if diagnostics.get(said):
                lines.append(f"    {diagnostics[said]}")
        if diagnostics.get("log_evidence") is not None:
            elbo = "-inf" if diagnostics.get("elbo") is None else f"{diagnostics['elbo']:.4f}"
            se = diagnostics.get("log_evidence_se")
            lines.append(f"ELBO {elbo}; log evidence {diagnostics['log_evidence']:.4f}"
                         + ("" if se is None else f" +- {se:.4f}")
                         + " (importance-sampled, from the same draws)")
    elif diagnostics.get("reason"):
        lines.append(f"PSIS k-hat not computed: {diagnostics['reason']}")
    return lines


def sampler_line(sampler: dict) -> str:
    """The HMC chains' verdict in one line: nested R-hat, ESS and divergences against their
    thresholds (``thresholds.chains_distrusted``)."""
    from workbench.report.thresholds import ESS_CHAINS, RHAT_AGREE

    error = 1 / math.sqrt(sampler["ess"]) if sampler["ess"] > 0 else math.inf
    limit = sampler.get("nested_rhat_limit", RHAT_AGREE)  # older runs' limit was 1.01
    return (f"HMC draws: nested R-hat {sampler['nested_rhat']:.3f} (at most {limit:.3f}), "
            f"ESS {sampler['ess']:.0f} (at least {ESS_CHAINS}; the means' Monte Carlo error "
            f"+-{error:.3f} sd at most), {sampler['divergences']} divergent transitions: "
            + ("trusted" if sampler["trusted"] else "do not trust"))


def mcse_lines(posterior: dict) -> list[str]:
    """The Monte Carlo error of the importance-weighted estimates, in one line where the
    summary has it (workbench/report/iw_error.py): the largest sd MCSE as a share of its sd
    and the largest mean MCSE in posterior sds, each with its element, and the largest k-hat
    of an sd's tail where one is past ``KHAT_TRUSTED`` (then no MCSE bounds that sd)."""
    from workbench.report.thresholds import KHAT_TRUSTED

    rows = list(_mcse_rows(posterior))
    sds = [(sd, label) for label, sd, _, _ in rows if sd is not None]
    if not sds:
        return []
    line = (f"MCSE of the importance-weighted estimates, largest: sd +-{max(sds)[0]:.1%} of "
            f"itself ({max(sds)[1]})")
    means = [(mean, label) for label, _, mean, _ in rows if mean is not None]
    if means:
        line += f", mean +-{max(means)[0]:.3f} posterior sd ({max(means)[1]})"
    tails = [(k, label) for label, _, _, k in rows if k is not None and k > KHAT_TRUSTED]
    if tails:
        line += (f"; the sd of {max(tails)[1]} has no bound: its tail's k-hat is "
                 f"{max(tails)[0]:.2f} > {KHAT_TRUSTED}")
    return [line]


def _mcse_rows(posterior: dict):
    """Per element of each site with an sd MCSE: its label, that MCSE and the mean's as
    shares of its sd, and its sd's tail k-hat (None where a number is missing)."""
    for site, entry in posterior.items():
        if "iw_std_mcse" not in entry:
            continue
        sds = list(_flatten(entry.get("iw_std", entry["std"])))
        missing = [None] * len(sds)
        columns = [list(_flatten(entry[key])) if key in entry else missing
                   for key in ("iw_std_mcse", "iw_mean_mcse", "iw_std_khat")]
        for i, (sd, std_mcse, mean_mcse, khat) in enumerate(zip(sds, *columns)):
            label = site if not isinstance(entry["std"], list) else f"{site}[{i}]"
            yield label, _share(std_mcse, sd), _share(mean_mcse, sd), _number(khat)


def _share(value: Any, sd: Any) -> float | None:
    """An MCSE as a share of a positive sd, or None."""
    if _number(value) is None or _number(sd) is None or not sd > 0:
        return None
    return value / sd


def _number(value: Any) -> float | None:
    """A summary's number, None for null or NaN."""
    return None if value is None or value != value else float(value)


def verdict(summary: dict) -> str:
    """The report's k-hat line, its reading in brackets ("PSIS k-hat 0.04 (good); ..."), or
    why there is no k-hat; "" where the summary has neither."""
    return next(iter(khat_lines(schema.read(summary).diagnostics)), "")


def _flatten(value: Any):
    if isinstance(value, list):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def catalogue(registry: Registry, kinds: list[str]) -> dict[str, Any]:
    """What ``vibench list --json`` prints: each kind's components with their plugin,
    description, options (default, required, type) and, for a model, the data it takes;
    ``guide: auto`` among the guides; then name conflicts and broken plugins."""
    listing: dict[str, Any] = {
        kind: [{
            "name": c.name, "plugin": c.plugin, "description": c.description,
            "options": {o.name: {"default": None if o.required else json_default(o.default),
                                 "required": o.required, "type": o.type_name()}
                        for o in c.options.values()},
            **({"data_arguments": data_arguments(c.factory)} if kind == "model" else {}),
        } for c in (registry.components[kind][n] for n in registry.names(kind))]
        for kind in kinds
    }
    if "guide" in listing:  # guide auto: the recipe takes it, though nothing registers it
        from workbench.auto.pipeline import catalogue_entry

        listing["guide"] = sorted([*listing["guide"], catalogue_entry()],
                                  key=lambda entry: entry["name"])
    listing["conflicts"] = [{"kind": k, "name": name, "plugins": plugins}
                            for (k, name), plugins in registry.conflicts.items() if k in kinds]
    listing["broken"] = [{"plugin": p.plugin, "where": p.where, "error": p.error}
                         for p in registry.problems]
    return listing


def json_default(value: Any, limit: int = 200) -> Any:
    """A default as JSON holds it: tuples as lists, anything else not JSON as its repr on one
    line (an array's repr spans lines), cut to ``limit`` characters."""
    if isinstance(value, tuple):
        return [json_default(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
