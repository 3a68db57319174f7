"""Checkpoints: everything a run needs to go on exactly where it stopped.

The guide's parameters (unconstrained, by name) and buffers, the optimizer's (and schedule's)
state per parameter, every random number generator, the resolved recipe and the loop's state.
A checkpoint holds tensors and plain values only and is read with ``weights_only=True``, so a
checkpoint from someone else cannot run code. Written to a temporary file and renamed, so a
kill at any instant leaves the last complete checkpoint readable.
"""

from __future__ import annotations

import io
import os
import pickle
import random
from pathlib import Path
from typing import Any

import pyro
import torch

from workbench.errors import UsageError, one_line

FILENAME = "checkpoint.pt"
VERSION = 2
KEYS = ("version", "recipe", "data_hash", "state", "params", "buffers", "optim", "rng")


def rng_state() -> dict[str, Any]:
    """The state of every random number generator a run draws from, as plain values."""
    import numpy

    kind, keys, pos, has_gauss, cached = numpy.random.get_state()
    state = {"torch": torch.get_rng_state(), "random": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy

    torch.set_rng_state(state["torch"].cpu())
    random.setstate(state["random"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def params_state(guide: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The parameter store's unconstrained values and the guide's buffers (an IAF's masks),
    by name: what restoring into a freshly built run needs."""
    params = {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}
    buffers = ({name: b.detach().clone() for name, b in guide.named_buffers()}
               if isinstance(guide, torch.nn.Module) else {})
    return params, buffers


def restore_params(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   guide: Any, where: str) -> None:
    """Copy saved values into the run's own parameters and buffers, in place, so modules,
    the store and the optimizers keep sharing one tensor each, on the run's device."""
    current = dict(pyro.get_param_store().named_parameters())
    owned = dict(guide.named_buffers()) if isinstance(guide, torch.nn.Module) else {}
    for kind, saved, live in (("parameters", params, current), ("buffers", buffers, owned)):
        if set(saved) != set(live) or any(saved[k].shape != live[k].shape for k in live):
            raise UsageError(f"{where}: the checkpoint's {kind} ({_names(saved)}) do not fit "
                             f"this run's guide ({_names(live)})")
    with torch.no_grad():
        for name, tensor in current.items():
            tensor.copy_(params[name])
        for name, tensor in owned.items():
            tensor.copy_(buffers[name])


def save(run_dir: Path, checkpoint: dict[str, Any]) -> None:
    """Write ``checkpoint`` (the keys in KEYS but ``version``) whole or not at all."""
    buffer = io.BytesIO()  # torch.save reports a full disk as "iostream error": write the
    torch.save({"version": VERSION, **checkpoint}, buffer)  # bytes ourselves, for an OSError
    tmp = run_dir / (FILENAME + ".tmp")
    with open(tmp, "wb") as handle:
        handle.write(buffer.getbuffer())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, run_dir / FILENAME)


def load(run_dir: Path) -> dict[str, Any]:
    """The run directory's checkpoint, read without running any code it may hold, or a
    UsageError saying why it cannot be used."""
    path = run_dir / FILENAME
    where = f"--resume {run_dir}"
    if not path.is_file():
        raise UsageError(f"{where}: no {FILENAME} there; is it a vibench run directory?")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UsageError(f"{where}: {FILENAME} holds more than tensors and plain values "
                         f"(vibench never loads code from a file): {one_line(exc)[:120]}"
                         ) from None
    except Exception as exc:
        raise UsageError(f"{where}: cannot read {FILENAME}: {one_line(exc)[:200]}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise UsageError(f"{where}: {FILENAME} is not a checkpoint of this vibench "
                         f"(format {VERSION})")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise UsageError(f"{where}: {FILENAME} lacks {', '.join(missing)}")
    return state


def _names(tensors: dict) -> str:
    names = sorted(tensors)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") \
        if names else "none"
