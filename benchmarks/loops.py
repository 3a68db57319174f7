"""Loop models against the compiled step's bound: per model, the torch operations one eager
step runs (what ``train.compile: auto`` weighs before tracing), eager steps per second, and
(``--compile``) the time and peak memory of compiling the step whole (``train.compile:
true``), or with ``--compile auto`` of what ``auto`` does with a long run (100,000 steps: its
loop rolled, workbench/compile/rolling.py), and the steps per second after it, each in a
child process under ``--limit`` seconds and ``--memory`` GB; ``auto``'s note follows the
table.

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/loops.py [--models lotka_volterra,...]
        [--compile [auto]] [--limit 300] [--memory 6]

Models: the loop models of benchmarks/loop_models.py, the posteriordb ports (``pdb_NAME``,
their shipped recipes) and the shipped recipes (``recipe:NAME``, e.g. ``recipe:coin``); a
model may carry overrides (``"pdb_diamonds|guide=auto_gaussian_flow"``)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))


def set_up(name: str, compile_setting):
    """A Run of model ``name`` (``NAME|KEY=VALUE|...``: with those ``--set`` overrides),
    set up with ``train.compile`` as given."""
    name, *sets = name.split("|")
    from workbench.config import recipe as recipes
    from workbench.plugins.registry import get_registry
    from workbench.train.runner import Run

    if name.startswith("pdb_"):
        source = REPO / "packages" / "vibench-posteriordb" / "recipes" / f"{name}.yaml"
        raw = recipes.load(source)
    elif name.startswith("recipe:"):
        source = REPO / "recipes" / f"{name[7:]}.yaml"
        raw = recipes.load(source)
    else:
        from loop_models import loop_recipe

        source, raw = REPO / "benchmarks" / "loops.yaml", loop_recipe(name)
    raw, overridden = recipes.apply_overrides(
        raw, [f"train.compile={str(compile_setting).lower()}", "train.eval_every=0",
              "loggers=[]", *sets])
    registry = get_registry()
    return Run.setup(recipes.resolve(raw, registry, str(source), overridden), registry)


def eager(name: str, seconds: float) -> dict:
    """Operations in one eager step and eager steps per second."""
    from workbench.compile import compiled_step

    run = set_up(name, False)
    _, ops = compiled_step._probe(run.svi, run.data)
    run.step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run.step()
        done += 1
    return {"ops": ops, "eager_per_s": done / (time.perf_counter() - start)}


def cpu_seconds() -> float:
    """CPU seconds of this process and its finished children (the C++ compiler)."""
    return sum(part for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
               for part in resource.getrusage(who)[:2])


def compiled(name: str, seconds: float, setting: str = "true") -> dict:
    """Set-up time with ``train.compile`` as ``setting`` (the compile), compiled steps per
    second, and (``auto``) the run's note on what it compiled."""
    start, cpu = time.perf_counter(), cpu_seconds()
    run = set_up(name + "|train.steps=100000" if setting == "auto" else name, setting)
    setup, cpu = time.perf_counter() - start, cpu_seconds() - cpu
    run.step()
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        run.step()
        done += 1
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return {"setup_s": setup, "setup_cpu_s": cpu,
            "compiled_per_s": done / (time.perf_counter() - start), "peak_gb": peak,
            "note": "; ".join(note for note in run.notes if "compiled" in note or "rolled" in note)}


def child(name: str, what: str, args) -> dict:
    """``what`` for ``name`` in a child process, bounded in time and address space."""
    limit = int(args.memory * 2**30)
    command = [sys.executable, __file__, "--child", what, "--models", name,
               "--seconds", str(args.seconds), *(["--compile", args.compile]
                                                 if args.compile else [])]

    def bound():
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.limit,
                              preexec_fn=bound)
    except subprocess.TimeoutExpired:
        return {f"{what}_error": f"over {args.limit} s"}
    if done.returncode:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1][:120]
        return {f"{what}_error": f"exit {done.returncode} after "
                                 f"{time.perf_counter() - start:.0f} s: {tail}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="lotka_volterra,hmm_forward,garch_loop,pdb_garch11,"
                        "pdb_hmm_drive,recipe:coin")
    parser.add_argument("--compile", nargs="?", const="true", choices=["true", "auto"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--memory", type=float, default=6.0)
    parser.add_argument("--child", choices=["eager", "compiled"])
    args = parser.parse_args()
    os.environ.setdefault("VIBENCH_COMPILE", "false")
    if args.child:
        if args.child == "eager":
            print(json.dumps(eager(args.models, args.seconds)))
        else:
            print(json.dumps(compiled(args.models, args.seconds, args.compile or "true")))
        return
    print("| model | ops / eager step | eager steps/s | compile s | compile CPU s | "
          "compiled steps/s | peak GB | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    notes = []
    for name in args.models.split(","):
        row = child(name, "eager", args)
        if args.compile:
            row.update(child(name, "compiled", args))
        speed = (f"{row['compiled_per_s'] / row['eager_per_s']:.0f}x"
                 if "compiled_per_s" in row and "eager_per_s" in row else "")
        cells = [row.get("ops", row.get("eager_error", "")),
                 f"{row['eager_per_s']:.1f}" if "eager_per_s" in row else "",
                 f"{row['setup_s']:.0f}" if "setup_s" in row else row.get("compiled_error", ""),
                 f"{row['setup_cpu_s']:.0f}" if "setup_cpu_s" in row else "",
                 f"{row['compiled_per_s']:.0f}" if "compiled_per_s" in row else "",
                 f"{row['peak_gb']:.1f}" if "peak_gb" in row else "", speed]
        print(f"| {name} | " + " | ".join(map(str, cells)) + " |", flush=True)
        if row.get("note"):
            notes.append(f"- {name}: {row['note']}")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
