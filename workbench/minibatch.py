"""Minibatches: each step, a fresh random batch of one plate's indices."""

from __future__ import annotations

from typing import Callable

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from workbench.errors import UsageError


class Minibatch(Messenger):
    """Each step, a fresh random batch of one plate's indices, drawn with replacement in time
    proportional to the batch, not to the data (Pyro's own subsampling permutes all of them).
    The plate scales its sites by size / batch, so the loss stays unbiased."""

    def __init__(self, plate: str | None = None, size: int = 0, batch_size: int = 0,
                 device: torch.device | None = None, dim: int | None = None):
        super().__init__()
        self.plate, self.size, self.batch_size, self.device = plate, size, batch_size, device
        self.dim = dim
        self.indices: torch.Tensor | None = None

    @classmethod
    def of(cls, trace: poutine.Trace, train: dict, device: torch.device) -> Minibatch:
        """The minibatching the recipe's train section asks for (none without batch_size)."""
        if not train["batch_size"]:
            return cls()
        plates = {name: site["fn"].size for name, site in trace.nodes.items()
                  if site_is_subsample(site)}
        name = train["subsample_plate"]
        if name is None and len(plates) == 1:
            name = next(iter(plates))
        if name not in plates:
            which = ", ".join(plates) or "none"
            raise UsageError(f"train.subsample_plate: name the model's plate to subsample "
                             f"(its plates: {which})")
        if train["batch_size"] >= plates[name]:
            raise UsageError(f"train.batch_size: {train['batch_size']} is not smaller than "
                             f"plate {name!r} ({plates[name]}); leave batch_size out")
        dims = [frame.dim for site in trace.nodes.values() if site["type"] == "sample"
                for frame in site["cond_indep_stack"] if frame.name == name]
        return cls(name, plates[name], train["batch_size"], device, dims[0] if dims else None)

    def __call__(self, fn: Callable) -> Callable:
        """``fn`` drawing this batch; a guide with Pyro's ``create_plates`` hook (the
        autoguides, whose prototype sees the full plate) is told to subsample it too."""
        if self.plate is None:
            return fn
        if hasattr(fn, "create_plates") and getattr(fn, "create_plates") is None:
            fn.create_plates = lambda *args, **kwargs: pyro.plate(
                self.plate, self.size, subsample=self.indices, dim=self.dim)
        return super().__call__(fn)

    def resample(self) -> None:
        if self.plate is not None:
            self.indices = torch.randint(self.size, (self.batch_size,), device=self.device)

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] == self.plate and site_is_subsample(msg):
            msg["value"] = self.indices
