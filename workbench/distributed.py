"""Data-parallel training under ``torchrun``: one posterior, fitted by several processes.
Torch is imported inside the functions, so the CLI can ask ``detect`` without it.

torchrun starts one process per device and tells each its place by environment variables
(``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``). Each process (a rank) computes the loss on its shard
of the model's data plate, scaled to the whole data; the ranks' losses and gradients are
averaged, each weighted by its share of the plate, with one ``all_reduce`` a step, so every
rank takes the same optimizer step. Each rank draws from its own random stream (more particles
for the global latent sites; checkpoints hold every rank's). Rank 0 alone writes the run
directory. A collective that waits longer than ``VIBENCH_DIST_TIMEOUT`` seconds (default 300)
fails, so a rank that dies or hangs stops the others with one line instead of a hang.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from workbench import environment
from workbench.errors import PeerLost, UsageError, one_line

if TYPE_CHECKING:
    import torch

TIMEOUT_ENV = "VIBENCH_DIST_TIMEOUT"
DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for the other ranks


@dataclass(frozen=True)
class World:
    """This process's place among the processes that train one run together."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that writes the run directory and prints."""
        return self.rank == 0


_world = World()


def detect(env: Mapping[str, str] = os.environ) -> World:
    """The world torchrun describes in the environment; one process without it."""
    try:
        size = int(env.get("WORLD_SIZE", "1") or 1)
        if size <= 1:
            return World()
        found = World(int(env["RANK"]), size, int(env.get("LOCAL_RANK", "0") or 0))
    except (KeyError, ValueError) as exc:
        raise UsageError(f"WORLD_SIZE is {env.get('WORLD_SIZE')!r} but RANK or LOCAL_RANK is "
                         f"missing or not a number ({one_line(exc)}); start vibench with "
                         "torchrun") from None
    if not 0 <= found.rank < size or found.local_rank < 0:
        raise UsageError(f"RANK is {found.rank} and LOCAL_RANK {found.local_rank}, but "
                         f"WORLD_SIZE is {size}: RANK must be 0 to {size - 1}; start vibench "
                         "with torchrun")
    return found


def timeout() -> float:
    """Seconds a collective waits for the other ranks before it fails (VIBENCH_DIST_TIMEOUT)."""
    return environment.seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT)


def world() -> World:
    """This process's world, as ``start`` set it up (one process before that)."""
    return _world


def start() -> World:
    """Join the other ranks (a process group: gloo for CPU tensors, NCCL for CUDA ones) when
    torchrun started this process; ranks other than 0 then show no warnings."""
    global _world
    found = detect()
    if not found.distributed:
        return found
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(found.local_rank % torch.cuda.device_count())
            backend = "cpu:gloo,cuda:nccl"
        try:
            _interruptible(dist.init_process_group, backend,
                           timeout=timedelta(seconds=timeout()))
        except Exception as exc:
            raise PeerLost(f"rank {found.rank}: cannot join the other processes of this "
                           f"torchrun run: {one_line(exc)}") from None
    if not found.leader:
        warnings.simplefilter("ignore")
    _world = found
    return found


def _interruptible(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)``, a call that waits on other processes in C++ (which runs no
    signal handler until it returns), in a daemon thread, so that a stop signal stops this
    process at once rather than after the wait's timeout (a rank 0 that never answers)."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=target, name="vibench joining the ranks", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)  # the main thread runs the stop signals' handlers here
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")


def finish(together: bool = False) -> None:
    """Leave the process group, if this process joined one. ``together``: first wait for the
    other ranks, so none exits while another still talks to it (gloo aborts a process that
    tears its group down under a live peer)."""
    global _world
    if _world.distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            if together:
                try:
                    _collective("finishing", dist.barrier)
                except PeerLost:
                    pass
            dist.destroy_process_group()
    _world = World()


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's own random stream after set-up: different noise, so more particles."""
    return (seed * 1_000_003 + 7919 * (rank + 1)) % 2**32


def _collective(what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a collective; a rank that died or hung becomes a PeerLost with one line."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        raise PeerLost(f"rank {_world.rank} lost contact with the other processes while "
                       f"{what} (one of them stopped or hung; {TIMEOUT_ENV}={timeout():g} s): "
                       f"{one_line(exc)}") from None


def reduce_step(loss: Any, params: Iterable[torch.Tensor], weight: float, stop: bool
                ) -> tuple[float, set[torch.Tensor], bool]:
    """One step's loss and gradients, summed over the ranks with each rank's ``weight`` (its
    share of the data), in one all_reduce; returns the loss, the parameters some rank touched
    (each now holding the averaged gradient) and whether any rank was asked to stop."""
    import pyro
    import torch
    import torch.distributed as dist

    named = sorted(pyro.get_param_store().named_parameters())
    touched = {id(p) for p in params}
    tensors = [p for _, p in named]
    device = tensors[0].device if tensors else torch.device("cpu")
    dtype = tensors[0].dtype if tensors else torch.get_default_dtype()
    header = torch.tensor([float(loss) * weight, float(stop),
                           *[float(id(p) in touched) for p in tensors]],
                          dtype=dtype, device=device)
    grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) * weight
             for p in tensors]
    buffer = torch.cat([header, *grads])
    _collective("averaging the gradients", dist.all_reduce, buffer)
    stepped: set[torch.Tensor] = set()
    offset = len(header)
    for i, p in enumerate(tensors):
        part = buffer[offset:offset + p.numel()].view_as(p)
        offset += p.numel()
        if buffer[2 + i] > 0:
            if p.grad is None:
                p.grad = part.clone()
            else:
                p.grad.copy_(part)
            stepped.add(p)
    return buffer[0].item(), stepped, bool(buffer[1] > 0)


def weighted_sum(value: float, weight: float, device: torch.device) -> float:
    """A per-rank estimate combined over the ranks, each weighted by its share of the data."""
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([value * weight], dtype=torch.float64, device=device)
    _collective("averaging the evaluation loss", dist.all_reduce, tensor)
    return tensor.item()


def broadcast_params() -> None:
    """Rank 0's parameters on every rank, so all start from the same point."""
    import pyro
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        for _, param in sorted(pyro.get_param_store().named_parameters()):
            _collective("sharing the initial parameters", dist.broadcast, param.data, src=0)


def gather(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (plain values and tensors), on rank 0; None on the others."""
    import torch.distributed as dist

    found: list[Any] | None = [None] * _world.size if _world.leader else None
    _collective("saving a checkpoint", dist.gather_object, value, found, dst=0)
    return found
