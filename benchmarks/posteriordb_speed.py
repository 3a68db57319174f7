"""Steps per second on the posteriordb ports: vibench's compiled step against plain Pyro's
eager ``Trace_ELBO`` with the same model, data, guide and optimizer.

Per posterior and guide, in this process: vibench sets the shipped recipe up (with the guide
swapped in, ``loss: elbo``, ``train.compile: true``) and times ``Run.step``, the call its
training loop makes; plain Pyro builds the same autoguide class on the same model and data and
times ``SVI.step``. The two sides alternate, ``--repeats`` times each; the table gives medians
and the ratio. Set-up and compiling are left out (the compile time is its own column).

    python benchmarks/posteriordb_speed.py [--steps 300] [--repeats 3]
        [--guides auto_normal,auto_multivariate_normal] [--posteriors garch11,nes] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "packages" / "vibench-posteriordb" / "recipes"
POSTERIORS = ["kilpisjarvi", "earnings", "nes", "diamonds", "arma11", "garch11", "gauss_mix",
              "hmm_drive"]
AUTOGUIDES = {"auto_normal": "AutoNormal", "auto_diagonal_normal": "AutoDiagonalNormal",
              "auto_multivariate_normal": "AutoMultivariateNormal",
              "auto_iaf_normal": "AutoIAFNormal"}


def vibench_side(posterior: str, guide: str):
    """vibench's run of the shipped recipe, compiled: (one step, compile seconds)."""
    from workbench.config import recipe as recipes
    from workbench.plugins.registry import get_registry
    from workbench.train.runner import Run

    source = RECIPES / f"pdb_{posterior}.yaml"
    raw, overridden = recipes.apply_overrides(
        recipes.load(source), [f"guide={guide}", "loss=elbo", "train.compile=true",
                               "train.eval_every=0", "loggers=[]"])
    start = time.perf_counter()
    run = Run.setup(recipes.resolve(raw, get_registry(), str(source), overridden),
                    get_registry())
    return run, time.perf_counter() - start


def plain_side(run, guide: str):
    """Plain Pyro on the same model and data: its own guide, Adam and SVI (the guide finds
    vibench's parameters in the store by name and trains them too: it is only timed)."""
    import pyro.infer.autoguide as autoguides
    from pyro.infer import SVI, Trace_ELBO
    from pyro.optim import Adam

    made = getattr(autoguides, AUTOGUIDES[guide])(run.model)
    svi = SVI(run.model, made, Adam({"lr": run.recipe["optimizer"]["lr"]}), loss=Trace_ELBO())
    svi.step(**run.data)
    return lambda: svi.step(**run.data)


def per_second(step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--guides", default="auto_normal,auto_multivariate_normal")
    parser.add_argument("--posteriors", default=",".join(POSTERIORS))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    import pyro
    import torch

    torch.set_num_threads(args.threads)
    print(f"steps/s, medians of {args.repeats} alternated repeats of {args.steps} steps, "
          f"{args.threads} thread(s); torch {torch.__version__}, pyro {pyro.__version__}\n")
    print("| posterior | guide | plain Pyro steps/s | vibench compiled steps/s | ratio | "
          "compile s |\n|---|---|---|---|---|---|")
    for posterior in args.posteriors.split(","):
        for guide in args.guides.split(","):
            try:
                run, compile_s = vibench_side(posterior, guide)
            except Exception as exc:
                print(f"| {posterior} | {guide} | - | - | - | failed: {exc} |", flush=True)
                continue
            if run.compiled is None:
                print(f"| {posterior} | {guide} | - | - | - | not compiled |", flush=True)
                continue
            start = {name: value.detach().clone()
                     for name, value in pyro.get_param_store().named_parameters()}
            plain = plain_side(run, guide)  # the same parameters (names), its own optimizer
            rates: dict[str, list[float]] = {"plain": [], "vibench": []}
            try:
                for repeat in range(args.repeats):
                    for side in (("plain", "vibench") if repeat % 2 == 0
                                 else ("vibench", "plain")):
                        with torch.no_grad():  # each repeat from the same start, in place
                            for name, value in pyro.get_param_store().named_parameters():
                                value.copy_(start[name])
                        rates[side].append(per_second(plain if side == "plain" else run.step,
                                                      args.steps))
            except Exception as exc:
                print(f"| {posterior} | {guide} | - | - | - | failed: {exc} |", flush=True)
                continue
            p, v = (statistics.median(rates[k]) for k in ("plain", "vibench"))
            print(f"| {posterior} | {guide} | {p:.0f} | {v:.0f} | {v / p:.1f}x | "
                  f"{compile_s:.1f} |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
