"""A function of tensors traced once into a graph of torch operations and replayed without
Python: compiled_step's tracing (Pyro's bookkeeping run once; a value read in Python that
depends on the inputs refuses), for callers that replay a function many times outside a
training step (the hmc stage's gradients: plugins/hmc.py)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def traced(fn: Callable, inputs: list[torch.Tensor]) -> tuple[Callable | None, str]:
    """``fn`` as a graph traced at ``inputs``, replayed with tensors of the same shapes; None
    and why where it cannot be traced (data-dependent control flow, an operation the tracer
    refuses)."""
    from workbench.compile.compiled_step import CannotCompile, _trace, _traceable

    with _traceable():
        try:
            return _trace(fn, inputs), ""
        except CannotCompile as exc:
            return None, str(exc)
