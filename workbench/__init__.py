"""vibench: a plugin-based workbench for stochastic variational inference on Pyro.

A plugin needs only ``from workbench import hookimpl``. Nothing here imports torch, so
the CLI starts fast. ``from workbench import fit, load`` (the Python API, ``workbench.api``)
imports it when first asked for.
"""

from typing import Any

from workbench.hookspecs import hookimpl

__all__ = ["fit", "hookimpl", "load"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``fit`` and ``load``, from ``workbench.api``, imported on first use."""
    if name in ("fit", "load"):
        from workbench import api

        return getattr(api, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
