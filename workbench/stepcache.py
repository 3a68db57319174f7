"""Compiled CPU steps kept as AOTInductor packages, in a folder of inductor's cache directory.

A later run of the same step on this machine and torch loads its package (a shared library)
in milliseconds, without importing inductor's compiler (0.9 s) or looking the graph up in
inductor's own cache (0.3 s). The key hashes the traced step's code and constants, its
inputs' shapes, strides and dtypes, torch's version and this CPU, so a changed model, guide,
loss, optimizer setting or data layout is a different package. Only vibench writes here, as
only inductor writes the rest of that directory, whose compiled code inductor loads the same
way."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import operator
import os
import platform
from pathlib import Path
from typing import Callable, Iterator

import torch

FORMAT = "1"  # part of every key: bump it when the packaging or its inductor settings change


def load(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable | None:
    """The packaged step for ``graph`` on ``inputs`` (a callable on the list of inputs,
    returning the list of outputs), or None where none is cached or it cannot be loaded."""
    path = _path(graph, inputs)
    return _open(path) if path.is_file() else None


def build(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Callable | None:
    """Compile ``graph`` with AOTInductor (under the caller's inductor settings) into the
    cache and load it; None where it cannot be packaged (the caller compiles otherwise)."""
    from torch._inductor import aoti_compile_and_package

    path = _path(graph, inputs)
    failed = path.with_suffix(".failed")  # why it could not be packaged, in one line
    if path.is_file() or failed.is_file():  # neither is tried again in every run
        return None
    partial = path.with_name(f".{path.stem}-{os.getpid()}.pt2")  # renamed when whole
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        program = torch.export.export(graph, tuple(inputs), strict=False)
        with _quiet("torch._inductor"):  # its notes on ops it runs through its fallback
            aoti_compile_and_package(program, package_path=str(partial))
        os.replace(partial, path)
    except Exception as exc:
        with contextlib.suppress(OSError):
            failed.write_text(f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}\n")
        return None
    finally:  # an interrupted or failed build leaves nothing half-written
        partial.unlink(missing_ok=True)
    return _open(path)


def _open(path: Path) -> Callable | None:
    try:  # torch's own loader, as torch._inductor.package.load_package calls it (which
        # spends a second in Python around these 2 ms)
        return torch._C._aoti.AOTIModelPackageLoader(str(path), "model", False, 1, -1).run
    except Exception:  # damaged, say: the caller compiles as before, leaving it be
        return None


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _path(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> Path:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "vibench-steps" / f"{_key(graph, inputs)}.pt2"


def _key(graph: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for part in (FORMAT, torch.__version__, platform.machine(),
                 torch.backends.cpu.get_cpu_capability(), _cpu_flags(), graph.code):
        digest.update(part.encode() + b"\0")
    for node in graph.graph.nodes:
        if node.op == "get_attr":
            digest.update(_value_bytes(operator.attrgetter(node.target)(graph)))
    for tensor in inputs:
        digest.update(repr((tuple(tensor.shape), tensor.stride(), tensor.dtype,
                            tensor.device.type)).encode())
    return digest.hexdigest()[:40]


def _value_bytes(value: object) -> bytes:
    """A graph constant as bytes: a tensor's dtype, shape and contents; anything else's repr."""
    if not torch.is_tensor(value):
        return repr(value).encode()
    flat = value.detach().to("cpu").contiguous().reshape(-1)
    return repr((value.dtype, tuple(value.shape))).encode() + \
        flat.view(torch.uint8).numpy().tobytes()


def _cpu_flags() -> str:
    """The instruction sets the CPU reports (Linux), which the compiled kernels may use."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor()
