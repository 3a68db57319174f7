"""What the training loop does after each step besides the step: logging to TensorBoard,
Polyak-Ruppert averaging, early stopping. Each keeps its own state, which checkpoints save and
restore, so a resumed run's callbacks go on exactly as an uninterrupted run's would."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pyro
import torch

from workbench.report.gaussians import symmetric_kl
from workbench.seams import torch_optimizer
from workbench.train.loggers import Loggers


class Callback:
    """Called after every step (``loss`` is None for a bad step, which was not applied)."""

    stopped = False  # set to end training early

    def after_step(self, step: int, loss: float | None, log: Loggers) -> None:
        pass

    def on_train_end(self) -> None:
        """The last step is done (not called when the run stops on a failure or signal)."""

    def go_on(self) -> None:
        """A finished run was resumed to run longer."""

    @property
    def state_key(self) -> str:
        """The name of this callback's state in a checkpoint: its class's, unless two of a
        class could run together (then a subclass says what tells them apart)."""
        return type(self).__qualname__

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def summary(self) -> dict:
        """What this callback adds to summary.json."""
        return {}


def states(callbacks: list[Callback]) -> dict[str, dict]:
    """Every callback's state by its ``state_key``, for a checkpoint; two callbacks with one
    key would overwrite each other's, so that is a bug (a ValueError)."""
    found: dict[str, dict] = {}
    for callback in callbacks:
        if callback.state_key in found:
            raise ValueError(f"two callbacks share the state key {callback.state_key!r}")
        found[callback.state_key] = callback.state_dict()
    return found


def restore(callbacks: list[Callback], saved: dict) -> None:
    """Give each callback its state from a checkpoint's ``states``."""
    for callback in callbacks:
        callback.load_state_dict(saved.get(callback.state_key))


class MetricLogging(Callback):
    """``Eval/loss`` every ``eval_every`` steps, ``Params/*`` and ``LR/*`` every
    ``log_params_every`` steps (``Train/loss`` is the loop's own)."""

    def __init__(self, settings: dict, optim: Any, evaluate: Callable[[int], float] | None):
        self.eval_every = settings["eval_every"]
        self.params_every = settings["log_params_every"]
        self.optim = optim
        self.evaluate = evaluate

    def after_step(self, step: int, loss: float | None, log: Loggers) -> None:
        if self.evaluate is not None and (step + 1) % self.eval_every == 0:
            log.scalar("Eval/loss", self.evaluate(step), step)
        if self.params_every and step % self.params_every == 0:
            log_params(log, step, self.optim)


class Averaging(Callback):
    """Polyak-Ruppert averaging: the parameters' running mean over the steps after ``start``,
    which replace the parameters at the end."""

    def __init__(self, start: float):
        self.start = start
        self.count = 0
        self.params: dict[str, torch.Tensor] = {}

    def after_step(self, step: int, loss: float | None, log: Loggers) -> None:
        if loss is None or step + 1 <= self.start:
            return
        self.count += 1
        with torch.no_grad():
            for name, param in pyro.get_param_store().named_parameters():
                mean = self.params.get(name)
                if mean is None:
                    self.params[name] = param.detach().clone()
                else:
                    mean.add_(param.detach() - mean, alpha=1 / self.count)

    def on_train_end(self) -> None:
        with torch.no_grad():
            for name, param in pyro.get_param_store().named_parameters():
                if name in self.params:
                    param.copy_(self.params[name])

    def state_dict(self) -> dict:
        return {"count": self.count, "params": self.params}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.count = state["count"]
            self.params = {name: value.to(torch.get_default_device())
                           for name, value in state["params"].items()}

    def summary(self) -> dict:
        return {"averaged_steps": self.count}


class EarlyStopping(Callback):
    """Stop when the smoothed loss (an exponential moving average over about ``window``
    steps) has not improved by ``min_delta`` for ``patience`` steps."""

    def __init__(self, patience: int, window: int, min_delta: float):
        self.patience, self.window, self.min_delta = patience, window, min_delta
        self.ema: float | None = None
        self.best = math.inf
        self.since = 0

    def after_step(self, step: int, loss: float | None, log: Loggers) -> None:
        if loss is None:
            return
        self.ema = loss if self.ema is None else self.ema + 2 / (self.window + 1) * (
            loss - self.ema)
        if self.ema < self.best - self.min_delta:
            self.best, self.since = self.ema, 0
        else:
            self.since += 1
        self.stopped = self.since >= self.patience

    def go_on(self) -> None:
        self.since, self.stopped = 0, False

    def state_dict(self) -> dict:
        return {"ema": self.ema, "best": self.best, "since": self.since}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.ema, self.best, self.since = state["ema"], state["best"], state["since"]


