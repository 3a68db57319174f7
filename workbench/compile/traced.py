"""A function of tensors traced once into a graph of torch operations and replayed without
Python: compiled_step's tracing (Pyro's bookkeeping run once; a value read in Python that
depends on the inputs refuses), for callers that replay a function many times outside a
training step (the hmc stage's gradients: plugins/hmc.py). On the CPU the graph is also
compiled into a package (``package_cache``) by a child for later runs, as a training step is:
``packaged`` finds it by a record of the function, with no tracing, and ``package`` builds
it."""

from __future__ import annotations

import hashlib
import os
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from workbench.compile import package_cache

TAG = "traced function"  # part of each package's key: not a training step's


def traced(fn: Callable, inputs: list[torch.Tensor]) -> tuple[Callable | None, str]:
    """``fn`` as a graph traced at ``inputs``, replayed with tensors of the same shapes; None
    and why where it cannot be traced (data-dependent control flow, an operation the tracer
    refuses)."""
    from workbench.compile.compiled_step import CannotCompile, _trace, _traceable

    with _traceable():
        try:
            # make_fx reads the signature: a bound method or partial would count wrongly
            return _trace(lambda *values: fn(*values), inputs), ""
        except CannotCompile as exc:
            return None, str(exc)


def packaged(fn: Callable, inputs: list[torch.Tensor]) -> tuple[Callable | None, str | None]:
    """``fn`` from the package an earlier run built of it, for inputs laid out as ``inputs``
    (a callable on those tensors returning a list), or None; and the key to build it under
    (None where there can be no package: not on the CPU, or ``fn`` runs different operations
    on two random streams)."""
    if any(t.device.type != "cpu" for t in inputs):
        return None, None
    recorded = package_cache.steady_record(fn, inputs)
    if recorded is None:
        return None, None
    key = package_cache.key(recorded, inputs, TAG, _source())
    run = package_cache.load(key)
    return (None if run is None else _quiet(run)), key


def _quiet(run: Callable) -> Callable:
    """A package's function whose failures raise without a word on stderr: AOTInductor's
    runtime prints a line of C++ for each operation that fails in it (a Cholesky factor of a
    matrix that is no longer positive definite, which the caller handles), so fd 2 points to
    the null device for each call."""
    null = os.open(os.devnull, os.O_WRONLY)

    def call(*values: torch.Tensor) -> list[torch.Tensor]:
        saved = os.dup(2)
        try:  # a stop signal between these lines still finds fd 2 put back
            os.dup2(null, 2)
            return run(list(values))
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    weakref.finalize(call, os.close, null)
    return call


def package(fn: Callable, inputs: list[torch.Tensor], key: str) -> None:
    """Trace ``fn`` at ``inputs`` and package it under ``key`` (a child's work, for later
    runs); a RuntimeError says why not: ``fn`` is not the function the key was made for, it
    cannot be traced, or AOTInductor failed."""
    from workbench.compile.compiled_step import _inductor_settings

    _, made = packaged(fn, inputs)
    if made != key:
        raise RuntimeError("the function set up here is not the one the run asked for "
                           "(another package key)")
    graph, why = traced(fn, inputs)
    if graph is None:
        raise RuntimeError(why)
    with _inductor_settings(cpu=True), torch.no_grad():
        if package_cache.build(graph, inputs, key) is None:
            why = package_cache.failures(key)
            raise RuntimeError(f"AOTInductor could not package it ({why[-1]})" if why else
                               "AOTInductor could not package it")


def _source() -> str:
    """The code that traces and compiles: a change to it makes new packages."""
    from workbench.compile.compiled_step import _SOURCE

    return hashlib.sha256((_SOURCE + Path(__file__).read_text()).encode()).hexdigest()
