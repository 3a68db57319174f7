"""The child that compiles a run's step for later runs (``workbench.compile.background``).

``python -m workbench.train.background RECIPE KEY``: at nice 10, on one thread, it reads the
resolved recipe its parent wrote, checks it as ``vibench run`` would, sets the run up with
``train.compile: true`` (which traces, checks and packages the step into the cache) and exits,
holding the key's lock and the cache folder's (files its parent opened and locked) until
then. Where that leaves no package under ``KEY``, a note says why; after a second such note
(``package_cache.TRIES``) no later run starts another child for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path
from typing import Any


def main(argv: list[str]) -> int:
    """Compile the step of the recipe at ``argv[0]`` into the package ``argv[1]``."""
    with contextlib.suppress(OSError):
        os.nice(10)  # before torch is imported: the run beside it comes first
    from workbench.compile import background, package_cache

    path, key = Path(argv[0]), argv[1]
    if not background.take_turn():
        path.unlink(missing_ok=True)
        return 1
    began = time.perf_counter()
    try:
        try:
            resolved, registry = _resolved(path)
        except Exception as exc:  # not a recipe another process can set up: for good
            return background.child_failed(key, exc, final=True)
        try:
            _compile(resolved, registry)
            if package_cache.state(key) != "packaged":
                why = package_cache.failures(key)
                raise RuntimeError(f"AOTInductor could not package the step ({why[-1]})"
                                   if why else "the step set up here is not the one the run "
                                   "asked for (another package key)")
        except Exception as exc:  # perhaps the machine's passing state: a later run retries
            return background.child_failed(key, exc)
    finally:
        path.unlink(missing_ok=True)
    print(f"packaged the step in {time.perf_counter() - began:.1f} s: "
          f"{package_cache.file(key, '.pt2')}", flush=True)
    return 0


def _resolved(path: Path) -> tuple[dict, Any]:
    """The recipe at ``path`` read and checked as ``vibench run`` would, set to compile, and
    the registry of plugins it names."""
    from workbench.config import recipe as recipes
    from workbench.plugins.registry import get_registry
    from workbench.train import stepsize

    registry = get_registry()
    resolved = recipes.resolve(recipes.load(path), registry, str(path))
    resolved["train"]["compile"] = True
    if stepsize.wanted(resolved):  # the step size is an input of the step, not in its key
        resolved = stepsize.placeholder(resolved)
    return resolved, registry


def _compile(resolved: dict, registry: Any) -> None:
    """Set the run up as ``vibench run`` would, its step compiled (and packaged)."""
    import torch

    from workbench.train.runner import Run

    torch.set_num_threads(1)
    Run.setup(resolved, registry)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
