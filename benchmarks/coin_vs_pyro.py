"""Time ``vibench run recipes/coin.yaml`` against the same experiment in plain Pyro.

Each run is its own process, so process wall and CPU time include interpreter start-up,
imports and (for vibench) recipe checks, logging and writing the run directory; the
training-loop time is what each side measures around its own SVI loop. One short untimed run
of each side first warms the disk cache; then the two sides take turns, the first one
alternating between repeats, so that drift in a noisy machine's speed hits both alike.

    python benchmarks/coin_vs_pyro.py [--repeats 3] [--steps 4000] [--seed 0] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "coin.yaml"
PLAIN = Path(__file__).resolve().with_name("plain_pyro_coin.py")

# Beta(10, 10) prior, 6 heads and 4 tails: the exact posterior is Beta(16, 14).
EXACT_ALPHA, EXACT_BETA = 10 + 6, 10 + 4
WARMUP_STEPS = 10


def vibench_command() -> list[str]:
    """The ``vibench`` console script beside this interpreter, or the CLI through ``-c``."""
    script = Path(sys.executable).with_name("vibench")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from workbench.cli import main; main()"]


def timed(command: list[str], env: dict[str, str] | None) -> tuple[float, float, str]:
    """Run ``command`` from the repository root: its wall time, CPU time (user + system) and
    stdout. Fails loudly."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def run_vibench(steps: int, seed: int, env: dict[str, str] | None) -> dict:
    """One ``vibench run`` into a temporary run directory, read back from its summary.json."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = vibench_command() + ["run", str(RECIPE), "--out", str(out),
                                       "--steps", str(steps), "--seed", str(seed)]
        wall, cpu, _ = timed(command, env)
        summary = json.loads((out / "summary.json").read_text())
    site = summary["posterior"]["latent_fairness"]
    return {"process": wall, "cpu": cpu, "loop": summary["wall_seconds"],
            "steps_per_second": summary["steps_per_second"],
            "mean": site["mean"], "std": site["std"]}


def run_plain(steps: int, seed: int, env: dict[str, str] | None) -> dict:
    """One run of plain_pyro_coin.py, read back from the JSON line it prints."""
    wall, cpu, stdout = timed([sys.executable, str(PLAIN),
                               "--steps", str(steps), "--seed", str(seed)], env)
    result = json.loads(stdout.strip().splitlines()[-1])
    return {"process": wall, "cpu": cpu, "loop": result["wall_seconds"],
            "steps_per_second": result["steps_per_second"],
            "mean": result["mean"], "std": result["std"]}


Side = Callable[[int, int, dict[str, str] | None], dict]
SIDES: dict[str, Side] = {"vibench": run_vibench, "plain Pyro": run_plain}


def measure(repeats: int, steps: int, seed: int,
            threads: int | None = None) -> dict[str, list[dict]]:
    """Every side ``repeats`` times after a warm-up, interleaved; each result gains ``outside``
    (process - loop). ``threads`` sets OMP_NUM_THREADS for both sides."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    for run in SIDES.values():
        run(WARMUP_STEPS, seed, env)
    results: dict[str, list[dict]] = {name: [] for name in SIDES}
    for repeat in range(repeats):
        order = list(SIDES) if repeat % 2 == 0 else list(reversed(SIDES))
        for name in order:
            result = SIDES[name](steps, seed, env)
            result["outside"] = result["process"] - result["loop"]
            results[name].append(result)
            print(f"  repeat {repeat + 1}/{repeats} {name:<10} process {result['process']:6.2f} s"
                  f"  loop {result['loop']:6.2f} s", file=sys.stderr, flush=True)
    return results


def report(results: dict[str, list[dict]], repeats: int, steps: int, seed: int,
           threads: int | None = None) -> list[str]:
    """The table: medians over repeats (with min-max for times), and vibench/plain ratios."""
    vib, plain = (results[name] for name in SIDES)

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def spread(runs: list[dict], key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        return f"{median(runs, key):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    rows = [
        ("process wall time (s)", "process", ".2f", True),
        ("process CPU time (s)", "cpu", ".2f", True),
        ("training loop (s)", "loop", ".2f", True),
        ("outside the loop (s)", "outside", ".2f", True),
        ("steps/s (loop)", "steps_per_second", ".0f", True),
        ("posterior mean", "mean", ".4f", False),
        ("posterior sd", "std", ".4f", False),
    ]
    a, b = EXACT_ALPHA, EXACT_BETA
    exact_mean = a / (a + b)
    exact_sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    threading = f"OMP_NUM_THREADS={threads}" if threads else "torch's default threads"
    lines = [
        f"coin: {steps} steps, seed {seed}, {threading}, {repeats} repeats per side, "
        "interleaved; medians [min-max]",
        "",
        f"{'':<24}{'vibench':<24}{'plain Pyro':<24}vibench/plain",
    ]
    for label, key, fmt, show_spread in rows:
        cells = [spread(r, key, fmt) if show_spread else f"{median(r, key):{fmt}}"
                 for r in (vib, plain)]
        ratio = median(vib, key) / median(plain, key) if show_spread else None
        lines.append(f"{label:<24}{cells[0]:<24}{cells[1]:<24}"
                     + (f"{ratio:.2f}" if ratio is not None else "-"))
    lines += ["", f"exact posterior Beta({a}, {b}): mean {exact_mean:.4f}, sd {exact_sd:.4f}"]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per side (default 3)")
    parser.add_argument("--steps", type=int, default=4000, help="SVI steps (default 4000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both sides (default: torch's own choice)")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats, --steps and --threads must be >= 1")
    results = measure(args.repeats, args.steps, args.seed, args.threads)
    print("\n".join(report(results, args.repeats, args.steps, args.seed, args.threads)))


if __name__ == "__main__":
    main()
