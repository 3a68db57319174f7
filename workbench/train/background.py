"""The child that compiles a run's step for later runs (``workbench.compile.background``).

``python -m workbench.train.background RECIPE KEY``: at nice 10, on one thread, it reads the
resolved recipe its parent wrote, checks it as ``vibench run`` would, sets the run up with
``train.compile: true`` (which traces, checks and packages the step into the cache) and exits,
holding the key's lock and the cache folder's (files its parent opened and locked) until
then. Where that leaves no package under ``KEY``, a note says why, so no later run starts
another child for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path


def main(argv: list[str]) -> int:
    """Compile the step of the recipe at ``argv[0]`` into the package ``argv[1]``."""
    with contextlib.suppress(OSError):
        os.nice(10)  # before torch is imported: the run beside it comes first
    from workbench.compile import background, package_cache
    from workbench.errors import one_line

    path, key = Path(argv[0]), argv[1]
    began = time.perf_counter()
    try:
        _compile(path)
        state = package_cache.state(key)
        if state != "packaged":
            raise RuntimeError("AOTInductor could not package the step" if state == "failed"
                               else "the step set up here is not the one the run asked for "
                               "(another package key)")
    except Exception as exc:  # noted, so no later run tries again (not so if interrupted)
        why = one_line(exc)
        print(f"failed: {why}", flush=True)
        with contextlib.suppress(Exception):
            background.failed(key, why)
        return 1
    finally:
        path.unlink(missing_ok=True)
    print(f"packaged the step in {time.perf_counter() - began:.1f} s: "
          f"{package_cache.file(key, '.pt2')}", flush=True)
    return 0


def _compile(path: Path) -> None:
    """Set the recipe at ``path`` up as ``vibench run`` would, its step compiled."""
    import torch

    from workbench.config import recipe as recipes
    from workbench.plugins.registry import get_registry
    from workbench.train import stepsize
    from workbench.train.runner import Run

    torch.set_num_threads(1)
    registry = get_registry()
    resolved = recipes.resolve(recipes.load(path), registry, str(path))
    resolved["train"]["compile"] = True
    if stepsize.wanted(resolved):  # the step size is an input of the step, not in its key
        resolved = stepsize.placeholder(resolved)
    Run.setup(resolved, registry)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
