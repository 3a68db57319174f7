"""How often the hmc stage's verdict on its chains' nested R-hat flags chains that have
converged, and chains whose groups have not: 1.01 alone beside the limit that follows each
coordinate's ESS (``thresholds.nested_rhat_limit``, as the stage asks it: ``stages._worst``).

The chains are AR(1) with correlation ``--rho`` (stationary from their first draw), 32 in 4
groups as the stage runs them, ``--coordinates`` of them each; for the groups that have not
converged, one coordinate's groups sit ``b`` posterior sds apart (their means' sd over the
groups is b). Each cell is the share of ``--sets`` independent sets flagged.

    OMP_NUM_THREADS=1 python benchmarks/nested_rhat.py [--draws 50,100,200] [--rho 0.5,0.7]
        [--apart 0,0.1,0.15,0.2,0.3] [--sets 100] [--coordinates 40]
"""

from __future__ import annotations

import argparse
import math

import torch

from vibench_plugins.stages import _worst
from workbench.report.draws import chain_diagnostics
from workbench.report.thresholds import RHAT_AGREE, chains_distrusted

CHAINS, GROUPS = 32, 4


def ar1(length: int, coordinates: int, rho: float, generator: torch.Generator) -> torch.Tensor:
    """CHAINS stationary AR(1) chains of unit variance, ``(CHAINS, length, coordinates)``."""
    x = torch.empty(CHAINS, length, coordinates, dtype=torch.float64)
    x[:, 0] = torch.randn(CHAINS, coordinates, generator=generator, dtype=torch.float64)
    noise = torch.randn(CHAINS, length, coordinates, generator=generator,
                        dtype=torch.float64) * math.sqrt(1 - rho ** 2)
    for t in range(1, length):
        x[:, t] = rho * x[:, t - 1] + noise[:, t]
    return x


def flagged(chains: torch.Tensor) -> tuple[bool, bool]:
    """Whether 1.01 alone, and the stage's verdict by the ESS's limit (its ESS bound left
    out), flag any coordinate."""
    found = chain_diagnostics(chains, GROUPS)
    rhat, limit, at, _, _ = _worst(found, [str(i) for i in range(chains.shape[-1])], GROUPS)
    return (bool((found["nested_rhat"] > RHAT_AGREE).any()),
            bool(chains_distrusted(rhat, limit, at, math.inf, "", 0)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", default="50,100,200")
    parser.add_argument("--rho", default="0.5,0.7")
    parser.add_argument("--apart", default="0,0.1,0.15,0.2,0.3")
    parser.add_argument("--sets", type=int, default=100)
    parser.add_argument("--coordinates", type=int, default=40)
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    offsets = torch.linspace(-1, 1, GROUPS, dtype=torch.float64)
    offsets = (offsets / offsets.std(unbiased=False)).repeat_interleave(CHAINS // GROUPS)
    print(f"{CHAINS} chains in {GROUPS} groups, {args.coordinates} coordinates, "
          f"{args.sets} sets a row: the share flagged")
    print("| draws a chain | AR(1) rho | groups apart (sd) | median ESS | 1.01 alone | "
          "the ESS's limit |")
    print("|---:|---:|---:|---:|---:|---:|")
    for length in (int(n) for n in args.draws.split(",")):
        for rho in (float(r) for r in args.rho.split(",")):
            for apart in (float(b) for b in args.apart.split(",")):
                alone = limit = 0
                esses = []
                for _ in range(args.sets):
                    chains = ar1(length, args.coordinates, rho, generator)
                    chains[:, :, 0] += apart * offsets[:, None]
                    one, other = flagged(chains)
                    alone, limit = alone + one, limit + other
                    esses.append(float(chain_diagnostics(chains[:, :, 1:2], GROUPS)
                                       ["ess_bulk"][0]))
                ess = sorted(esses)[len(esses) // 2]
                print(f"| {length} | {rho:g} | {apart:g} | {ess:.0f} | "
                      f"{alone / args.sets:.2f} | {limit / args.sets:.2f} |", flush=True)


if __name__ == "__main__":
    main()
