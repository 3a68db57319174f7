"""The automatic pipeline's hmc stage alone (plugins/hmc.py), from a finished pipeline run:
its sampler started from the fit the run's chains started from (``diagnostics.sampler.from``,
or ``--fit``), with the gradients from their package (compiled here first, its seconds
printed, where the cache holds none), replayed from a traced graph, and by the model's own
runs (``--ways``), one after the other in this process, with the stage's settings. Per way: the
seconds, the batched gradients and their cost, the nested R-hat, ESS and divergences, and
the largest z and smallest/largest sd ratio against the model's reference posterior where it
has one (the run's summary.json ``reference``'s parameters, compared by name where a latent
site's draws are its unconstrained coordinate's exp or itself).

    OMP_NUM_THREADS=1 python benchmarks/hmc_stage.py RUN_DIR [--fit gaussian-1]
        [--ways packaged,replayed,eager] [--warmup 100[,150]] [--draws 50] [--rounds 8]
        [--seeds 0[,1,2,3]]

Several warm-up lengths or seeds give a row for each (way, warm-up, seed), in that order.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--fit", default=None)
    parser.add_argument("--ways", default="packaged,replayed,eager")
    parser.add_argument("--warmup", default="100", help="comma-separated")
    parser.add_argument("--draws", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--chains", type=int, default=32)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--seeds", default="0", help="comma-separated")
    args = parser.parse_args()

    import pyro
    import torch

    from vibench_plugins import hmc, laplace
    from vibench_plugins.stages import _worst, chain_potentials, enough
    from workbench import service
    from workbench.device import run_context
    from workbench.plugins.registry import get_registry
    from workbench.report.draws import chain_diagnostics
    from workbench.report.gaussians import fitted_gaussian

    summary = json.loads((args.run_dir / "summary.json").read_text())
    label = args.fit or summary["diagnostics"]["sampler"]["from"]
    run = service.load(args.run_dir / "fits" / label, get_registry(), trust_code=True)
    reference = (summary.get("reference") or {}).get("params") or {}
    print(f"{args.run_dir.name}: HMC from {label}, {args.chains} chains in {args.groups} "
          f"groups, {args.draws} draws a round, {args.rounds} rounds")
    print("| way | warm-up | seed | seconds | gradients | ms a gradient | leapfrog steps | "
          "draws a chain | nested R-hat (limit) | ESS | divergent | max z | r |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for way, warmup, seed in itertools.product(
            args.ways.split(","), [int(w) for w in args.warmup.split(",")],
            [int(s) for s in args.seeds.split(",")]):
        with run_context(run.device, run.dtype), torch.no_grad(), \
                pyro.validation_enabled(False):
            loc, scale = (t.detach() for t in fitted_gaussian(run.guide, whole=True))
            potentials, labels = chain_potentials(run, loc)  # the stage's own
            if way == "eager":
                potentials.rowwise = None  # not traced: the model's own runs
            packaged = _packaged(potentials, loc, args.chains) if way == "packaged" else None

            began = time.perf_counter()
            found = hmc.sample(potentials, loc, scale, args.chains, warmup, args.draws,
                               seed=seed, rounds=args.rounds,
                               enough=functools.partial(enough, groups=args.groups,
                                                        labels=labels, draws=args.draws),
                               groups=args.groups, packaged=packaged)
            seconds = time.perf_counter() - began
        rhat, limit, _, ess, _ = _worst(chain_diagnostics(found.points, args.groups), labels,
                                        args.groups)
        zs, rs = _against(found.points.flatten(0, 1), laplace.layout(run.guide), reference)
        shown = (f"{max(zs):.2f} | {min(rs):.2f}-{max(rs):.2f}" if zs else "- | -")
        print(f"| {way} ({found.graph}) | {warmup} | {seed} | {seconds:.1f} | "
              f"{found.gradients} | {1e3 * seconds / found.gradients:.2f} | "
              f"{found.leapfrog:.1f} | {found.points.shape[1]} | {rhat:.3f} ({limit:.3f}) | "
              f"{ess:.0f} | {found.divergences} | {shown} |")


def _packaged(potentials, loc, chains: int):
    """The chains' gradients from their package, built here first where none is cached."""
    from vibench_plugins.stages import gradient_function
    from workbench.compile import traced

    function, points = gradient_function(potentials, loc, chains)
    found, key = traced.packaged(function, points)
    if found is None and key is not None:
        began = time.perf_counter()
        traced.package(function, points, key)
        print(f"(packaged the gradients in {time.perf_counter() - began:.1f} s)")
        found, _ = traced.packaged(function, points)
    return found


def _against(points, sites, reference: dict) -> tuple[list[float], list[float]]:
    """z and r of each scalar latent site the reference names, its draws constrained."""
    zs, rs = [], []
    for site in sites:
        if site.stop - site.start != 1 or site.name not in reference:
            continue
        draws = site.transform(points[:, site.start])
        ref = reference[site.name]
        zs.append(abs(float(draws.mean()) - ref["ref_mean"]) / ref["ref_sd"])
        rs.append(float(draws.std()) / ref["ref_sd"])
    return zs, rs


if __name__ == "__main__":
    main()
