"""How accurate is a recipe on real posteriors? Runs it on the eight posteriordb ports
(packages/vibench-posteriordb) and scores each fit against the reference posterior.

Each run goes through vibench's own path (``workbench.service.start`` and ``Job.train``, as
``vibench run`` does, in this process), in its own run directory; its summary.json's
``reference`` section gives max z, min and max r and the verdict (z = |mean - ref mean| /
ref sd <= 0.2 and 0.8 <= r = sd / ref sd <= 1.2 for every parameter). Rows:

- the variant: each posterior's shipped recipe, with ``--set`` overrides and ``--steps``;
- the automatic pipeline (``--auto``, on by default): ``--set guide=auto`` on the same
  recipe, so its stages (workbench/auto/pipeline.py, plugins/stages.py) pick the guide, loss,
  step size and steps; scored with the estimates it reports (importance-weighted where k-hat < 0.7).
  "converged at" gives the step at which each of its fits stopped at convergence
  (``train.stop: converged``), or "cap" where one ran all its steps;
  "flagged?" is whether its summary's ``auto.flags`` warn (R-hat > 1.01, k-hat > 0.7); for
  the other rows, whether k-hat > 0.7;
- an ADVI-like baseline (``--advi``, on by default): mean-field ``auto_normal`` and Adam,
  its step size picked from ``--advi-lrs`` by the lowest final loss (-ELBO) after
  ``--advi-search-steps`` steps, as Stan's ADVI adapts eta, then trained for ``--steps``.
  Its wall time includes the search. ``--set`` does not apply to it.

Every run has TensorBoard, plots and Eval/loss off (``loggers=[]``, ``train.plots=false``,
``train.eval_every=0``): they cost time and never change the fit.

    python benchmarks/posteriordb.py [--steps N] [--set KEY=VALUE ...] [--seeds N]
        [--first-seed F] [--posteriors garch11,nes] [--no-auto] [--no-recipe] [--no-advi]
        [--advi-lrs 0.1,0.03,0.01]
        [--advi-search-steps 100] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "packages" / "vibench-posteriordb" / "recipes"
POSTERIORS = ["kilpisjarvi", "earnings", "nes", "diamonds", "arma11", "garch11", "gauss_mix",
              "hmm_drive"]
QUIET = ["loggers=[]", "train.plots=false", "train.eval_every=0"]
COLUMNS = ["posterior", "guide", "seed", "steps", "converged at", "wall s", "cpu s", "max z",
           "min r", "max r", "k-hat", "good?", "flagged?"]


def run_once(posterior: str, sets: list[str], out: Path) -> tuple[dict | None, float, str]:
    """One ``vibench run`` of a posterior's recipe with ``sets``: its summary (None if it
    failed), the wall time of setup, training and report, and the error, if any. The CPU
    time it took (this process's, all threads) goes to ``CPU[-1]``."""
    from workbench import service
    from workbench.errors import VibenchError
    from workbench.plugins.registry import get_registry

    start, cpu = time.perf_counter(), time.process_time()
    CPU.append(0.0)
    try:
        job = service.start(RECIPES / f"pdb_{posterior}.yaml", [*QUIET, *sets], out,
                            get_registry())
        summary = job.train()
    except VibenchError as exc:
        CPU[-1] = time.process_time() - cpu
        return None, time.perf_counter() - start, str(exc).splitlines()[0]
    CPU[-1] = time.process_time() - cpu
    return summary, time.perf_counter() - start, ""


CPU: list[float] = []  # the CPU seconds of each run_once, in order


def search_lr(posterior: str, seed: int, lrs: list[float], steps: int, out: Path
              ) -> tuple[float | None, float, list[str]]:
    """The ADVI-like step size: the candidate with the lowest final loss after ``steps``
    steps of auto_normal; also the search's wall time and a note per candidate."""
    best, best_loss, wall, notes = None, math.inf, 0.0, []
    for lr in lrs:
        sets = ["guide=auto_normal", f"optimizer.lr={lr}", f"train.steps={steps}",
                f"seed={seed}", "train.diagnostics=false"]
        summary, seconds, error = run_once(posterior, sets, out / f"search-lr{lr}-s{seed}")
        wall += seconds
        loss = summary["final_loss"] if summary else None
        notes.append(f"lr {lr}: " + (f"final loss {loss:.2f}" if loss is not None
                                      else f"failed ({error})"))
        if loss is not None and math.isfinite(loss) and loss < best_loss:
            best, best_loss = lr, loss
    return best, wall, notes


def row(posterior: str, guide: str, seed: int, summary: dict | None, wall: float,
        error: str = "") -> dict:
    """One table row from a run's summary."""
    reference = (summary or {}).get("reference") or {}
    khat = ((summary or {}).get("diagnostics") or {}).get("khat")
    good = reference.get("good")
    auto = (summary or {}).get("auto")
    flagged = (bool(auto["flags"]) if auto else None if khat is None else khat > 0.7)
    return {"posterior": posterior, "guide": guide, "seed": seed,
            "steps": summary["steps"] if summary else None,
            "converged at": converged_at(auto), "wall s": wall,
            "cpu s": CPU[-1] if CPU else None,
            "max z": reference.get("max_z"), "min r": reference.get("min_r"),
            "max r": reference.get("max_r"), "k-hat": khat,
            "good?": "failed: " + error if summary is None else
                     "yes" if good else "no" if good is False else "?",
            "flagged?": "-" if flagged is None else "yes" if flagged else "no"}


def converged_at(auto: dict | None) -> str | None:
    """Where each of the pipeline's fits stopped at convergence ("cap" where it ran out of
    steps, "failed" where it failed), in order."""
    if not auto:
        return None
    return " ".join("failed" if not fit["ok"] else str(fit.get("converged_at") or "cap")
                    for fit in auto["fits"])


def table(rows: list[dict]) -> str:
    """The rows as a Markdown table."""

    def cell(key: str, value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            if not math.isfinite(value):
                return str(value)
            return f"{value:.0f}" if key in ("wall s", "cpu s") else f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if c in ("posterior", "guide", "good?") else "---:"
                            for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None,
                        help="SVI steps for every row (default: each recipe's)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a recipe override for the variant's rows, as vibench run's")
    parser.add_argument("--seeds", type=int, default=1,
                        help="seeds F..F+N-1 (F: --first-seed) for every row")
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--posteriors", default=",".join(POSTERIORS),
                        help="which, comma-separated (default: all eight)")
    parser.add_argument("--no-auto", dest="auto", action="store_false",
                        help="leave out the automatic pipeline")
    parser.add_argument("--no-recipe", dest="recipe", action="store_false",
                        help="leave out the shipped recipe's rows")
    parser.add_argument("--no-advi", dest="advi", action="store_false",
                        help="leave out the ADVI-like baseline")
    parser.add_argument("--advi-lrs", default="0.1,0.03,0.01",
                        help="the baseline's step-size candidates")
    parser.add_argument("--advi-search-steps", type=int, default=100)
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the run directories here (new or empty); default: a "
                             "temporary directory")
    parser.add_argument("--threads", type=int, default=None, help="torch's intra-op threads")
    args = parser.parse_args()
    names = [n.strip().removeprefix("pdb_") for n in args.posteriors.split(",") if n.strip()]
    unknown = [n for n in names if n not in POSTERIORS]
    if unknown:
        parser.error(f"unknown posteriors {unknown}; choose from {POSTERIORS}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        rows = benchmark(names, args, out)
        if args.out:
            (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(table(rows))


def benchmark(names: list[str], args: argparse.Namespace, out: Path) -> list[dict]:
    """Every posterior x seed: the variant's row and (with ``args.advi``) the baseline's."""
    steps = [f"train.steps={args.steps}"] if args.steps else []
    lrs = [float(v) for v in args.advi_lrs.split(",")]
    rows = []
    for name in names:
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            if args.auto:
                summary, wall, error = run_once(name, ["guide=auto", f"seed={seed}"],
                                                out / name / f"auto-s{seed}")
                rows.append(row(name, "auto", seed, summary, wall, error))
                _say(rows[-1])
            if args.recipe:
                sets = [*args.sets, *steps, f"seed={seed}"]
                summary, wall, error = run_once(name, sets, out / name / f"variant-s{seed}")
                guide = summary["recipe"]["guide"]["name"] if summary else "recipe"
                rows.append(row(name, guide, seed, summary, wall, error))
                _say(rows[-1])
            if not args.advi:
                continue
            before = len(CPU)
            lr, searched, notes = search_lr(name, seed, lrs, args.advi_search_steps,
                                            out / name)
            print(f"{name} seed {seed} ADVI search: " + "; ".join(notes), file=sys.stderr)
            if lr is None:
                CPU.append(sum(CPU[before:]))
                rows.append(row(name, "advi", seed, None, searched, "every step size failed"))
            else:
                sets = ["guide=auto_normal", f"optimizer.lr={lr}", *steps, f"seed={seed}"]
                summary, wall, error = run_once(name, sets, out / name / f"advi-s{seed}")
                CPU.append(sum(CPU[before:]))  # the search's runs and this one
                rows.append(row(name, f"advi (auto_normal, lr {lr:g})", seed, summary,
                                searched + wall, error))
            _say(rows[-1])
    return rows


def _say(entry: dict) -> None:
    print(json.dumps(entry), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
