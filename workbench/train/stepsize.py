"""``optimizer: {lr: auto}``: pick the step size by a short trial of each candidate, as Stan's
ADVI adapts eta (Kucukelbir et al. 2017, sec. 3.3): from the largest candidate down, each
trial starts from the same parameters and runs a few steps; the one whose loss over the second
half of its trial is lowest wins, and the search stops at the first candidate worse than the
best so far. The trials' parameters are thrown away: the run starts where they did.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from workbench.config.recipe import AUTO

CANDIDATES = (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001)
TRIAL_STEPS = 30


def wanted(recipe: dict) -> bool:
    """Whether a checked recipe asks for the step-size search."""
    return recipe["optimizer"].get("lr") == AUTO


def placeholder(recipe: dict) -> dict:
    """The recipe with a number for ``lr auto`` (the first candidate), so that its optimizer
    can be built; ``adapt`` puts the chosen step size in its place."""
    recipe = copy.deepcopy(recipe)
    recipe["optimizer"]["lr"] = CANDIDATES[0]
    return recipe


def adapt(run: Any, candidates: tuple[float, ...] = CANDIDATES,
          steps: int = TRIAL_STEPS) -> dict:
    """Search the step size for a ``Run`` set up uncompiled (``Run.setup(..., compile=False)``:
    a compiled step holds its optimizer) and give its optimizer the winner, then compile as
    train.compile asks; returns ``{"lr": chosen, "trials": {lr: mean loss or None}}`` and
    notes it on the run."""
    import pyro
    import torch

    from workbench.device import run_context
    from workbench.train.optim import make_optimizers, schedule_stepper

    store = pyro.get_param_store()
    params = [param for _, param in store.named_parameters()]
    start = [param.detach().clone() for param in params]
    svi, trials, best = run.svi, {}, None  # each trial swaps in its own optimizer
    with run_context(run.device, run.dtype):
        for lr in sorted(candidates, reverse=True):
            svi.optim = _optimizer(run, lr)
            losses = []
            try:
                for _ in range(steps):
                    loss, bad = run.step()
                    losses.append(loss if not bad else math.inf)
            except Exception:  # a step size the model cannot take: a failed candidate
                losses.append(math.inf)
            tail = losses[len(losses) // 2:]
            score = sum(tail) / len(tail)
            trials[lr] = score if math.isfinite(score) else None
            with torch.no_grad():
                for param, value in zip(params, start):
                    param.copy_(value)
            if trials[lr] is not None and (best is None or score < trials[best]):
                best = lr
            elif best is not None:
                break
        if best is None:
            from workbench.errors import RunError

            raise RunError("optimizer.lr auto: every step size tried gave a non-finite loss "
                           f"({', '.join(f'{lr:g}' for lr in trials)})")
        run.recipe["optimizer"]["lr"] = best
        optimizer = _optimizer(run, best)
        make_optimizers(optimizer, params)
        svi.optim = optimizer
        run.schedule = schedule_stepper(optimizer)
        run.compile_step()  # the run was set up uncompiled: the trials run eagerly
    tried = ", ".join(f"{lr:g}: " + ("failed" if value is None else f"{value:.4g}")
                      for lr, value in trials.items())
    run.notes.append(f"optimizer.lr auto: {best:g} (mean loss over the second half of "
                     f"{steps} trial steps: {tried})")
    return {"lr": best, "trials": trials, "steps": steps}


def _optimizer(run: Any, lr: float) -> Any:
    from workbench.train.optim import make_optimizer

    recipe = {**run.recipe, "optimizer": {**run.recipe["optimizer"], "lr": lr}}
    return make_optimizer(run.registry, recipe, run.device)[0]
