"""Minibatches: each step, a fresh random batch of one plate's indices; under torchrun, each
rank's batch comes from its own shard of that plate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from workbench.distributed import World
from workbench.errors import UsageError


@dataclass
class Shard:
    """One rank's part of a plate of ``size``: the indices ``owned`` (rank r of N takes
    r::N), disjoint from every other rank's. ``local``: the data were cut down to these rows,
    so the model sees a plate of ``len(owned)`` and each of its sites is scaled up to the
    whole plate; otherwise the data are whole and the plate gets global indices."""

    owned: torch.Tensor
    size: int
    local: bool

    @property
    def count(self) -> int:
        return len(self.owned)

    @property
    def weight(self) -> float:
        """This rank's share of the plate: its weight when the ranks' estimates are summed."""
        return self.count / self.size


class Minibatch(Messenger):
    """Each step, a fresh random batch of one plate's indices, drawn with replacement in time
    proportional to the batch, not to the data (Pyro's own subsampling permutes all of them).
    The plate scales its sites by size / batch, so the loss stays unbiased. With a ``shard``
    (under torchrun) the batch is drawn from the rank's own indices, or is all of them when
    there is no ``batch_size``."""

    def __init__(self, plate: str | None = None, size: int = 0, batch_size: int = 0,
                 device: torch.device | None = None, dim: int | None = None,
                 shard: Shard | None = None):
        super().__init__()
        self.plate, self.size, self.batch_size, self.device = plate, size, batch_size, device
        self.dim = dim
        self.shard = shard
        self.indices: torch.Tensor | None = None

    @classmethod
    def of(cls, trace: poutine.Trace, train: dict, device: torch.device,
           world: World = World(), total: int | None = None) -> Minibatch:
        """The minibatching the recipe's train section asks for (none without batch_size),
        and under torchrun the rank's shard of the plate. ``total``: the data were read as
        this rank's rows of that many (see ``fits_rows``), so the plate in ``trace`` has the
        rank's rows and the whole plate has ``total``."""
        if not train["batch_size"] and not world.distributed:
            return cls()
        plates, name = _plates(trace), _plate_name(trace, train)
        if total is not None and name in plates:
            plates[name] = total
        if name not in plates:
            if not train["batch_size"] and name is None:
                return cls()  # nothing to shard: every rank fits the whole data
            which = ", ".join(plates) or "none"
            raise UsageError(f"train.subsample_plate: name the model's plate to subsample "
                             f"(its plates: {which})")
        if train["batch_size"] and train["batch_size"] >= plates[name]:
            raise UsageError(f"train.batch_size: {train['batch_size']} is not smaller than "
                             f"plate {name!r} ({plates[name]}); leave batch_size out")
        dims = [frame.dim for site in trace.nodes.values() if site["type"] == "sample"
                for frame in site["cond_indep_stack"] if frame.name == name]
        dim = dims[0] if dims else None
        if not world.distributed:
            return cls(name, plates[name], train["batch_size"], device, dim)
        shard = cls.shard_of(trace, name, plates[name], world, device)
        size = shard.count if shard.local else shard.size
        return cls(name, size, train["batch_size"] or 0, device, dim, shard)

    @staticmethod
    def shard_of(trace: poutine.Trace, plate: str, size: int, world: World,
                 device: torch.device) -> Shard:
        """Rank r's indices r::N of the plate; the data can be cut down to them unless a
        latent site lives in the plate (the guide's per-datum parameters span the plate)."""
        if size < world.size:
            raise UsageError(f"plate {plate!r} has {size} elements, fewer than the "
                             f"{world.size} processes; use fewer processes")
        owned = torch.arange(world.rank, size, world.size, device=device)
        return Shard(owned, size, local=not _latent_in(trace, plate))

    @staticmethod
    def fits_rows(trace: poutine.Trace, train: dict, world: World, total: int) -> bool:
        """Whether data read as this rank's rows of ``total`` (``data.Rows``) are what its
        shard would have cut: the plate to split has exactly those rows and no latent site
        lives in it. If not, the rank must read the data whole."""
        plates, name = _plates(trace), _plate_name(trace, train)
        return (name in plates and plates[name] == len(range(world.rank, total, world.size))
                and not _latent_in(trace, name))

    @property
    def weight(self) -> float | None:
        """This rank's share of the data (None without a shard)."""
        return None if self.shard is None else self.shard.weight

    def __call__(self, fn: Callable) -> Callable:
        """``fn`` drawing this batch; a guide with Pyro's ``create_plates`` hook (the
        autoguides, whose prototype sees the full plate) is told to subsample it too."""
        if self.plate is None:
            return fn
        if hasattr(fn, "create_plates") and fn.create_plates is None:
            fn.create_plates = self.guide_plates
        return super().__call__(fn)

    def guide_plates(self, *args, **kwargs) -> pyro.plate:
        """The plate as an autoguide makes it: subsampled to this step's indices."""
        return pyro.plate(self.plate, self.size, subsample=self.indices, dim=self.dim)

    def resample(self) -> None:
        if self.plate is None:
            return
        if self.shard is None:
            self.indices = torch.randint(self.size, (self.batch_size,), device=self.device)
            return
        local = (torch.randint(self.shard.count, (self.batch_size,), device=self.device)
                 if self.batch_size else
                 torch.arange(self.shard.count, device=self.device))
        self.indices = local if self.shard.local else self.shard.owned[local]

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] == self.plate and site_is_subsample(msg):
            msg["value"] = self.indices
        elif self.shard is not None and self.shard.local and any(
                frame.name == self.plate for frame in msg["cond_indep_stack"]):
            msg["scale"] = msg["scale"] * (self.shard.size / self.shard.count)


def _plates(trace: poutine.Trace) -> dict[str, int]:
    """The model's plates that can be subsampled, with their sizes."""
    return {name: site["fn"].size for name, site in trace.nodes.items()
            if site_is_subsample(site)}


def _plate_name(trace: poutine.Trace, train: dict) -> str | None:
    """The plate to subsample or split: the recipe's, else the model's only one."""
    plates = _plates(trace)
    name = train["subsample_plate"]
    return next(iter(plates)) if name is None and len(plates) == 1 else name


def _latent_in(trace: poutine.Trace, plate: str) -> bool:
    """Whether a latent site lives in the plate (the guide then has per-datum parameters
    spanning it)."""
    return any(site["type"] == "sample" and not site["is_observed"]
               and not site_is_subsample(site)
               and any(f.name == plate for f in site["cond_indep_stack"])
               for site in trace.nodes.values())
