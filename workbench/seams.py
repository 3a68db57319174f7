"""The private corners of torch and Pyro that vibench relies on, in one place: each is named
here with what it does, so a torch or Pyro upgrade that moves one breaks one module, and its
test (tests/test_seams.py) names the versions it was checked on."""

from __future__ import annotations

import contextlib
import sys
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


@contextlib.contextmanager
def no_dynamo_import() -> Iterator[None]:
    """Inside this block torch's optimizers are made, saved and loaded without importing
    torch._dynamo. While it is not imported nothing can be tracing, so its guard has nothing
    to do yet; this fills the guard's own cache (``fn.__dynamo_disable``) with the plain
    method until the block ends. A torch without that seam gets a plain block."""
    raw = [] if "torch._dynamo" in sys.modules else [
        getattr(getattr(torch.optim.Optimizer, name, None), "__wrapped__", None)
        for name in _DYNAMO_GUARDED]
    raw = [fn for fn in raw if callable(fn) and not hasattr(fn, "__dynamo_disable")]
    for fn in raw:
        fn.__dynamo_disable = fn
    try:
        yield
    finally:
        for fn in raw:
            if getattr(fn, "__dynamo_disable", None) is fn:
                del fn.__dynamo_disable
