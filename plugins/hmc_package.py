"""The child that compiles the hmc stage's gradients for later runs
(``workbench.compile.background``, as a training step's child does).

``python -m vibench_plugins.hmc_package FIT_DIR CHAINS KEY``: at nice 10, on one thread, it
rebuilds the pipeline's fit from its run directory as the pipeline reads its fits back (the
recipe and checkpoint vibench wrote, read as ``vibench run --resume`` reads them, never a
pickle), sets up the chains' potential as the stage does, and packages its gradients
(``stages.gradient_function``) for ``CHAINS`` chains under ``KEY``, which it must record to:
a fit rebuilt to another function packages nothing. A failure is noted; after a second
(``package_cache.TRIES``) no later run starts another child for ``KEY``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

CHILD = "vibench_plugins.hmc_package"


def arguments(fit_dir: Path, chains: int, key: str) -> list[str]:
    """The child's ``python -m`` arguments."""
    return [CHILD, str(Path(fit_dir).resolve()), str(chains), key]


def main(argv: list[str]) -> int:
    """Package the gradients of the fit at ``argv[0]`` for ``argv[1]`` chains as ``argv[2]``."""
    with contextlib.suppress(OSError):
        os.nice(10)  # before torch is imported: the run beside it comes first
    import pyro
    import torch

    from vibench_plugins.stages import chain_potentials, gradient_function
    from workbench.auto.pipeline import load_fit
    from workbench.compile import background, package_cache, traced
    from workbench.device import run_context
    from workbench.plugins.registry import get_registry
    from workbench.report.gaussians import fitted_gaussian

    fit_dir, chains, key = Path(argv[0]), int(argv[1]), argv[2]
    if not background.take_turn():
        return 1
    began = time.perf_counter()
    torch.set_num_threads(1)
    try:
        run = load_fit(fit_dir, get_registry())
        with run_context(run.device, run.dtype), torch.no_grad(), \
                pyro.validation_enabled(False):
            loc = fitted_gaussian(run.guide, diagonal=True)[0].to(torch.get_default_dtype())
            potentials, _ = chain_potentials(run, loc)
            traced.package(*gradient_function(potentials, loc, chains), key)
    except Exception as exc:  # perhaps the machine's passing state: a later run retries
        return background.child_failed(key, exc)
    print(f"packaged the chains' gradients in {time.perf_counter() - began:.1f} s: "
          f"{package_cache.file(key, '.pt2')}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
