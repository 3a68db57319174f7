"""Time per SVI step of full-batch logistic regression on N synthetic rows, in one process and
data-parallel under torchrun (gloo on the CPU), from each run's own summary.json.

Each process of a torchrun run fits half the rows, so the likelihood's work per process halves
and one all_reduce of the gradients is added per step; on a machine with C cores, P processes
of one thread each use min(P, C) of them.

    python benchmarks/distributed.py [--n 1000000] [--steps 50] [--procs 1,2] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "logistic_regression.yaml"


def ms_per_step(procs: int, n: int, steps: int, threads: int) -> float:
    """The training loop's wall time per step (set-up and report left out) with ``procs``
    processes of ``threads`` threads each."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        args = ["-m", "workbench", "run", str(RECIPE), "--out", str(out), "--steps", str(steps),
                "--set", f"data.dataset.n={n}", "--set", "device=cpu", "--set", "loggers=[]",
                "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0",
                "--set", "train.plots=false", "--set", "train.diagnostics=false"]
        launcher = ([sys.executable] if procs == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone",
                     "--nproc-per-node", str(procs)])
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        subprocess.run([*launcher, *args], cwd=REPO, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        summary = json.loads((out / "summary.json").read_text())
    return 1000 * summary["wall_seconds"] / summary["steps"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--procs", default="1,2")
    parser.add_argument("--threads", type=int, default=1, help="OMP threads per process")
    args = parser.parse_args()
    print(f"logistic regression, N={args.n}, {args.steps} steps, {args.threads} thread(s) per "
          f"process, {os.cpu_count()} cores; ms per step")
    base = None
    for procs in (int(p) for p in args.procs.split(",")):
        ms = ms_per_step(procs, args.n, args.steps, args.threads)
        base = base or ms
        print(f"{procs:>3} process(es)  {ms:>8.1f} ms  speed-up {base / ms:.2f}x", flush=True)


if __name__ == "__main__":
    main()
