"""``optimizer: {lr: auto}``: pick the step size by a short trial of each candidate, as Stan's ADVI
adapts eta (Kucukelbir et al. 2017, sec. 3.3): from the largest candidate down, each trial starts
from the same parameters and runs a few steps, and a smaller step size wins only where its mean loss
over the second half of its trial is lower than the best so far by more than ``SEPARATION`` standard
errors of the difference; the search stops at the first candidate that is not. Near a mode the
losses of every candidate agree up to their noise, and the smallest step size would win by chance:
its fits then barely move from where they start, and a stop that waits for the loss to settle takes
that for convergence. The winner's trial is kept: the run goes on from its parameters and its
optimizer's state, as a run at that step size would be after those steps; the others' are thrown
away. The run's step count is the recipe's, after the search (its trial steps are said in the note,
as the losers' are).
"""

from __future__ import annotations

import copy
import math
from typing import Any

from workbench.config.recipe import AUTO

CANDIDATES = (0.1, 0.03, 0.01, 0.003, 0.001, 0.0003, 0.0001)
TRIAL_STEPS = 30
SEPARATION = 2.0


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
    """Search the step size for a ``Run`` set up uncompiled (``Run.setup(..., compile=False)``)
    and give its optimizer the winner; returns ``{"lr": chosen, "trials": {lr: mean loss or
    None}}`` and notes it on the run. The step is compiled as train.compile asks before the
    trials, which run on it where it is (the step size is an input of a compiled step)."""
    import pyro
    import torch

    from workbench.device import run_context
    from workbench.train.optim import schedule_stepper

    store = pyro.get_param_store()
    params = [param for _, param in store.named_parameters()]
    start = [param.detach().clone() for param in params]
    trials, errors, best = {}, {}, None
    kept: tuple = ()  # the best trial's parameters, optimizer and its state, to go on from
    with run_context(run.device, run.dtype):
        run.compile_step()  # with the optimizer set up; each trial's takes its state over
        for lr in sorted(candidates, reverse=True):
            run.use_optimizer(_optimizer(run, lr))
            trials[lr], errors[lr] = _trial(run, steps)
            better = trials[lr] is not None and (best is None or beats(
                (trials[lr], errors[lr]), (trials[best], errors[best])))
            with torch.no_grad():
                if better:
                    best, kept = lr, ([param.detach().clone() for param in params],
                                      run.svi.optim, _state(run.svi.optim))
                for param, value in zip(params, start):
                    param.copy_(value)
            if not better and best is not None:
                break
        if best is None:
            from workbench.errors import RunError

            raise RunError("optimizer.lr auto: every step size tried gave a non-finite loss "
                           f"({', '.join(f'{lr:g}' for lr in trials)})")
        run.recipe["optimizer"]["lr"] = best
        values, optimizer, state = kept
        with torch.no_grad():
            for param, value in zip(params, values):
                param.copy_(value)
        _restore(optimizer, state)  # a compiled step's later trials wrote over the tensors
        run.use_optimizer(optimizer)
        run.schedule = schedule_stepper(optimizer)
    tried = ", ".join(f"{lr:g}: " + ("failed" if value is None else f"{value:.4g}")
                      for lr, value in trials.items())
    run.notes.append(f"optimizer.lr auto: {best:g} (mean loss over the second half of "
                     f"{steps} trial steps: {tried}); the run goes on from its {steps} trial "
                     "steps")
    return {"lr": best, "trials": trials, "steps": steps}


def beats(smaller: tuple[float, float], best: tuple[float, float]) -> bool:
    """Whether a smaller step size's trial (its mean loss and that mean's standard error)
    beats the best larger one's: lower by more than SEPARATION standard errors of the
    difference."""
    return smaller[0] < best[0] - SEPARATION * math.hypot(smaller[1], best[1])


def _state(optim: Any) -> dict:
    """A copy of each parameter's optimizer state (a compiled step's update writes it in
    tensors it shares with every optimizer it is given)."""
    import torch

    from workbench.seams import torch_optimizer

    copies = {}
    for param, made in optim.optim_objs.items():
        state = torch_optimizer(made).state.get(param, {})
        copies[param] = {key: value.detach().clone() if torch.is_tensor(value) else value
                         for key, value in state.items()}
    return copies


def _restore(optim: Any, copies: dict) -> None:
    """Give ``optim``'s optimizers the state ``_state`` copied, as their own tensors."""
    from workbench.seams import torch_optimizer

    for param, state in copies.items():
        torch_optimizer(optim.optim_objs[param]).state[param] = dict(state)


def _trial(run: Any, steps: int) -> tuple[float | None, float]:
    """``steps`` steps of the run with the optimizer it holds: the mean loss over their second
    half (None where a step was bad or failed: a step size the model cannot take) and its
    standard error."""
    losses = []
    try:
        for _ in range(steps):
            loss, bad = run.step()
            losses.append(loss if not bad else math.inf)
    except Exception:
        losses.append(math.inf)
    tail = losses[len(losses) // 2:]
    score = sum(tail) / len(tail)
    if not math.isfinite(score):
        return None, math.inf
    spread = sum((loss - score) ** 2 for loss in tail) / max(len(tail) - 1, 1)
    return score, math.sqrt(spread / len(tail))


def _optimizer(run: Any, lr: float) -> Any:
    from workbench.train.optim import make_optimizer

    recipe = {**run.recipe, "optimizer": {**run.recipe["optimizer"], "lr": lr}}
    return make_optimizer(run.registry, recipe, run.device)[0]
