"""The coin experiment of recipes/coin.yaml, written by hand in NumPyro.

The third side of benchmarks/coin_vs_pyro.py: the model, guide, loss, optimizer and steps of
plain_pyro_coin.py, run the way NumPyro users run SVI (``SVI.run``: the whole loop compiled
by XLA). Prints one JSON line with the loop's time (compiling included, as a user waits for
it) and the fitted Beta. Needs the ``bench`` extra: ``pip install -e '.[bench]'``.

    python benchmarks/numpyro_coin.py [--steps 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import Adam

FLIPS = [1.0] * 6 + [0.0] * 4


def model(flips: jnp.ndarray) -> None:
    fairness = numpyro.sample("latent_fairness", dist.Beta(10.0, 10.0))
    with numpyro.plate("flips", flips.shape[-1]):
        numpyro.sample("obs", dist.Bernoulli(fairness), obs=flips)


def guide(flips: jnp.ndarray) -> None:
    log_alpha = numpyro.param("log_alpha_q", jnp.log(15.0))
    log_beta = numpyro.param("log_beta_q", jnp.log(15.0))
    numpyro.sample("latent_fairness", dist.Beta(jnp.exp(log_alpha), jnp.exp(log_beta)))


def train(steps: int, seed: int) -> dict:
    flips = jnp.array(FLIPS)
    svi = SVI(model, guide, Adam(0.0005, b1=0.90, b2=0.999),
              loss=Trace_ELBO(num_particles=7, vectorize_particles=True))
    start = time.perf_counter()
    result = svi.run(jax.random.PRNGKey(seed), steps, flips, progress_bar=False)
    jax.block_until_ready(result.params)
    wall = time.perf_counter() - start
    params = result.params
    fitted = dist.Beta(jnp.exp(params["log_alpha_q"]), jnp.exp(params["log_beta_q"]))
    tail = result.losses[-100:]
    return {
        "steps": steps,
        "seed": seed,
        "wall_seconds": wall,
        "steps_per_second": steps / wall if wall > 0 else 0.0,
        "final_loss": float(tail.mean()),
        "mean": float(fitted.mean),
        "std": float(jnp.sqrt(fitted.variance)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4000, help="SVI steps (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()
    print(json.dumps(train(args.steps, args.seed)))


if __name__ == "__main__":
    main()
