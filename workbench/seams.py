"""The private corners of torch and Pyro that vibench relies on, in one place: each is named
here with what it does, so a torch or Pyro upgrade that moves one breaks one module, and its
test (tests/test_seams.py) names the versions it was checked on."""

from __future__ import annotations

import contextlib
import sys
import types
from collections.abc import Iterator
from typing import Any

import torch


def torch_optimizer(obj: Any) -> torch.optim.Optimizer:
    """The torch optimizer of one of a Pyro optim's per-parameter objects (``optim_objs``):
    the object itself, or the optimizer its learning-rate schedule wraps."""
    return getattr(obj, "optimizer", obj)


# torch.optim.Optimizer's methods that import torch._dynamo on their first call, only to
# keep dynamo from tracing into them (``torch._disable_dynamo``)
_DYNAMO_GUARDED = ("add_param_group", "state_dict", "load_state_dict")


def _functional_optimizers() -> list:
    """The functional forms that torch's optimizers step through (``torch.optim.adam.adam``,
    ``torch.optim.sgd.sgd``, ...), unwrapped: each is guarded as the methods above are."""
    found = []
    for name, module in vars(torch.optim).items():
        if isinstance(module, types.ModuleType):
            found.append(getattr(getattr(module, name, None), "__wrapped__", None))
    return found


@contextlib.contextmanager
def no_dynamo_import() -> Iterator[None]:
    """Inside this block torch's optimizers are made, saved, loaded and stepped (with
    ``step_without_dynamo``) without importing torch._dynamo. While it is not imported
    nothing can be tracing, so its guard has nothing to do yet; this fills the guard's own
    cache (``fn.__dynamo_disable``) with the plain function until the block ends. A torch
    without that seam gets a plain block."""
    raw = [] if "torch._dynamo" in sys.modules else [
        getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
        for name in _DYNAMO_GUARDED] + _functional_optimizers()
    raw = [fn for fn in raw if callable(fn) and not hasattr(fn, "__dynamo_disable")]
    for fn in raw:
        fn.__dynamo_disable = fn
    try:
        yield
    finally:
        for fn in raw:
            if getattr(fn, "__dynamo_disable", None) is fn:
                del fn.__dynamo_disable


def step_without_dynamo(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``. torch's own optimizers wrap their step in a guard
    (``_use_grad_for_differentiable``) that imports torch._dynamo at its first call, a second
    of an eager run, only to mark graph breaks for a tracer; with torch._dynamo not imported
    nothing is tracing, so this steps beneath that guard, under ``no_grad`` as the guard sets
    it. Step hooks, a differentiable optimizer, or any other shape of step: the plain step."""
    hooked = type(optimizer).step
    guard = getattr(hooked, "__wrapped__", None)  # beneath Optimizer.profile_hook_step
    plain = getattr(guard, "__wrapped__", None)
    if ("torch._dynamo" in sys.modules or plain is None
            or getattr(getattr(guard, "__code__", None), "co_name", "") != "_use_grad"
            or optimizer.defaults.get("differentiable")
            or _has_step_hooks(optimizer)):
        optimizer.step()
        return
    optimizer._opt_called = True  # what a learning-rate schedule's wrapper of step records
    with torch.no_grad(), no_dynamo_import():
        plain(optimizer)


def _has_step_hooks(optimizer: torch.optim.Optimizer) -> bool:
    """Whether anything asked to be called around this optimizer's steps."""
    from torch.optim import optimizer as module
    return bool(getattr(optimizer, "_optimizer_step_pre_hooks", None)
                or getattr(optimizer, "_optimizer_step_post_hooks", None)
                or getattr(module, "_global_optimizer_pre_hooks", None)
                or getattr(module, "_global_optimizer_post_hooks", None))
