"""Where the automatic pipeline's whole process spends its time, part by part (issue 22, item 1).

Per posterior, ``vibench run RECIPE --set guide=auto --threads 1`` (the shipped recipe, its
loggers included, as ``nuts.py`` runs it) under py-spy (``pip install py-spy``), sampled at
100 Hz without stopping the process (``--nonblocking``); each sample is put in one part by the
deepest frame of its stack that names one (an import under a part is that part's import, and
counts with it), and the table gives each part's seconds (samples / 100: the load stretches
them, so read the shares) and share. summary.json's ``auto.stages`` gives each stage's wall
time, but the gaussian stage holds the Laplace start, the mode searches, the step-size search,
the steps and each fit's report; here they are apart, and start-up and the answer's files too.

    pip install py-spy
    python benchmarks/pipeline_profile.py [--posteriors kilpisjarvi,garch11] [--out DIR]
    python benchmarks/pipeline_profile.py --raw DIR/kilpisjarvi.raw  # the table of a profile
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = {
    "kilpisjarvi": "packages/vibench-posteriordb/recipes/pdb_kilpisjarvi.yaml",
    "garch11": "packages/vibench-posteriordb/recipes/pdb_garch11.yaml",
    "diamonds": "packages/vibench-posteriordb/recipes/pdb_diamonds.yaml",
    "hmm_drive": "packages/vibench-posteriordb/recipes/pdb_hmm_drive.yaml",
    "hier_centred": "packages/vibench-hardcases/recipes/hard_hier_centred.yaml",
    "hier_logistic": "packages/vibench-hardcases/recipes/hard_hier_logistic.yaml",
    "funnel10": "packages/vibench-hardcases/recipes/hard_funnel10.yaml",
    "banana": "packages/vibench-hardcases/recipes/hard_banana.yaml",
    "student_t": "packages/vibench-hardcases/recipes/hard_student_t.yaml",
}
IMPORT = "_find_and_load (<frozen"
ANSWER = "answer_files (auto/pipeline.py"
# part -> frames that open it: "function (path suffix" as py-spy names a frame
PARTS = {
    "start-up: imports, CLI, plugins": ["run_recipe (workbench/service.py"],
    "the model traced (latent_dimension)": ["latent_dimension (auto/pipeline.py"],
    "Laplace start of fit 1": ["laplace_start (plugins/flow_transforms.py",
                               "initialise (plugins/laplace.py"],
    "mode searches (modes: 8)": ["search (plugins/modes.py"],
    "step-size searches (lr: auto)": ["adapt (train/stepsize.py"],
    "fits' steps": ["Run.train_steps (train/runner.py"],
    "fits' reports: PSIS, summary, posterior.nc": ["Run.report (train/runner.py"],
    "fits' plots": ["write_plots (report/plots.py"],
    "fits' set-up and results": ["Run.setup (train/runner.py", "Run.finish (train/runner.py"],
    "the answer: posterior.nc, plots, summary": [
        ANSWER, "assemble (auto/pipeline.py",
        "fitted_gaussian (report/gaussians.py", "_weighed (plugins/stages.py"],
}


def _opens(marker: str, frame: str) -> bool:
    function, _, path = marker.partition(" (")
    return frame.startswith(function + " (") and path in frame


def part(stack: list[str]) -> str:
    """The part of one sample: the deepest frame that opens a part, imports put with the part
    they happen under; all of the answer's files (its plots too) are the answer's."""
    if any(_opens(ANSWER, frame) for frame in stack):
        return "the answer: posterior.nc, plots, summary"
    found, depth = "other", -1
    for i, frame in enumerate(stack):
        if frame.startswith(IMPORT):  # an import counts with the part it happens under
            return "start-up: imports, CLI, plugins" if found == "other" else found
        for name, markers in PARTS.items():
            if i > depth and any(_opens(marker, frame) for marker in markers):
                found, depth = name, i
    return found


def table(raws: dict[str, Path]) -> str:
    """The markdown table of these py-spy raw profiles, one column each."""
    columns = {}
    for name, raw in raws.items():
        counts: collections.Counter = collections.Counter()
        record = ""
        for line in raw.read_text(errors="replace").splitlines():
            record += line  # a frame's name may hold a newline: a record ends with its count
            stack, _, samples = record.rpartition(" ")
            if samples.isdigit():
                counts[part(stack.split(";"))] += int(samples)
                record = ""
        columns[name] = counts
    lines = ["| part | " + " | ".join(raws) + " |", "|---|" + "---:|" * len(raws)]
    for name in [*PARTS, "other"]:
        cells = [f"{c[name] / 100:.1f} s ({c[name] / max(sum(c.values()), 1):.0%})"
                 for c in columns.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| whole process | " + " | ".join(
        f"{sum(c.values()) / 100:.1f} s" for c in columns.values()) + " |")
    return "\n".join(lines)


def profile(name: str, out: Path) -> Path:
    """py-spy's raw profile of the pipeline's whole process on ``name``."""
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("needs py-spy: pip install py-spy")
    raw = out / f"{name}.raw"
    command = [spy, "record", "--nonblocking", "-r", "100", "-f", "raw", "-o", str(raw), "--",
               sys.executable, "-m", "workbench", "run", str(REPO / RECIPES[name]),
               "--set", "guide=auto", "--threads", "1", "--out", str(out / f"run-{name}")]
    subprocess.run(command, check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return raw


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", default=",".join(RECIPES),
                        help=f"comma-separated, of {', '.join(RECIPES)}")
    parser.add_argument("--out", type=Path, default=None, help="profiles and run folders")
    parser.add_argument("--raw", type=Path, nargs="+", help="only the table of these profiles")
    args = parser.parse_args(argv)
    if args.raw:
        print(table({raw.stem: raw for raw in args.raw}))
        return 0
    names = args.posteriors.split(",")
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"unknown posterior {unknown[0]!r}; choose from {', '.join(RECIPES)}")
    out = args.out or Path(tempfile.mkdtemp(prefix="pipeline_profile_"))
    out.mkdir(parents=True, exist_ok=True)
    print(table({name: profile(name, out) for name in names}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
