"""What the report costs beside training, at several data sizes: training time, report time
(summary, PSIS, posterior.nc, plots), their ratio, and the limit the report should keep,
max(5 s, 10% of training). Each size is one ``vibench run`` of logistic regression in a child
process; the report's time is ``report_seconds`` in its summary.json.

    python benchmarks/report_cost.py [--sizes 10000 100000 1000000] [--steps 300]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "logistic_regression.yaml"


def run_once(rows: int, steps: int, out: Path, extra: list[str]) -> dict:
    """One run at ``rows`` rows; its summary.json."""
    command = [sys.executable, "-m", "workbench", "run", str(RECIPE), "--steps", str(steps),
               "--set", f"data.dataset.n={rows}", "--set", "loggers=[]", "--out", str(out),
               *extra]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, env=env)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed on to vibench run (repeatable)")
    args = parser.parse_args()
    extra = [arg for item in args.set for arg in ("--set", item)]
    print(f"{'rows':>9} {'steps':>5} {'train s':>8} {'report s':>8} {'ratio':>6} "
          f"{'limit s':>7}  PSIS")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.sizes:
            summary = run_once(rows, args.steps, Path(tmp) / str(rows), extra)
            train, report = summary["wall_seconds"], summary["report_seconds"]
            limit = max(5.0, 0.1 * train)
            diagnostics = summary["diagnostics"]
            psis = diagnostics.get("sized") or (
                f"whole, {diagnostics.get('num_draws')} draws" if diagnostics.get("khat")
                is not None else diagnostics.get("reason", ""))
            mark = "" if report <= limit else "  OVER"
            print(f"{rows:>9} {args.steps:>5} {train:>8.1f} {report:>8.1f} "
                  f"{report / train:>6.2f} {limit:>7.1f}  {psis}{mark}", flush=True)


if __name__ == "__main__":
    main()
