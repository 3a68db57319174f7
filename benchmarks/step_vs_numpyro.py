"""A compiled step with the default loggers against NumPyro's Python loop over a jitted
``svi.update`` (issue 22, item 2): ms per step, side by side, and their ratio.

Per posterior (the posteriordb ports; kilpisjarvi, diamonds and garch11 by default), both sides
fit the same model and data with a full-rank Gaussian guide, ``Trace_ELBO`` with 4 particles
and Adam at 0.01, in float32:

- **vibench**: the shipped recipe (``train.compile: true``), its training loop ``Run.fit`` with
  what a run logs by default (TensorBoard's ``Train/loss`` each step, the parameter summaries
  and evaluation as ``train.log_params_every`` and ``train.eval_every`` default), as
  ``logging_cost.py`` times it;
- **NumPyro**: ``benchmarks/nuts.py``'s port of the model, ``AutoMultivariateNormal``, and a
  Python loop of ``jax.jit(svi.update)``, the loss kept each step and read at the end, in a
  child process (XLA on one thread; ``--xla-threads all`` leaves XLA its default threads).

Each side reports the CPU time of its own process per step (which a busy machine disturbs
less than the wall time) and the wall time, the sides alternating ``--repeats`` times; the
table gives medians (CPU time's range in brackets).

    OMP_NUM_THREADS=1 python benchmarks/step_vs_numpyro.py [--posteriors kilpisjarvi,garch11]
        [--steps 2000] [--repeats 3] [--xla-threads 1|all]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

logging_cost = __import__("logging_cost")  # beside this file


def numpyro_child(posterior: str, steps: int, threads: str) -> None:
    """NumPyro's loop on ``posterior``: one JSON line with CPU ms per step (``--numpyro``)."""
    if threads == "1":
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                           "intra_op_parallelism_threads=1")
    import time

    import jax
    from numpyro.infer import SVI, Trace_ELBO
    from numpyro.infer.autoguide import AutoMultivariateNormal
    from numpyro.optim import Adam

    nuts = __import__("nuts")  # beside this file

    model, data = nuts.numpyro_port(posterior)
    svi = SVI(model, AutoMultivariateNormal(model), Adam(0.01), Trace_ELBO(num_particles=4))
    state = svi.init(jax.random.PRNGKey(0), **data)
    update = jax.jit(svi.update)
    for _ in range(50):  # compiled and warm
        state, loss = update(state, **data)
    loss.block_until_ready()
    losses = []
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(steps):
        state, loss = update(state, **data)
        losses.append(loss)
    final = float(losses[-1])
    print(json.dumps({"ms": (time.process_time() - cpu) / steps * 1000,
                      "wall": (time.perf_counter() - wall) / steps * 1000, "loss": final}))


def numpyro_ms(posterior: str, steps: int, threads: str) -> tuple[float, float]:
    """NumPyro's CPU and wall ms per step, from a child."""
    found = subprocess.run([sys.executable, __file__, "--numpyro", posterior, "--steps",
                            str(steps), "--xla-threads", threads],
                           capture_output=True, text=True, check=True)
    said = json.loads(found.stdout.strip().splitlines()[-1])
    return said["ms"], said["wall"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", default="kilpisjarvi,diamonds,garch11")
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed loop")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--xla-threads", choices=["1", "all"], default="1")
    parser.add_argument("--numpyro", help=argparse.SUPPRESS)  # the child's posterior
    args = parser.parse_args(argv)
    if args.numpyro:
        numpyro_child(args.numpyro, args.steps, args.xla_threads)
        return 0
    import pyro
    import torch

    print(f"CPU ms per step, medians of {args.repeats} alternated loops of {args.steps} steps; "
          f"vibench {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"pyro {pyro.__version__}; XLA threads: {args.xla_threads}; "
          f"load {os.getloadavg()[0]:.1f}\n")
    print("| posterior | vibench, default loggers: CPU | NumPyro loop: CPU | CPU ratio | "
          "vibench wall | NumPyro wall | wall ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for posterior in args.posteriors.split(","):
        pyro.clear_param_store()
        run = logging_cost.setup(posterior)
        if run.compiled is None:
            print(f"| {posterior} | not compiled: {'; '.join(run.notes)} | | |")
            continue
        train = run.recipe["train"]
        default = (["tensorboard"], train["eval_every"], train["log_params_every"])
        logging_cost.loop_ms(run, *default, min(200, args.steps))  # warm
        ours, theirs = [], []
        for _ in range(args.repeats):
            ours.append(logging_cost.loop_ms(run, *default, args.steps))
            theirs.append(numpyro_ms(posterior, args.steps, args.xla_threads))
        (mine, mine_wall), (peer, peer_wall) = (
            [statistics.median(side[i] for side in found) for i in (0, 1)]
            for found in (ours, theirs))
        cpu = [[side[0] for side in found] for found in (ours, theirs)]
        print(f"| {posterior} | {mine:.3f} ({min(cpu[0]):.3f}-{max(cpu[0]):.3f}) | {peer:.3f} "
              f"({min(cpu[1]):.3f}-{max(cpu[1]):.3f}) | {mine / peer:.2f} | {mine_wall:.3f} | "
              f"{peer_wall:.3f} | {mine_wall / peer_wall:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
