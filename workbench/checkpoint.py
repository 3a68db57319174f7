"""Checkpoints: everything a run needs to go on exactly where it stopped.

The parameter store, the optimizer's (and schedule's) state per parameter, every random
number generator, the step and the losses so far. Written to a temporary file and renamed, so
a kill at any instant leaves the last complete checkpoint readable.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pyro
import torch

from workbench.errors import UsageError

FILENAME = "checkpoint.pt"


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a run draws from."""
    import numpy

    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": numpy.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy

    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    numpy.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(run_dir: Path, optim: Any, progress: dict[str, Any]) -> None:
    """Write a checkpoint of the run as it is now; ``progress`` holds the loop's own state
    (step, losses, ...)."""
    state = {
        "progress": progress,
        "params": pyro.get_param_store().get_state(),
        "optim": optim.get_state(),
        "rng": rng_state(),
    }
    tmp = run_dir / (FILENAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, run_dir / FILENAME)


def load(run_dir: Path) -> dict[str, Any]:
    """The run directory's checkpoint, or a UsageError saying why there is none."""
    path = run_dir / FILENAME
    if not path.is_file():
        raise UsageError(f"--resume {run_dir}: no {FILENAME} there; is it a vibench run directory?")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise UsageError(f"--resume {run_dir}: cannot read {FILENAME}: {exc}") from None
