"""What does vibench's automatic pipeline say on the hard posteriors? Runs each recipe of
packages/vibench-hardcases (a model and its data set only: the automatic pipeline) with
``vibench run`` and tabulates what its summary.json says against the reference posterior.

It drives vibench only through its command line (``vibench run RECIPE --out DIR``) and reads
only summary.json, so it does not depend on vibench's internal modules. Per posterior:
status, which estimates the pipeline reported, max z and the range of r over the reference's
parameters (z = |mean - ref mean| / ref sd, r = sd / ref sd; good when every z <= 0.2 and
0.8 <= r <= 1.2), PSIS k-hat of the reported fit, R-hat across the Gaussian fits, whether
the pipeline trusts its result, its flags, and the wall time of the whole ``vibench run``.

    pip install -e packages/vibench-hardcases
    nice -n 19 python benchmarks/hard_suite.py                          # all six
    nice -n 19 python benchmarks/hard_suite.py hard_banana hard_funnel10 --out /tmp/hard
    python benchmarks/hard_suite.py --set seed=1 --detail

The pipeline's Gaussian stage counts its budget in gradient steps, so its path depends only
on the recipe and the seed; the wall times depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "packages" / "vibench-hardcases" / "recipes"
NAMES = ["hard_funnel10", "hard_banana", "hard_mixture2", "hard_student_t",
         "hard_hier_centred", "hard_latent_gp", "hard_hier_logistic"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"default: all of {NAMES}")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the run directories go (default: a temporary folder, kept)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="passed to vibench run as --set (repeatable)")
    parser.add_argument("--detail", action="store_true", help="also each parameter's z and r")
    args = parser.parse_args(argv)
    names = args.names or NAMES
    unknown = [n for n in names if n not in NAMES]
    if unknown:
        parser.error(f"unknown posterior {unknown[0]!r}; choose from {', '.join(NAMES)}")
    vibench = shutil.which("vibench") or f"{sys.executable} -m workbench"
    out = args.out or Path(tempfile.mkdtemp(prefix="hard_suite_"))
    out.mkdir(parents=True, exist_ok=True)
    rows, details = [], []
    for name in names:
        run_dir = out / name
        if run_dir.exists():
            shutil.rmtree(run_dir)
        command = [*vibench.split(), "run", str(RECIPES / f"{name}.yaml"), "--out", str(run_dir)]
        for item in args.set:
            command += ["--set", item]
        start = time.time()
        result = subprocess.run(command, capture_output=True, text=True)
        wall = time.time() - start
        (out / f"{name}.log").write_text(result.stdout + result.stderr)
        summary_path = run_dir / "summary.json"
        if not summary_path.exists():
            last = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
            rows.append(f"| {name} | failed (exit {result.returncode}): {last[0]} |" + " |" * 8
                        + f" {wall:.0f} |")
            continue
        summary = json.loads(summary_path.read_text())
        rows.append(row(name, summary, wall))
        if args.detail:
            details.append(detail(name, summary))
    print(f"vibench run on {len(names)} hard posteriors; run directories and logs in {out}\n")
    print("| posterior | status | estimates | max z | r | importance-weighted max z, r | k-hat "
          "| R-hat across fits | trusted | flags and cautions | wall s |")
    print("|---|---|---|---:|---|---|---:|---:|---|---|---:|")
    print("\n".join(rows))
    for text in details:
        print("\n" + text)
    return 0


def _f(value, spec=".2f"):
    return "n/a" if value is None else format(value, spec)


def row(name: str, summary: dict, wall: float) -> str:
    ref = summary.get("reference") or {}
    auto = summary.get("auto") or {}
    diagnostics = summary.get("diagnostics") or {}
    rhat = (auto.get("rhat") or {}).get("max")
    iw = (f"{_f(ref.get('iw_max_z'))}, {_f(ref.get('iw_min_r'))}-{_f(ref.get('iw_max_r'))}"
          if "iw_max_z" in ref else "-")
    verdict = {True: " (good)", False: " (off)"}.get(ref.get("good"), "")
    flags = "; ".join([*(auto.get("flags") or []),
                       *(f"caution: {line}" for line in auto.get("cautions") or [])]) or "none"
    return (f"| {name} | {summary.get('status')} | {auto.get('estimates', '-')} | "
            f"{_f(ref.get('max_z'))}{verdict} | {_f(ref.get('min_r'))}-{_f(ref.get('max_r'))} | "
            f"{iw} | {_f(diagnostics.get('khat'))} | {_f(rhat, '.3f')} | "
            f"{auto.get('trusted')} | {flags} | {wall:.0f} |")


def detail(name: str, summary: dict) -> str:
    ref = summary.get("reference") or {}
    lines = [f"{name}:", "", "| parameter | mean | ref mean | sd | ref sd | z | r |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for key, p in (ref.get("params") or {}).items():
        lines.append(f"| {key} | {p['mean']:.4g} | {p['ref_mean']:.4g} | {p['std']:.4g} | "
                     f"{p['ref_sd']:.4g} | {p['z']:.2f} | {p['r']:.2f} |")
    for key, reason in (ref.get("skipped") or {}).items():
        lines.append(f"| {key} | not compared: {reason} |||||")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
