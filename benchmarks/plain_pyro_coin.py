"""The coin experiment of recipes/coin.yaml, written by hand in plain Pyro.

The baseline for benchmarks/coin_vs_pyro.py: same model, guide, loss, optimizer and steps as
``vibench run recipes/coin.yaml``, with nothing around the SVI loop (no logging, no
evaluation, no run directory). Prints one JSON line with the loop's time and the fitted Beta.

    python benchmarks/plain_pyro_coin.py [--steps 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import Adam

FLIPS = [1.0] * 6 + [0.0] * 4


def model(flips: torch.Tensor) -> None:
    """Beta(10, 10) prior on the coin's fairness; each flip is Bernoulli(fairness)."""
    fairness = pyro.sample("latent_fairness", dist.Beta(torch.tensor(10.0), torch.tensor(10.0)))
    with pyro.plate("flips", flips.shape[-1]):
        pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)


def guide(flips: torch.Tensor) -> None:
    """A Beta over the fairness, its parameters in log space, starting at Beta(15, 15)."""
    log_alpha = pyro.param("log_alpha_q", lambda: torch.tensor(15.0).log())
    log_beta = pyro.param("log_beta_q", lambda: torch.tensor(15.0).log())
    pyro.sample("latent_fairness", dist.Beta(log_alpha.exp(), log_beta.exp()))


def train(steps: int, seed: int) -> dict:
    """Run SVI for ``steps`` steps: the loop's wall time, the final loss, the guide's moments."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    flips = torch.tensor(FLIPS)
    svi = SVI(model, guide, Adam({"lr": 0.0005, "betas": (0.90, 0.999)}),
              loss=Trace_ELBO(num_particles=7, vectorize_particles=True))
    losses = []
    start = time.perf_counter()
    for _ in range(steps):
        losses.append(svi.step(flips))
    wall = time.perf_counter() - start
    store = pyro.get_param_store()
    fitted = dist.Beta(store["log_alpha_q"].exp(), store["log_beta_q"].exp())
    tail = losses[-100:]
    return {
        "steps": steps,
        "seed": seed,
        "wall_seconds": wall,
        "steps_per_second": steps / wall if wall > 0 else 0.0,
        "final_loss": sum(tail) / len(tail) if tail else float("nan"),
        "mean": fitted.mean.item(),
        "std": fitted.stddev.item(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="SVI steps (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    print(json.dumps(train(args.steps, args.seed)))


if __name__ == "__main__":
    main()
