"""The optimizer a recipe asks for: its per-parameter settings (Pyro's ``optim_args``), its
learning-rate schedule, and how the runner steps that schedule."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import pyro
import torch
from pyro.optim import PyroLRScheduler, PyroOptim
from pyro.optim.optim import _load_state_dict

from workbench.errors import UsageError, did_you_mean, one_line
from workbench.plugins.build import build
from workbench.plugins.registry import Component, Registry
from workbench.seams import no_dynamo_import, step_without_dynamo, torch_optimizer


def make_optimizers(optim: Any, params: list[torch.Tensor]) -> None:
    """Each parameter's torch optimizer, with any state ``set_state`` left waiting for it:
    Pyro's ``PyroOptim.__call__`` without its step (whose first call imports torch._dynamo,
    a second), so torch refuses bad settings at set-up and a compiled step finds the
    optimizers it updates."""
    store = pyro.get_param_store()
    with no_dynamo_import():
        for param in params:
            if param in optim.optim_objs:
                continue
            made = optim.optim_objs[param] = optim._get_optim(param)
            optim.grad_clip[param] = optim._get_grad_clip(param)
            state = optim._state_waiting_to_be_consumed.pop(store.param_name(param), None)
            if state is not None:
                _load_state_dict(made, state)


def step_optimizers(optim: Any, params: list[torch.Tensor]) -> None:
    """Pyro's ``PyroOptim.__call__``: each parameter's gradient clipped as its settings say,
    then its optimizer stepped, without importing torch._dynamo where nothing needs it."""
    if not isinstance(optim, PyroOptim):
        optim(params)
        return
    missing = [param for param in params if param not in optim.optim_objs]
    if missing:  # made once: make_optimizers opens a guard block, too much for every step
        make_optimizers(optim, missing)
    for param in params:
        if optim.grad_clip[param] is not None:
            optim.grad_clip[param](param)
        optimizer = torch_optimizer(optim.optim_objs[param])
        if isinstance(optimizer, torch.optim.Optimizer):
            step_without_dynamo(optimizer)
        else:
            optimizer.step()


def optimizer_state(optim: Any) -> dict:
    """Pyro's ``get_state`` (each parameter's optimizer state, by parameter name), for a
    checkpoint."""
    with no_dynamo_import():
        return optim.get_state()


class OptimArgs:
    """Pyro's per-parameter ``optim_args``: the optimizer's options, overridden by what the
    recipe's optim_args component (``source`` names it and its plugin) gives each parameter."""

    def __init__(self, defaults: dict, rules: Callable[[str], dict] | None,
                 optimizer: Component, where: str, source: str = ""):
        self.defaults = defaults
        self.rules = rules
        self.optimizer = optimizer
        self.where = where
        self.source = source

    def __call__(self, param_name: str) -> dict:
        return {**self.defaults, **(self._given(param_name) if self.rules else {})}

    def _given(self, param_name: str) -> dict:
        """What the rules give one parameter; a rule that fails or gives other than a mapping
        of settings is a bug in its plugin, which the error names."""
        try:
            given = self.rules(param_name)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{self.where}: {one_line(exc)}") from None
        except Exception as exc:
            raise UsageError(f"{self.where}: {self.source} failed on parameter {param_name!r} "
                             f"({type(exc).__name__}: {one_line(exc)}): a bug in that plugin"
                             ) from None
        if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
            raise UsageError(f"{self.where}: {self.source} gave parameter {param_name!r} "
                             f"{type(given).__name__} {given!r:.60}, not a mapping of settings: "
                             "a bug in that plugin")
        return dict(given)

    def check(self, param_names: list[str]) -> None:
        """Refuse rules that match no parameter, or settings the optimizer does not take."""
        if self.rules is None:
            return
        try:
            check = getattr(self.rules, "check", None)
            if check is not None:
                check(param_names)
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{self.where}: {exc}") from None
        given = {name: self._given(name) for name in param_names}
        for param, settings in given.items():
            for key, value in settings.items():
                option = self.optimizer.options.get(key)
                if option is None:
                    hint = did_you_mean(key, self.optimizer.options)
                    raise UsageError(
                        f"{self.where}: gives parameter {param!r} setting {key!r}, which "
                        f"optimizer {self.optimizer.name!r} does not take; {hint}"
                    )
                if not option.accepts(value):
                    raise UsageError(
                        f"{self.where}: gives parameter {param!r} {key}={value!r}; "
                        f"expected {option.type_name()}"
                    )


def make_optim_args(registry: Registry, section: dict, optimizer: Component,
                    device: torch.device) -> OptimArgs:
    defaults = {k: v for k, v in section.items() if k in optimizer.options}
    nested = section.get("optim_args")
    if not nested:
        return OptimArgs(defaults, None, optimizer, "optimizer.optim_args")
    rules = build(registry, "optim_args", nested, defaults=dict(defaults), device=device)
    component = registry.get("optim_args", nested["name"])
    return OptimArgs(defaults, rules, optimizer, "optimizer.optim_args",
                     f"optim_args {component.name!r} from {component.plugin!r}")


def make_optimizer(registry: Registry, recipe: dict, device: torch.device
                   ) -> tuple[Any, OptimArgs]:
    """The recipe's optimizer, wrapped in its schedule if it has one, and its optim_args."""
    section = recipe["optimizer"]
    optim_args = make_optim_args(registry, section, registry.get("optimizer", section["name"]),
                                 device)
    optimizer = build(registry, "optimizer", section, optim_args=optim_args, device=device)
    if section.get("schedule"):
        optimizer = build(registry, "schedule", section["schedule"], optimizer=optimizer,
                          steps=recipe["train"]["steps"], device=device)
        if not isinstance(optimizer, PyroLRScheduler):
            raise UsageError(f"schedule {section['schedule']['name']!r}: made "
                             f"{type(optimizer).__name__}, not a pyro.optim.PyroLRScheduler")
    return optimizer, optim_args


def schedule_stepper(optim: Any) -> Callable[[float], None] | None:
    """How to step a learning-rate schedule after each SVI step: with the step's loss when
    the torch scheduler's ``step`` needs one (ReduceLROnPlateau), else without."""
    if not isinstance(optim, PyroLRScheduler):
        return None
    parameters = list(inspect.signature(optim.pt_scheduler_constructor.step).parameters.values())
    if any(p.default is p.empty for p in parameters[1:]):
        return lambda loss: optim.step(loss)
    return lambda loss: optim.step()
