"""Time ``vibench run recipes/coin.yaml`` against the same experiment in plain Pyro and NumPyro.

Sides: vibench as a user runs it (``train.compile: auto``, so the step is compiled), vibench
with ``train.compile=false`` (Pyro's eager step), plain Pyro (plain_pyro_coin.py) and NumPyro
(numpyro_coin.py, skipped with a message where the ``bench`` extra is not installed). Each run
is its own process, so process wall and CPU time include interpreter start-up,
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
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "coin.yaml"
PLAIN = Path(__file__).resolve().with_name("plain_pyro_coin.py")
NUMPYRO = Path(__file__).resolve().with_name("numpyro_coin.py")

# Beta(10, 10) prior, 6 heads and 4 tails: the exact posterior is Beta(16, 14).
EXACT_ALPHA, EXACT_BETA = 10 + 6, 10 + 4
WARMUP_STEPS = 10
IMPORT = "import torch, pyro"  # the reference process of the outside-the-loop target


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


def run_vibench(steps: int, seed: int, env: dict[str, str] | None,
                *sets: str) -> dict:
    """One ``vibench run`` into a temporary run directory, read back from its summary.json."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        command = vibench_command() + ["run", str(RECIPE), "--out", str(out),
                                       "--steps", str(steps), "--seed", str(seed)]
        for item in sets:
            command += ["--set", item]
        wall, cpu, _ = timed(command, env)
        summary = json.loads((out / "summary.json").read_text())
    site = summary["posterior"]["latent_fairness"]
    return {"process": wall, "cpu": cpu, "loop": summary["wall_seconds"],
            "report": summary.get("report_seconds", math.nan),
            "steps_per_second": summary["steps_per_second"],
            "mean": site["mean"], "std": site["std"]}


def import_seconds(env: dict[str, str] | None) -> float:
    """Wall time of a process that only imports torch and Pyro: the floor of every side."""
    return timed([sys.executable, "-c", IMPORT], env)[0]


def run_eager(steps: int, seed: int, env: dict[str, str] | None) -> dict:
    return run_vibench(steps, seed, env, "train.compile=false")


def run_script(script: Path) -> Callable[[int, int, dict[str, str] | None], dict]:
    """A hand-written side: its script's process, read back from the JSON line it prints."""
    def run(steps: int, seed: int, env: dict[str, str] | None) -> dict:
        wall, cpu, stdout = timed([sys.executable, str(script),
                                   "--steps", str(steps), "--seed", str(seed)], env)
        result = json.loads(stdout.strip().splitlines()[-1])
        return {"process": wall, "cpu": cpu, "loop": result["wall_seconds"],
                "report": math.nan, "steps_per_second": result["steps_per_second"],
                "mean": result["mean"], "std": result["std"]}
    return run


Side = Callable[[int, int, dict[str, str] | None], dict]
SIDES: dict[str, Side] = {"vibench": run_vibench, "vibench eager": run_eager,
                          "plain Pyro": run_script(PLAIN), "NumPyro": run_script(NUMPYRO)}


def has_numpyro() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(name) is not None for name in ("numpyro", "jax"))


