"""The private corners of torch and Pyro that vibench relies on, in one place: each is named
here with what it does, so a torch or Pyro upgrade that moves one breaks one module, and its
test (tests/test_seams.py) names the versions it was checked on."""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def torch_optimizer(obj: Any) -> torch.optim.Optimizer:
    """The torch optimizer of one of a Pyro optim's per-parameter objects (``optim_objs``):
    the object itself, or the optimizer its learning-rate schedule wraps."""
    return getattr(obj, "optimizer", obj)


# torch.optim.Optimizer's methods that import torch._dynamo on their first call, only to
# keep dynamo from tracing into them (``torch._disable_dynamo``)
_DYNAMO_GUARDED = ("add_param_group", "state_dict", "load_state_dict")
_OPTIMIZER_MODULE = sys.modules[torch.optim.Optimizer.__module__]  # its global step hooks
# torch's Python references (torch._refs) that autograd's double backward runs (a Hessian's,
# of a multivariate normal's log density), behind the same guard: 0.5 s at the first Hessian
_DYNAMO_GUARDED_REFS = ("add",)


@contextlib.contextmanager
def no_dynamo_import() -> Iterator[None]:
    """Inside this block torch's optimizers are made, saved and loaded, and double backward
    passes run, without importing torch._dynamo. While it is not imported nothing can be
    tracing, so its guard has nothing to do yet; this fills the guard's own cache
    (``fn.__dynamo_disable``) with the plain function until the block ends. A torch without
    that seam gets a plain block."""
    refs = sys.modules.get("torch._refs")
    filled = _fill_guards(
        [getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
         for name in _DYNAMO_GUARDED] +
        [_below_guard(getattr(refs, name, None)) for name in _DYNAMO_GUARDED_REFS])
    try:
        yield
    finally:
        _empty_guards(filled)


def step_without_dynamo(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``. torch's own optimizers wrap their step in a guard
    (``_use_grad_for_differentiable``) that imports torch._dynamo at its first call, a second
    of an eager run, only to mark graph breaks for a tracer; with torch._dynamo not imported
    nothing is tracing, so this steps beneath that guard, under ``no_grad`` as the guard sets
    it, with the functional form it calls (``torch.optim.adam.adam``) unguarded as
    ``no_dynamo_import`` unguards the methods. Step hooks, a differentiable optimizer, or any
    other shape of step: the plain step."""
    guard = getattr(type(optimizer).step, "__wrapped__", None)  # under profile_hook_step
    plain = getattr(guard, "__wrapped__", None)
    if ("torch._dynamo" in sys.modules or plain is None
            or getattr(getattr(guard, "__code__", None), "co_name", "") != "_use_grad"
            or optimizer.defaults.get("differentiable") or _has_step_hooks(optimizer)):
        optimizer.step()
        return
    optimizer._opt_called = True  # what a learning-rate schedule's wrapper of step records
    filled = _fill_guards([_functional_form(type(optimizer))])
    try:
        with torch.no_grad():
            plain(optimizer)
    finally:
        _empty_guards(filled)


@functools.cache
def _functional_form(kind: type) -> Any:
    """The function an optimizer class of torch steps through (``torch.optim.adam.adam`` for
    ``torch.optim.Adam``), beneath its dynamo guard; None for any other class."""
    module = sys.modules.get(kind.__module__)
    return getattr(getattr(module, kind.__module__.rpartition(".")[2], None), "__wrapped__", None)


def _fill_guards(functions: list) -> list:
    """Fill each dynamo guard's cache with the plain function, while torch._dynamo is not
    imported; the functions filled, for ``_empty_guards``."""
    if "torch._dynamo" in sys.modules:
        return []
    filled = [fn for fn in functions if callable(fn) and not hasattr(fn, "__dynamo_disable")]
    for fn in filled:
        fn.__dynamo_disable = fn
    return filled


def _below_guard(fn: Any) -> Any:
    """The function that a dynamo guard (``torch._disable_dynamo``'s ``inner``) among
    ``fn``'s wrappers wraps, or None."""
    while fn is not None:
        code = getattr(fn, "__code__", None)
        if code is not None and code.co_name == "inner" and \
                code.co_filename.endswith("_compile.py"):
            return getattr(fn, "__wrapped__", None)
        fn = getattr(fn, "__wrapped__", None)
    return None


def _empty_guards(filled: list) -> None:
    for fn in filled:
        if getattr(fn, "__dynamo_disable", None) is fn:
            del fn.__dynamo_disable


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether anything asked to be called around this optimizer's steps."""
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or getattr(_OPTIMIZER_MODULE, "_global_optimizer_pre_hooks", None)
                or getattr(_OPTIMIZER_MODULE, "_global_optimizer_post_hooks", None))


@contextlib.contextmanager
def vector_isa_probed_beside() -> Iterator[None]:
    """Inductor's probe of the CPU's vector instruction sets, started in a thread at the
    block's start so that it runs beside the tracing: it builds a small library per set and
    loads each in a child process (seconds, mostly waiting on the compiler). Every pick of a
    set calls ``cpu_vec_isa.valid_vec_isa_list`` (cached), which in the block waits for the
    thread first."""
    from torch._inductor import codecache, cpu_vec_isa  # noqa: F401 (imported here, not in it)

    probe = cpu_vec_isa.valid_vec_isa_list

    def run() -> None:  # a failure here is met again, and said, by the compile that asks
        with contextlib.suppress(Exception):
            probe()

    thread = threading.Thread(target=run, name="vibench-vector-isa-probe", daemon=True)
    thread.start()

    def joined() -> list:
        thread.join()
        return probe()

    cpu_vec_isa.valid_vec_isa_list = joined
    try:
        yield
    finally:
        cpu_vec_isa.valid_vec_isa_list = probe


def broadcast_shapes_without_sympy() -> None:
    """``torch.broadcast_shapes`` (torch.distributions' transforms call it) imports sympy at
    its first call, for symbolic sizes (0.3-0.4 s of a run); for shapes of plain ints numpy
    gives the same answer, and anything else (symbolic sizes, a mismatch to report, a trace)
    goes to torch's own. For a process vibench owns: it replaces torch's function there."""
    import numpy as np

    original = torch.broadcast_shapes
    if getattr(original, "_vibench", False):
        return

    def broadcast_shapes(*shapes: Any) -> torch.Size:
        plain = [(shape,) if type(shape) is int else shape for shape in shapes]
        if torch.jit.is_tracing() or not all(
                isinstance(shape, (tuple, list)) and all(type(n) is int for n in shape)
                for shape in plain):
            return original(*shapes)
        try:
            return torch.Size(np.broadcast_shapes(*plain))
        except ValueError:
            return original(*shapes)  # torch's own error

    broadcast_shapes._vibench = True
    torch.broadcast_shapes = broadcast_shapes


class Counting(TorchDispatchMode):
    """Counts the torch operations run inside it (``ops``)."""

    ops = 0

    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        return False  # no dynamo runs here; guarding the mode would import it (a second)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))
