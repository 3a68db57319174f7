"""What logging costs a compiled step: ms per step of vibench's own training loop
(``Run.fit``: the step, ``Train/loss``, the callbacks) with the default loggers and callbacks
against none, and where the difference goes.

Per posterior, in this process: the shipped posteriordb recipe is set up once, compiled
(``train.compile: true``), and its loop run for ``--steps`` steps under each configuration
below, the configurations taking turns ``--repeats`` times (medians). Checkpoints are left
out (the loop's ``save`` does nothing here) and so are set-up and the report.

- ``none``: no logger, no evaluation, no parameter summaries: the step alone
- ``tensorboard``: ``Train/loss`` to TensorBoard each step
- ``csv``: ``Train/loss`` to metrics.csv each step
- ``+params every N``: TensorBoard and the parameter summaries every N steps (the default's
  ``log_params_every``, and 10)
- ``+eval every 100``: TensorBoard and ``Eval/loss`` every 100 steps
- ``default``: what a run gets: TensorBoard, and evaluation and parameter summaries as
  ``train.eval_every`` and ``train.log_params_every`` default
- ``eval_every 100, log_params_every 10``: the defaults before they were made sparser

    OMP_NUM_THREADS=1 python benchmarks/logging_cost.py [--posteriors kilpisjarvi,diamonds,garch11]
        [--steps 2000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "packages" / "vibench-posteriordb" / "recipes"


def setup(posterior: str):
    """The shipped recipe's run, compiled."""
    from workbench.config import recipe as recipes
    from workbench.plugins.registry import get_registry
    from workbench.train.runner import Run

    source = RECIPES / f"pdb_{posterior}.yaml"
    raw, overridden = recipes.apply_overrides(recipes.load(source), ["train.compile=true"])
    return Run.setup(recipes.resolve(raw, get_registry(), str(source), overridden),
                     get_registry())


def configurations(train: dict) -> dict[str, tuple[list[str], int, int]]:
    """name -> (loggers, eval_every, log_params_every)."""
    evals, params = train["eval_every"], train["log_params_every"]
    return {"none": ([], 0, 0), "tensorboard": (["tensorboard"], 0, 0), "csv": (["csv"], 0, 0),
            f"+params every {params}": (["tensorboard"], 0, params),
            "+params every 10": (["tensorboard"], 0, 10),
            "+eval every 100": (["tensorboard"], 100, 0),
            f"default (eval_every {evals}, log_params_every {params})":
                (["tensorboard"], evals, params),
            "eval_every 100, log_params_every 10": (["tensorboard"], 100, 10)}


def loop_ms(run, loggers: list[str], eval_every: int, params_every: int,
            steps: int) -> tuple[float, float]:
    """CPU and wall ms per step of ``Run.fit`` over ``steps`` steps, the loggers closed
    (flushed) inside."""
    from workbench import signals
    from workbench.plugins.registry import get_registry
    from workbench.train.callbacks import MetricLogging
    from workbench.train.loggers import Loggers
    from workbench.train.runner import TrainState

    settings = {**run.recipe["train"], "eval_every": eval_every,
                "log_params_every": params_every, "steps": steps}
    run.recipe["train"] = settings
    with tempfile.TemporaryDirectory() as folder:
        log = Loggers.of(get_registry(), {"loggers": [{"name": n} for n in loggers]},
                         Path(folder), 0)
        callbacks = [MetricLogging(settings, run.svi.optim,
                                   run.evaluate if eval_every else None)]
        cpu, wall = time.process_time(), time.perf_counter()
        run.fit(TrainState(), callbacks, log, signals.StopRequest(), None, lambda: None)
        log.close()
        return ((time.process_time() - cpu) / steps * 1000,
                (time.perf_counter() - wall) / steps * 1000)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", default="kilpisjarvi,diamonds,garch11")
    parser.add_argument("--steps", type=int, default=2000, help="steps per timed loop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import pyro
    import torch

    print(f"ms per compiled step in Run.fit (CPU time of this process, which a busy machine "
          f"disturbs less than wall time), medians of {args.repeats} alternated loops of "
          f"{args.steps} steps; {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"pyro {pyro.__version__}\n")
    for posterior in args.posteriors.split(","):
        pyro.clear_param_store()
        run = setup(posterior)
        if run.compiled is None:
            print(f"{posterior}: not compiled ({'; '.join(run.notes)})\n")
            continue
        train = copy.deepcopy(run.recipe["train"])
        configs = configurations(train)
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
        loop_ms(run, [], 0, 0, min(200, args.steps))  # warm
        for repeat in range(args.repeats):
            names = list(configs)[repeat % len(configs):] + list(configs)[:repeat % len(configs)]
            for name in names:
                times[name].append(loop_ms(run, *configs[name], args.steps))
        print(f"{posterior} (eval_every {train['eval_every']}, log_params_every "
              f"{train['log_params_every']})\n\n| loop | CPU ms/step | min-max | over none | "
              "wall ms/step |\n|---|---:|---|---:|---:|")
        base = statistics.median(cpu for cpu, _ in times["none"])
        for name, found in times.items():
            cpus = [cpu for cpu, _ in found]
            median = statistics.median(cpus)
            print(f"| {name} | {median:.3f} | {min(cpus):.3f}-{max(cpus):.3f} | "
                  f"{(median - base) / base:+.0%} | "
                  f"{statistics.median(wall for _, wall in found):.3f} |")
        print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
