"""What a run writes besides its checkpoint: losses.f64 (every good step's loss), recipe.yaml
(the recipe, with what each resume changed), summary.json (``workbench.rundir.summary``'s
``RunSummary``) and params.pt."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import pyro
import torch

from workbench.config.recipe import dump
from workbench.errors import Interrupted, UsageError, VibenchError
from workbench.report import posterior
from workbench.rundir import files, layout
from workbench.rundir import summary as schema
from workbench.train.callbacks import Callback

if TYPE_CHECKING:
    from workbench.train.runner import Run, TrainState


def summarize(run: Run, state: TrainState, callbacks: list[Callback], wall: float,
              report: dict, failure: VibenchError | None) -> dict:
    """The run's summary.json content (the contract docs/reference/summary-json.md gives,
    plus how the run went)."""
    tail = state.losses[-schema.FINAL_LOSS_STEPS:]
    extra: dict = {}
    for callback in callbacks:
        extra.update(callback.summary())  # averaged_steps, converged
    return schema.RunSummary(
        recipe=run.recipe, steps=state.step, wall_seconds=wall,
        steps_per_second=state.step / wall if wall > 0 else 0.0,
        final_loss=sum(tail) / len(tail) if tail else None,
        posterior=report.get("posterior", {}), diagnostics=report.get("diagnostics", {}),
        reference=report.get("reference"), report_seconds=report.get("report_seconds"),
        params={name: posterior.to_plain(value)
                for name, value in pyro.get_param_store().items()},
        status=_status(failure), error=None if failure is None else str(failure),
        skipped_steps=state.skipped, stopped_early=state.stopped_early,
        resumes=state.resumes, device=str(run.device),
        dtype=str(run.dtype).removeprefix("torch."), versions=versions(),
        data_hash=run.data_hash, world_size=run.world.size,
        threads=torch.get_num_threads(),
        compiled=run.compiled is not None and run.compiled.compiled, **extra,
    ).to_json()


def _status(failure: VibenchError | None) -> str:
    return ("completed" if failure is None else
            "interrupted" if isinstance(failure, Interrupted) else "failed")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        own = version("vibench")
    except PackageNotFoundError:
        own = "unknown"
    return {"vibench": own, "torch": torch.__version__, "pyro": pyro.__version__}


def write_results(run_dir: Path, summary: dict, params: bool = True) -> None:
    """summary.json (strict JSON) and (unless they went bad) the learned parameters, each
    written whole or not at all."""
    from workbench.rundir import jsonsafe

    files.write_atomic(run_dir / layout.SUMMARY, jsonsafe.dumps(summary, indent=2).encode())
    if params:
        with files.atomic_path(run_dir / layout.PARAMS) as tmp:
            pyro.get_param_store().save(str(tmp))


class LossFile:
    """Every good step's loss, appended as raw float64 at each checkpoint: a checkpoint then
    costs the same at step 10 as at step 10^6."""

    def __init__(self, path: Path, written: int):
        self.path = path
        self.written = written

    def write(self, losses: list[float]) -> None:
        import array

        with files.open_for_writing(self.path, append=True) as handle:
            handle.truncate(self.written * 8)  # what a checkpoint after this one counted
            array.array("d", losses[self.written:]).tofile(handle)
            handle.flush()
            os.fsync(handle.fileno())  # before the checkpoint that counts them
        self.written = len(losses)

    @staticmethod
    def read(path: Path, count: int, where: str) -> list[float]:
        import array

        values = array.array("d")
        try:
            with open(path, "rb") as handle:
                values.fromfile(handle, count)
        except (OSError, EOFError) as exc:
            raise UsageError(f"{where}: {path.name} lacks the losses of the checkpoint "
                             f"({count}): {exc}") from None
        return values.tolist()


def recipe_text(recipe: dict, resumes: list[dict]) -> str:
    """recipe.yaml: the recipe as it runs now, then what each resume changed, as comments, so
    the file still runs and still says what happened."""
    lines = [dump(recipe).rstrip("\n")]
    for resume in resumes:
        changed = ", ".join(f"{key}: {old!r} -> {new!r}"
                            for key, (old, new) in resume["changes"].items())
        lines.append(f"# resumed at step {resume['step']}: {changed}")
    return "\n".join(lines) + "\n"
