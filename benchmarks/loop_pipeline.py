"""The automatic pipeline on a loop model of benchmarks/loop_models.py, given the model and
data only (``workbench.fit``, one thread): its whole time, each stage's, and the answer's
means, so that a change to what the pipeline compiles or searches can be timed and checked
for the same answer.

    OMP_NUM_THREADS=1 python benchmarks/loop_pipeline.py [--models lotka_volterra] [--out DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lotka_volterra")
    parser.add_argument("--out", type=Path, default=None, help="the run folders")
    args = parser.parse_args(argv)
    from loop_models import loop_recipe

    import workbench

    out = args.out or Path(tempfile.mkdtemp(prefix="loop-pipeline-"))
    for name in args.models.split(","):
        recipe = loop_recipe(name)
        for section in ("guide", "loss", "optimizer", "train"):  # the pipeline chooses
            recipe.pop(section)
        start = time.perf_counter()
        fit = workbench.fit(recipe, out=out / name, threads=1, progress=False)
        wall = time.perf_counter() - start
        summary = fit.summary
        stages = ", ".join(f"{stage['stage']} {stage['seconds']:.1f} s"
                           for stage in summary["auto"]["stages"])
        print(f"{name}: {wall:.1f} s in workbench.fit ({stages}); {fit.verdict}")
        for site, moments in summary["posterior"].items():
            print(f"  {site}: mean {[round(m, 8) for m in _flat(moments['mean'])]}")
    return 0


def _flat(value) -> list[float]:
    return [x for item in value for x in _flat(item)] if isinstance(value, list) else [value]


if __name__ == "__main__":
    sys.exit(main())
