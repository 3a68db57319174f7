"""The work behind the commands: check a recipe, start a run, go on with a stopped one.

The CLI parses and prints; ``run``, ``compare``, the tests and any later command share these
functions, so a recipe is checked, a run directory claimed and a checkpoint trusted in one way.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from workbench import recipe as recipes
from workbench.errors import UsageError
from workbench.registry import Registry
from workbench.rundir import LOCK, RunDir, claim, reopen

# What --resume may change: the remedies for a run that diverged or needs more steps.
RESUMABLE = ("optimizer", "train.steps", "train.skip_bad_steps")


@dataclass
class Job:
    """A run set up and holding its run directory's lock, ready to train."""

    run: Any  # workbench.runner.Run
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


def prepare(source: Path, sets: Sequence[str], registry: Registry) -> dict:
    """A recipe file with ``--set`` overrides, checked whole and with every default filled."""
    raw, overridden = recipes.apply_overrides(recipes.load(source), list(sets))
    return recipes.resolve(raw, registry, str(source), overridden)


def start(source: Path, sets: Sequence[str], out: Path | None, registry: Registry) -> Job:
    """A new run of a recipe: checked, its run directory claimed, its components built. A
    recipe that fails to set up leaves no run directory behind."""
    from workbench import distributed
    from workbench.runner import Run

    world = distributed.start()
    resolved = prepare(source, sets, registry)
    held = _claim_as(world, resolved["name"], out)
    try:
        return Job(Run.setup(resolved, registry), held)
    except BaseException:
        held.release()
        _remove_unused(held)
        raise


def resume(run_dir: Path, sets: Sequence[str], registry: Registry) -> Job:
    """A stopped run, set up to go on from its checkpoint. ``sets`` may change only what
    RESUMABLE names; a recipe.yaml edited to another model, guide, loss or data, or data that
    changed on disk, is refused, since the result would be no run at all."""
    from workbench import checkpoint, distributed
    from workbench.jsonsafe import plain
    from workbench.runner import Run

    world = distributed.start()
    where = f"--resume {run_dir}"
    for item in sets:
        key = item.partition("=")[0].strip()
        if not _resumable(key):
            raise UsageError(f"{where}: --set {key} cannot change when a run goes on; only "
                             "--steps and --set optimizer.* (or train.skip_bad_steps) can")
    held = reopen(run_dir, where) if world.leader else RunDir(run_dir, -1)
    try:
        saved = checkpoint.load(run_dir)
        _check_world(saved, world.size, where)
        source = run_dir / "recipe.yaml"
        raw, overridden = recipes.apply_overrides(recipes.load(source), list(sets))
        resolved = recipes.resolve(raw, registry, str(source), overridden)
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
        if run.data_hash != saved["data_hash"]:
            raise UsageError(f"{where}: the data are not the data this run started with "
                             "(a data file changed?); start a new run for new data")
        return Job(run, held, saved, changes)
    except BaseException:
        held.release()
        raise


def load(run_dir: Path, registry: Registry) -> Any:
    """A run rebuilt from its directory with what it learned (its last checkpoint), for use
    in Python: ``load(path, get_registry()).guide`` draws from the fitted posterior. Reads
    the checkpoint safely; takes no lock, changes nothing."""
    from workbench import checkpoint
    from workbench.runner import Run, run_context

    saved = checkpoint.load(run_dir)
    resolved = recipes.resolve(saved["recipe"], registry, str(run_dir / "recipe.yaml"))
    run = Run.setup(resolved, registry)
    with run_context(run.device, run.dtype):
        checkpoint.restore_params(saved["params"], saved["buffers"], run.guide, str(run_dir))
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


def _remove_unused(held: RunDir) -> None:
    """Remove the directories claiming a run directory made, if nothing else came into them."""
    for path in reversed(held.created):
        try:
            if all(p.name == LOCK for p in path.iterdir()):
                shutil.rmtree(path)
        except OSError:
            return
