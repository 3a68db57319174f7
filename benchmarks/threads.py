"""How many CPU threads a run should use: the coin (or any recipe) run with ``--threads N``
for each N, and with no ``--threads`` (vibench's default), each in its own process, taking
turns; per setting the median wall time of the process and of the training loop
(summary.json's ``wall_seconds``), and whether its repeats gave the same numbers bit for bit
(the fitted parameters and the posterior in summary.json).

OMP_NUM_THREADS and MKL_NUM_THREADS are removed from the runs' environment, so the default is
vibench's own choice and not the caller's. Say the machine's load (``uptime``) with the table.

    python benchmarks/threads.py [--steps 4000] [--repeats 2] [--threads 1,2] [--recipe R]
                                 [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one_run(recipe: Path, steps: int, threads: int | None, sets: list[str]) -> dict:
    """One ``vibench run`` in a child process: its wall time and summary.json."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = [sys.executable, "-m", "workbench", "run", str(recipe), "--steps", str(steps),
                   "--out", str(out), "--set", "train.plots=false",
                   *[arg for item in sets for arg in ("--set", item)]]
        if threads is not None:
            command += ["--threads", str(threads)]
        began = time.perf_counter()
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - began
        summary = json.loads((out / "summary.json").read_text())
    numbers = json.dumps([summary["params"], summary["posterior"], summary["final_loss"]],
                         sort_keys=True)
    return {"wall": wall, "loop": summary["wall_seconds"], "threads": summary["threads"],
            "numbers": numbers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "coin.yaml")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", default=",".join(sorted({"1", str(os.cpu_count() or 1)})),
                        help="thread counts to try, besides the default (default: 1 and every "
                             "core)")
    parser.add_argument("--set", dest="sets", action="append", default=[])
    args = parser.parse_args()
    settings: list[int | None] = [int(t) for t in args.threads.split(",")] + [None]
    runs: dict[int | None, list[dict]] = {s: [] for s in settings}
    for repeat in range(args.repeats):
        turn = repeat % len(settings)
        for setting in settings[turn:] + settings[:turn]:
            runs[setting].append(one_run(args.recipe, args.steps, setting, args.sets))
    print(f"{args.recipe.name}, {args.steps} steps, {args.repeats} runs each, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.1f} at the end")
    print("| --threads | torch threads | process s (median, min-max) | loop s (median) "
          "| same numbers run to run |")
    print("| --- | --- | --- | --- | --- |")
    for setting, done in runs.items():
        walls = [r["wall"] for r in done]
        same = "yes" if len({r["numbers"] for r in done}) == 1 else "NO"
        print(f"| {setting if setting is not None else 'default'} | {done[0]['threads']} "
              f"| {statistics.median(walls):.1f} ({min(walls):.1f}-{max(walls):.1f}) "
              f"| {statistics.median(r['loop'] for r in done):.1f} | {same} |")


if __name__ == "__main__":
    main()