def measure(repeats: int, steps: int, seed: int, threads: int | None = None,
            sides: dict[str, Side] = SIDES) -> dict[str, list[dict]]:
    """Every side ``repeats`` times after a warm-up, interleaved (the order turns by one each
    repeat); each result gains ``outside`` (process - loop), ``setup`` (outside - report) and
    ``per_step`` (loop / steps). Each repeat also times ``import torch, pyro`` alone, under
    ``IMPORT``. ``threads`` sets OMP_NUM_THREADS for every side."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    for run in sides.values():
        run(WARMUP_STEPS, seed, env)
    results: dict[str, list[dict]] = {name: [] for name in sides}
    results[IMPORT] = []
    names = list(sides)
    for repeat in range(repeats):
        shift = repeat % len(names)
        results[IMPORT].append({"process": import_seconds(env)})
        for name in names[shift:] + names[:shift]:
            result = sides[name](steps, seed, env)
            result["outside"] = result["process"] - result["loop"]
            result["setup"] = result["outside"] - result["report"]
            result["per_step"] = 1000 * result["loop"] / steps
            results[name].append(result)
            print(f"  repeat {repeat + 1}/{repeats} {name:<13} process {result['process']:6.2f} s"
                  f"  loop {result['loop']:6.2f} s", file=sys.stderr, flush=True)
    return results


def report(results: dict[str, list[dict]], repeats: int, steps: int, seed: int,
           threads: int | None = None) -> list[str]:
    """The table: medians over repeats (with min-max for times) per side, and vibench's
    ratios to plain Pyro and to NumPyro (where it ran)."""
    names = [name for name in results if name != IMPORT]

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    def spread(runs: list[dict], key: str, fmt: str) -> str:
        values = [r[key] for r in runs]
        if any(math.isnan(v) for v in values):  # the hand-written sides have no report
            return "-"
        return f"{median(runs, key):{fmt}} [{min(values):{fmt}}-{max(values):{fmt}}]"

    def ratio(key: str, other: str) -> str:
        value = median(results["vibench"], key) / median(results[other], key)
        return f"{'-' if math.isnan(value) else format(value, '.2f'):<19}"

    rows = [
        ("process wall time (s)", "process", ".2f", True),
        ("process CPU time (s)", "cpu", ".2f", True),
        ("training loop (s)", "loop", ".2f", True),
        ("outside the loop (s)", "outside", ".2f", True),
        ("  report (s)", "report", ".2f", True),
        ("  the rest (s)", "setup", ".2f", True),
        ("per step (ms, loop)", "per_step", ".3f", True),
        ("steps/s (loop)", "steps_per_second", ".0f", True),
        ("posterior mean", "mean", ".4f", False),
        ("posterior sd", "std", ".4f", False),
    ]
    against = [name for name in ("plain Pyro", "NumPyro") if name in results]
    a, b = EXACT_ALPHA, EXACT_BETA
    exact_mean = a / (a + b)
    exact_sd = math.sqrt(a * b / ((a + b) ** 2 * (a + b + 1)))
    threading = f"OMP_NUM_THREADS={threads}" if threads else "torch's default threads"
    lines = [
        f"coin: {steps} steps, seed {seed}, {threading}, {repeats} repeats per side, "
        "interleaved; medians [min-max]",
        "",
        f"{'':<24}" + "".join(f"{name:<24}" for name in names)
        + "".join(f"{'vibench/' + name:<19}" for name in against),
    ]
    for label, key, fmt, show_spread in rows:
        cells = [spread(results[n], key, fmt) if show_spread else f"{median(results[n], key):{fmt}}"
                 for n in names]
        ratios = [ratio(key, n) if show_spread else f"{'-':<19}" for n in against]
        lines.append(f"{label:<24}" + "".join(f"{c:<24}" for c in cells) + "".join(ratios))
    lines += ["", f"exact posterior Beta({a}, {b}): mean {exact_mean:.4f}, sd {exact_sd:.4f}"]
    if results.get(IMPORT):
        floor = median(results[IMPORT], "process")
        lines.append(f"import torch, pyro alone: {floor:.2f} s; vibench outside the loop is "
                     f"{median(results['vibench'], 'outside') - floor:.2f} s more (target 0.5 s)")
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
    sides = dict(SIDES)
    if not has_numpyro():
        del sides["NumPyro"]
        print("NumPyro is not installed: skipping it (pip install -e '.[bench]')",
              file=sys.stderr)
    results = measure(args.repeats, args.steps, args.seed, args.threads, sides)
    print("\n".join(report(results, args.repeats, args.steps, args.seed, args.threads)))


if __name__ == "__main__":
    main()
