"""The recipe's data as the model's tensor arguments on the run's device, checked against
the model's signature and its likelihood's support before any training."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from pyro import poutine

from workbench.data import sources as data_module
from workbench.errors import UsageError, did_you_mean, one_line
from workbench.plugins.build import build
from workbench.plugins.registry import Registry


def model_arguments(model: Any) -> dict[str, bool] | None:
    """The model's arguments, each with whether it is required; None when it takes any."""
    try:
        parameters = inspect.signature(model).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    return {p.name: p.default is p.empty for p in parameters if p.kind is not p.VAR_POSITIONAL}


def load_data(registry: Registry, section: dict, model: Any, name: str,
              device: torch.device, rows: data_module.Rows | None = None
              ) -> tuple[dict, dict[str, str]]:
    """The recipe's data as tensors on the device, checked against the model's arguments, and
    where each came from. With ``rows`` (under torchrun), a data file or data set that can
    read part of its data reads only those rows and sets ``rows.total``."""
    takes = model_arguments(model)
    dataset = (build(registry, "dataset", section["dataset"], device=device, rows=rows)
               if "dataset" in section else None)
    gathered = data_module.gather(section, takes if takes is not None else {}, dataset, rows)
    if takes is not None:
        for key, where in gathered.origin.items():
            if key not in takes:
                raise UsageError(f"{where}: model {name!r} takes no argument {key!r}; "
                                 f"{did_you_mean(key, takes)}")
        for key, required in takes.items():
            if required and key not in gathered.values:
                raise UsageError(f"data.{key}: missing; model {name!r} needs it")
    return to_tensors(gathered, device), gathered.origin


def to_tensors(data: data_module.Data, device: torch.device) -> dict:
    """Numbers and arrays become float tensors on the run's device, refusing NaN and infinity;
    text stays text."""
    tensors = {}
    for key, value in data.values.items():
        where = data.origin[key]
        if isinstance(value, str):
            tensors[key] = value
            continue
        try:
            tensor = torch.as_tensor(value, dtype=torch.get_default_dtype(), device=device)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UsageError(f"{where}: not a number or a rectangular array of numbers "
                             f"({one_line(exc)})") from None
        finite = torch.isfinite(tensor)
        if not finite.all():
            index = (~finite).nonzero()[0].tolist()
            raise UsageError(f"{where}: {_at(tensor, index)} at index {index}")
        tensors[key] = tensor
    return tensors


def check_support(trace: poutine.Trace, data: dict, origin: dict[str, str]) -> None:
    """Observed values must lie in their likelihood's support (no 2 for a Bernoulli); the
    error names the data key (and file column) when the model observes it directly."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        fn, value = site["fn"], site["value"]
        if not torch.is_tensor(value):
            continue
        key = next((k for k, v in data.items() if v is value or (
            torch.is_tensor(v) and v.shape == value.shape and torch.equal(v, value))), None)
        where = origin.get(key, f"data (observed at site {name!r})")
        inside = fn.support.check(value)
        if not inside.all():
            index = (~inside).nonzero()[0].tolist()
            raise UsageError(
                f"{where}: {_at(value, index)} at index {index} is outside the "
                f"support of the {type(fn).__name__} likelihood ({fn.support})"
            )


def _at(value: torch.Tensor, index: list[int]) -> Any:
    shown = value[tuple(index)]
    return shown.item() if shown.numel() == 1 else shown.tolist()


def shard(data: dict, size: int, owned: torch.Tensor) -> dict:
    """One rank's rows of the data: every tensor whose first dimension is the plate's
    ``size`` is cut down to the rows ``owned``, so the rank does not hold the whole data;
    anything else (text, scalars, tensors of another length) is kept whole."""
    return {key: value.index_select(0, owned.to(value.device)).contiguous()
            if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == size
            else value
            for key, value in data.items()}
