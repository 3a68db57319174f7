"""vibench: a plugin-based workbench for stochastic variational inference on Pyro.

A plugin needs only ``from workbench import hookimpl``. Nothing here imports torch, so
the CLI starts fast.
"""

from workbench.hookspecs import hookimpl

__all__ = ["hookimpl"]
__version__ = "0.1.0"
