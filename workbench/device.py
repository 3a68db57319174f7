"""A run's device, dtype and random streams, the one place that knows them: which device a
recipe's ``device`` means, the context that makes new tensors there and in the run's dtype (so
plugins never name either), and which generators a run seeds and forks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from workbench.config.recipe import DTYPE_NAMES
from workbench.distributed import World
from workbench.errors import UsageError

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def pick_device(name: str, world: World = World()) -> torch.device:
    """The torch device for a recipe's ``device`` value; ``auto`` takes CUDA when present.
    Under torchrun each process takes the GPU of its local rank."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if world.distributed and device.type == "cuda":
        if device.index is not None:
            raise UsageError(f"device {name!r}: under torchrun each process takes the GPU of "
                             "its local rank; set device: cuda")
        device = torch.device("cuda", world.local_rank)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else "no GPU found"
            raise UsageError(
                f"device {name!r}: CUDA is not available here (torch {torch.__version__}, "
                f"{build}); use --device cpu"
            )
        if (device.index or 0) >= torch.cuda.device_count():
            raise UsageError(f"device {name!r}: there are {torch.cuda.device_count()} GPUs")
        if device.index is None:  # the one used, as summary.json records it: cuda:0, say
            device = torch.device("cuda", torch.cuda.current_device())
    return device


@contextlib.contextmanager
def run_context(device: torch.device, dtype: torch.dtype = torch.float32) -> Iterator[None]:
    """Make new tensors on the run's device and in its dtype, so plugins never name either."""
    with default_dtype(dtype):
        if device.type == "cpu":
            yield
        else:
            with device:
                yield


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Make new floating-point tensors in ``dtype`` while inside (torch's process-wide
    default, put back after)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def seed_device(device: torch.device, seed: int) -> None:
    """Seed the generators a run on ``device`` draws from: on the CPU only the CPU's, which
    draws what ``torch.manual_seed`` would without its 0.1 ms of queueing seeds for GPUs
    that the run never initialises."""
    if device.type == "cpu":
        torch.default_generator.manual_seed(seed)
    else:
        torch.manual_seed(seed)


def rng_devices(device: torch.device) -> list[int]:
    """The GPUs whose generators ``torch.random.fork_rng`` must fork for a run on ``device``."""
    return [device.index or 0] if device.type == "cuda" else []
