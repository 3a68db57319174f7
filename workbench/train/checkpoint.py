"""Checkpoints: everything a run needs to go on exactly where it stopped.

The guide's parameters (unconstrained, by name) and buffers, the optimizer's (and schedule's)
state per parameter, every random number generator, the resolved recipe and the loop's state.
A checkpoint holds tensors and plain values only and is read with ``weights_only=True``, so a
checkpoint from someone else cannot run code. Written to a temporary file and renamed, so a
kill at any instant leaves the last complete checkpoint readable.
"""

from __future__ import annotations

import io
import pickle
import random
import zipfile
from pathlib import Path
from typing import Any

import torch

from workbench.errors import UsageError, one_line
from workbench.rundir import files
from workbench.rundir.layout import CHECKPOINT

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


def set_rng_state(state: dict[str, Any], where: str) -> None:
    """Put back what ``rng_state`` saved; a damaged state is a UsageError naming ``where``."""
    import numpy

    try:
        torch.set_rng_state(state["torch"].cpu())
        random.setstate(state["random"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    except Exception as exc:
        raise UsageError(f"{where}: {CHECKPOINT} is damaged: its random generators' state "
                         f"cannot be restored ({one_line(exc)[:120]})") from None


def params_state(guide: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The parameter store's unconstrained values and the guide's buffers (an IAF's masks),
    by name: what restoring into a freshly built run needs."""
    import pyro

    params = {name: p.detach().clone() for name, p in pyro.get_param_store().named_parameters()}
    buffers = ({name: b.detach().clone() for name, b in guide.named_buffers()}
               if isinstance(guide, torch.nn.Module) else {})
    return params, buffers


def restore_params(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                   guide: Any, where: str) -> None:
    """Copy saved values into the run's own parameters and buffers, in place, so modules,
    the store and the optimizers keep sharing one tensor each, on the run's device."""
    import pyro

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
    files.write_atomic(run_dir / CHECKPOINT, buffer.getbuffer(), durable=True)


def load(run_dir: Path, where: str | None = None) -> dict[str, Any]:
    """The run directory's checkpoint, checked whole before any of it is used; ``where``
    names the command in messages (``--resume DIR`` if None). A UsageError says why it
    cannot be used."""
    where = where or f"--resume {run_dir}"
    path = run_dir / CHECKPOINT
    if not path.is_file():
        raise UsageError(f"{where}: no {CHECKPOINT} there; is it a vibench run directory?")
    return read(path, where)


def read(path: Path, where: str, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file read without running any code it may hold (``weights_only``), after
    its archive is checked to inflate to no more than its size, and then checked to be a
    checkpoint of this vibench whose every part has the type a run restores."""
    _check_archive(path, where)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise UsageError(f"{where}: {CHECKPOINT} holds more than tensors and plain values "
                         f"(vibench never loads code from a file): {one_line(exc)[:120]}"
                         ) from None
    except Exception as exc:
        raise UsageError(f"{where}: cannot read {CHECKPOINT}: {one_line(exc)[:200]}") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise UsageError(f"{where}: {CHECKPOINT} is not a checkpoint of this vibench "
                         f"(format {VERSION})")
    missing = [key for key in KEYS if key not in state]
    if missing:
        raise UsageError(f"{where}: {CHECKPOINT} lacks {', '.join(missing)}")
    files.check_shape({key: state.get(key) for key in ("recipe", "state", "callbacks")},
                      f"{where}: {CHECKPOINT}", items=MAX_PLAIN_VALUES)
    problem = _problem(state)
    if problem:
        raise UsageError(f"{where}: {CHECKPOINT} is damaged: {problem}")
    return state


MAX_PLAIN_VALUES = 2 * 10**6  # in a checkpoint's recipe, loop state and callbacks' state


def _check_archive(path: Path, where: str) -> None:
    """``torch.save`` stores its archive's entries uncompressed: one that would inflate past
    the file's own size is no checkpoint (and could exhaust memory)."""
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (OSError, zipfile.BadZipFile, ValueError) as exc:
        raise UsageError(f"{where}: {CHECKPOINT} is not a checkpoint archive: "
                         f"{one_line(exc)[:120]}") from None
    inflated = sum(info.file_size for info in infos)
    if inflated > size or any(info.compress_type != zipfile.ZIP_STORED for info in infos):
        raise UsageError(f"{where}: {CHECKPOINT} would inflate to {inflated:,} bytes from "
                         f"{size:,}; vibench writes no compressed checkpoint")


def _problem(saved: dict[str, Any]) -> str:
    """What in a checkpoint does not have the type a run restores, or ''."""
    state = saved["state"]
    if not isinstance(saved["recipe"], dict):
        return "its recipe is not a mapping"
    if not isinstance(saved["data_hash"], str):
        return "data_hash is not text"
    if not isinstance(state, dict):
        return "state is not a mapping"
    counts = {key: state.get(key) for key in ("step", "skipped", "losses")}
    for key, value in counts.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return f"state.{key} is not a count ({value!r})"
    if counts["losses"] > counts["step"]:
        return f"state.losses ({counts['losses']}) counts more losses than steps ({counts['step']})"
    if not isinstance(state.get("wall"), (int, float)) or not isinstance(
            state.get("resumes", []), list):
        return "state.wall or state.resumes has the wrong type"
    for key in ("params", "buffers"):
        if not isinstance(saved[key], dict) or not all(
                isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in saved[key].items()):
            return f"{key} is not tensors by name"
    optim = saved["optim"]
    if not isinstance(optim, dict) or not set(optim) <= set(saved["params"]) or not all(
            map(_optimizer_state, optim.values())):
        return "optim is not an optimizer state per parameter"
    threads = saved.get("threads")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        return "threads is not a number of threads"
    if "world_size" in saved and (not isinstance(saved["world_size"], int)
                                  or saved["world_size"] < 1):
        return "world_size is not a number of processes"
    if not isinstance(saved["rng"], dict) or not {"torch", "random", "numpy"} <= set(saved["rng"]):
        return "rng is not the state of the random generators"
    return ""


def _optimizer_state(value: Any) -> bool:
    """Whether ``value`` is a torch optimizer's state dict, or a schedule's with its
    optimizer's (as Pyro's ``get_state`` gives them)."""
    if isinstance(value, dict) and {"optimizer", "scheduler"} <= set(value):
        value = value["optimizer"]
    return isinstance(value, dict) and {"state", "param_groups"} <= set(value)


def _names(tensors: dict) -> str:
    names = sorted(tensors)
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "") \
        if names else "none"
