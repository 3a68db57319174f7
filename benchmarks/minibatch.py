"""Per-step cost of minibatch SVI as the data grow: vibench's ``train.batch_size`` against
Pyro's own ``pyro.plate(..., subsample_size=B)``, on the coin with N synthetic flips.

Pyro's plate draws a permutation of all N indices every step, so its step cost grows with N;
vibench draws the batch's indices directly (with replacement), so its cost should not.

    python benchmarks/minibatch.py [--batch 1000] [--steps 300] [--sizes 1000,1000000,10000000]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI, Trace_ELBO

from workbench.config import recipe as recipes
from workbench.plugins.registry import get_registry
from workbench.train.runner import Run

COIN = Path(__file__).resolve().parent.parent / "recipes" / "coin.yaml"


def vibench_ms_per_step(n: int, batch: int, steps: int) -> float:
    """vibench's training loop (TensorBoard logging included) on n flips, batch of ``batch``."""
    sets = ["data=null", "data.dataset=synthetic_coin", f"data.dataset.n={n}",
            f"train.batch_size={batch}", f"train.steps={steps}", "train.eval_every=0",
            "train.checkpoint_every=0", "loss.num_particles=1", "optimizer.lr=0.01"]
    raw, overridden = recipes.apply_overrides(recipes.load(COIN), sets)
    run = Run.setup(recipes.resolve(raw, get_registry(), str(COIN), overridden), get_registry())
    with tempfile.TemporaryDirectory() as tmp:
        summary = run.train(Path(tmp))
    return 1000 / summary["steps_per_second"]


def pyro_ms_per_step(n: int, batch: int, steps: int) -> float:
    """A hand-written Pyro loop with the plate's own subsampling."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    flips = (torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.3).float()

    def model(flips):
        f = pyro.sample("latent_fairness", dist.Beta(10.0, 10.0))
        with pyro.plate("flips", n, subsample_size=batch) as ind:
            pyro.sample("obs", dist.Bernoulli(f), obs=flips.index_select(0, ind))

    def guide(flips):
        a = pyro.param("log_alpha_q", torch.tensor(math.log(15.0)))
        b = pyro.param("log_beta_q", torch.tensor(math.log(15.0)))
        pyro.sample("latent_fairness", dist.Beta(a.exp(), b.exp()))

    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())
    svi.step(flips)
    start = time.perf_counter()
    for _ in range(steps):
        svi.step(flips)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--sizes", default="1000,100000,1000000,10000000")
    args = parser.parse_args()
    print(f"batch {args.batch}, {args.steps} steps, ms per step")
    print(f"{'N':>10}  {'vibench':>8}  {'pyro':>8}  {'pyro/vibench':>12}")
    for n in (int(size) for size in args.sizes.split(",")):
        batch = min(args.batch, n - 1)
        ours = vibench_ms_per_step(n, batch, args.steps)
        theirs = pyro_ms_per_step(n, batch, args.steps)
        print(f"{n:>10}  {ours:>8.2f}  {theirs:>8.2f}  {theirs / ours:>12.1f}", flush=True)


if __name__ == "__main__":
    main()