class Converged(Callback):
    """``train.stop: converged``, after RAABBVI (Welandawe et al. 2022): run at a fixed step
    size until the iterates' average is settled, then lower the step size by ``lr_factor``,
    restart from that average and settle again; stop once two successive step sizes' averages
    agree. Settled: the symmetric KL divergence between the guide's Gaussians at the averages
    of the two halves of the last ``window`` iterates, per latent dimension, is below ``skl``
    (checked each quarter window); agree: the same divergence between the two averages. The
    parameters end as the last average (iterate averaging).

    Where the paper's split R-hat over iterates and the MCSE of their average decide when the
    iterates are stationary, this divergence does both in the posterior's own units: R-hat
    over Adam's iterates (autocorrelated over 10-20 steps, in 100 or more coordinates) stayed
    above 1.1 for 800 steps on posteriordb's nes, long after the average stopped moving. It
    sees how far the average moved within a window, not how far it has still to go: a fit
    crawling from a far start at a small step size can look settled (benchmarks/README.md). A
    normalizing flow is compared by its draws' marginal moments (``gaussians.sampled_gaussian``);
    a guide with neither, or a run without a guide to ask, falls back to that R-hat (every
    coordinate's, over the window cut into four chains, below ``rhat``) and one step size.
    """

    CHAINS = 4

    def __init__(self, window: int, skl: float, lr_factor: float, rhat: float,
                 guide: Any = None, scale_lr: Callable[[float], None] | None = None):
        self.window, self.skl, self.lr_factor, self.threshold = window, skl, lr_factor, rhat
        self.guide, self.scale_lr = guide, scale_lr
        self.iterates: list[torch.Tensor] = []
        self.previous: torch.Tensor | None = None  # the last step size's average
        self.result: torch.Tensor | None = None  # the average the parameters end as
        self.decreases = 0
        self.since = 0  # steps at the present step size
        self.checks: list[dict] = []
        self.rhat: float | None = None
        self.at: int | None = None
        self.averaged = False

    def after_step(self, step: int, loss: float | None, log: Loggers) -> None:
        if loss is None or self.stopped:
            return
        self.iterates.append(_flat_params())
        del self.iterates[:-self.window]
        self.since += 1
        if len(self.iterates) < self.window or self.since % max(1, self.window // 4):
            return
        iterates = torch.stack(self.iterates)
        half = self.window // 2
        halves = [self._gaussian(iterates[:half].mean(0)), self._gaussian(iterates[half:].mean(0))]
        if None in halves:
            self._by_rhat(iterates, step, log)
            return
        settled = symmetric_kl(*halves) / halves[0][0].numel()
        log.scalar("Train/converge_skl", settled, step)
        check = {"step": step + 1, "decreases": self.decreases, "halves_skl": settled}
        self.checks.append(check)
        if settled >= self.skl:
            return
        average = iterates.mean(0)
        if self.previous is not None:
            before, now = self._gaussian(self.previous), self._gaussian(average)
            check["step_sizes_skl"] = symmetric_kl(before, now) / now[0].numel()
            log.scalar("Train/converge_lr_skl", check["step_sizes_skl"], step)
            if check["step_sizes_skl"] < self.skl:
                self.stopped, self.at, self.result = True, step + 1, average
                return
        if self.lr_factor >= 1 or self.scale_lr is None:
            self.stopped, self.at, self.result = True, step + 1, average
            return
        self.previous, self.iterates, self.since = average, [], 0
        _write_flat(average)
        self.scale_lr(self.lr_factor)
        self.decreases += 1

    def _by_rhat(self, iterates: torch.Tensor, step: int, log: Loggers) -> None:
        """The fallback rule: R-hat over the window's iterates."""
        self.rhat = iterate_rhat(iterates, self.CHAINS)
        log.scalar("Train/iterate_rhat", self.rhat, step)
        if self.rhat < self.threshold:
            self.stopped, self.at, self.result = True, step + 1, iterates.mean(0)

    def _gaussian(self, flat: torch.Tensor) -> tuple | None:
        """The guide's Gaussian at the parameters ``flat`` (a flow's: its draws' marginal
        moments), or None if it has neither."""
        if self.guide is None:
            return None
        from workbench.report.gaussians import fitted_gaussian, sampled_gaussian

        now = _flat_params()
        _write_flat(flat)
        try:
            return (fitted_gaussian(self.guide, whole=True, diagonal=True)
                    or sampled_gaussian(self.guide))
        finally:
            _write_flat(now)

    def on_train_end(self) -> None:
        if self.result is None and len(self.iterates) >= max(1, self.window // 2):
            self.result = torch.stack(self.iterates).mean(0)
        elif self.result is None:
            self.result = self.previous
        if self.result is not None:
            self.averaged = True
            _write_flat(self.result)

    def go_on(self) -> None:
        self.stopped, self.at, self.result = False, None, None

    def state_dict(self) -> dict:
        return {"iterates": self.iterates, "rhat": self.rhat, "at": self.at,
                "averaged": self.averaged, "previous": self.previous, "result": self.result,
                "decreases": self.decreases, "checks": self.checks,
                "since": self.since}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            device = torch.get_default_device()
            self.iterates = [value.to(device) for value in state["iterates"]]
            self.rhat, self.at = state["rhat"], state["at"]
            self.averaged = state.get("averaged", False)
            self.previous, self.result = (None if state.get(key) is None else
                                          state[key].to(device) for key in ("previous", "result"))
            self.decreases = state.get("decreases", 0)
            self.checks = state.get("checks", [])
            self.since = state.get("since", len(self.iterates))
            self.stopped = self.at is not None

    def summary(self) -> dict:
        return {"converged": {"at_step": self.at, "window": self.window, "skl": self.skl,
                              "lr_factor": self.lr_factor, "lr_decreases": self.decreases,
                              "checks": self.checks[-8:], "iterate_rhat": self.rhat,
                              "averaged": self.averaged}}


def _flat_params() -> torch.Tensor:
    """Every parameter of the param store (unconstrained), in name order, as one vector."""
    values = [param.detach().reshape(-1)
              for _, param in sorted(pyro.get_param_store().named_parameters())]
    return torch.cat(values).clone() if values else torch.zeros(0)


def _write_flat(flat: torch.Tensor) -> None:
    """Set the param store's parameters from one vector in ``_flat_params``'s order."""
    with torch.no_grad():
        start = 0
        for _, param in sorted(pyro.get_param_store().named_parameters()):
            count = param.numel()
            param.copy_(flat[start:start + count].reshape(param.shape).to(param.dtype))
            start += count


def iterate_rhat(iterates: torch.Tensor, chains: int) -> float:
    """The largest R-hat (Gelman and Rubin's, without splitting) over the coordinates of
    ``iterates`` (steps x coordinates), its rows cut into ``chains`` consecutive chains; a
    coordinate that does not move counts as 1."""
    n = iterates.shape[0] // chains
    x = iterates[: n * chains].double().reshape(chains, n, -1)
    within = x.var(dim=1).mean(0)
    between = n * x.mean(dim=1).var(dim=0)
    moving = within > 0
    if not moving.any():
        return 1.0
    pooled = (n - 1) / n * within[moving] + between[moving] / n
    return float((pooled / within[moving]).sqrt().max())


def log_params(log: Loggers, step: int, optim: Any) -> None:
    """Each parameter of the param store, as a scalar or (for a tensor) a histogram, and the
    learning rate each parameter's optimizer uses now."""
    store = pyro.get_param_store()
    for name, value in store.items():
        value = value.detach()
        if value.numel() == 1:
            log.scalar(f"Params/{name}", value.item(), step)
        else:
            log.histogram(f"Params/{name}", value.float().cpu().numpy(), step)
    for param, optimizer in getattr(optim, "optim_objs", {}).items():
        groups = getattr(torch_optimizer(optimizer), "param_groups", None)
        if groups and "lr" in groups[0]:
            log.scalar(f"LR/{store.param_name(param)}", float(groups[0]["lr"]), step)
