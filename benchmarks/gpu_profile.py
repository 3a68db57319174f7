"""Where a compiled GPU step's time goes: one ``vibench run`` of full-batch logistic
regression in this process, with the compiled step's kernels profiled (``torch.profiler``,
three steps, outside the CUDA graph) and the graph's replay timed beside the step called
directly, then the run's ms per step, report time and k-hat (with the whole traceback where
the report could not compute it).

    python benchmarks/gpu_profile.py [--rows 100000000] [--steps 100] [--compile true]
                                     [--stacks FILE]

``--stacks`` writes every thread's stack to FILE each 30 s, so a set-up that does not end
says where it is.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import tempfile
import time
import traceback
from pathlib import Path

import torch

from workbench.cli import main as vibench
from workbench.compile import compiled_step
from workbench.report import posterior

ROOT = Path(__file__).resolve().parents[1]


def profiled(capture):
    """``compiled_step._cuda_graph`` that also profiles the step it captures."""
    def wrapped(run, inputs, mutable):
        replay = capture(run, inputs, mutable)
        copies = compiled_step._copies(inputs, mutable)
        from torch.profiler import ProfilerActivity, profile
        for _ in range(2):
            run(*copies)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                run(*copies)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12,
                                        max_name_column_width=70), flush=True)
        for label, step in (("graph replay", lambda: replay(inputs)),
                            ("compiled step, no graph", lambda: run(*copies))):
            step()
            torch.cuda.synchronize()
            began = time.perf_counter()
            for _ in range(20):
                step()
            torch.cuda.synchronize()
            print(f"{label}: {50 * (time.perf_counter() - began):.3f} ms a step", flush=True)
        return replay
    return wrapped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000_000)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--compile", default="true")
    parser.add_argument("--stacks", type=Path)
    args = parser.parse_args()
    if args.stacks:
        faulthandler.dump_traceback_later(30, repeat=True, file=args.stacks.open("w"))
    compiled_step._cuda_graph = profiled(compiled_step._cuda_graph)
    posterior._first_line = lambda exc: traceback.format_exc()[-1500:]
    out = Path(tempfile.mkdtemp()) / "run"
    began = time.perf_counter()
    try:
        vibench(["run", str(ROOT / "recipes" / "logistic_regression.yaml"), "--device", "cuda",
                 "--steps", str(args.steps), "--set", f"train.compile={args.compile}",
                 "--set", f"data.dataset.n={args.rows}", "--out", str(out)])
    except SystemExit:
        pass
    if not (out / "summary.json").is_file():
        raise SystemExit("the run wrote no summary.json (its error is above)")
    summary = json.loads((out / "summary.json").read_text())
    print(f"== compile={args.compile} N={args.rows}: "
          f"{1000 * summary['wall_seconds'] / summary['steps']:.3f} ms a step over "
          f"{summary['steps']} steps, compiled {summary.get('compiled')}, report "
          f"{summary.get('report_seconds', float('nan')):.2f} s, process "
          f"{time.perf_counter() - began:.1f} s")
    diagnostics = summary["diagnostics"]
    print("k-hat:", diagnostics.get("khat"), "|",
          diagnostics.get("sized") or diagnostics.get("reason"))


if __name__ == "__main__":
    main()
