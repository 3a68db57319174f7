"""vibench on a GPU: milliseconds per step, eager against compiled (a CUDA graph of the whole
step), for the coin (the per-step overhead of a small model) and full-batch logistic
regression at several N, with each run's report time. Each run is one ``vibench run`` in a
child process, timed by its own summary.json (``wall_seconds`` is the training loop alone;
tracing and compiling are set-up). Prints one table and the issue's targets beside it.

    python benchmarks/gpu.py [--device cuda] [--sizes 1000000 10000000 100000000]
                             [--coin-steps 4000] [--steps 200] [--modes false,true]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COIN = ROOT / "recipes" / "coin.yaml"
LOGISTIC = ROOT / "recipes" / "logistic_regression.yaml"
TARGETS = {"coin": 1.0, 100_000_000: 10.0}  # ms per step, issue 11 (on an H100)


def run_once(recipe: Path, steps: int, mode: str, device: str, out: Path,
             extra: list[str]) -> dict:
    """One ``vibench run``; its summary.json with the process's wall time added."""
    command = [sys.executable, "-m", "workbench", "run", str(recipe), "--device", device,
               "--steps", str(steps), "--set", f"train.compile={mode}", "--out", str(out),
               *extra]
    began = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "VIBENCH_COMPILE": mode})
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": f"exit {done.returncode}: {tail}"}
    summary = json.loads((out / "summary.json").read_text())
    summary["process_seconds"] = time.perf_counter() - began
    summary["notes"] = [line for line in done.stdout.splitlines() + done.stderr.splitlines()
                        if "compiled" in line or "eagerly" in line]
    return summary


def row(label: str, mode: str, summary: dict, target: float | None) -> str:
    if "error" in summary:
        return f"  {label:<22} {mode:<6} FAILED {summary['error']}"
    per_step = 1000 * summary["wall_seconds"] / max(summary["steps"], 1)
    verdict = "" if target is None else (f"  target {target:g} ms: "
                                         f"{'met' if per_step <= target else 'MISSED'}")
    compiled = summary.get("compiled")
    return (f"  {label:<22} {mode:<6} {summary['steps']:>6} {per_step:>9.3f} "
            f"{summary['wall_seconds']:>8.2f} {summary['process_seconds']:>8.1f} "
            f"{summary.get('report_seconds', float('nan')):>8.2f}  "
            f"{'yes' if compiled else 'no':<8}{verdict}"
            + "".join(f"\n      note: {note}" for note in summary.get("notes", [])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="*",
                        default=[1_000_000, 10_000_000, 100_000_000])
    parser.add_argument("--coin-steps", type=int, default=4000)
    parser.add_argument("--steps", type=int, default=200, help="logistic regression's steps")
    parser.add_argument("--modes", default="false,true", help="train.compile values to run")
    args = parser.parse_args()
    modes = args.modes.split(",")
    print(f"  {'run':<22} {'compile':<6} {'steps':>6} {'ms/step':>9} {'loop s':>8} "
          f"{'process':>8} {'report s':>8}  compiled", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for mode in modes:
            steps = args.coin_steps if mode != "false" else min(args.coin_steps, 1000)
            summary = run_once(COIN, steps, mode, args.device, Path(tmp) / f"coin-{mode}", [])
            print(row("coin", mode, summary, TARGETS["coin"]), flush=True)
        for n in args.sizes:
            for mode in modes:
                summary = run_once(LOGISTIC, args.steps, mode, args.device,
                                   Path(tmp) / f"logistic-{n}-{mode}",
                                   ["--set", f"data.dataset.n={n}"])
                print(row(f"logistic N={n:.0e}", mode, summary, TARGETS.get(n)), flush=True)


if __name__ == "__main__":
    main()
