"""The optimizer a recipe asks for: its per-parameter settings (Pyro's ``optim_args``), its
learning-rate schedule, and how the runner steps that schedule."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from pyro.optim import PyroLRScheduler

from workbench.build import build
from workbench.errors import UsageError, did_you_mean
from workbench.registry import Component, Registry


def torch_optimizer(obj: Any) -> torch.optim.Optimizer:
    """The torch optimizer of one of a Pyro optim's per-parameter objects (``optim_objs``):
    the object itself, or the optimizer its learning-rate schedule wraps."""
    return getattr(obj, "optimizer", obj)


class OptimArgs:
    """Pyro's per-parameter ``optim_args``: the optimizer's options, overridden by what the
    recipe's optim_args component gives each parameter."""

    def __init__(self, defaults: dict, rules: Callable[[str], dict] | None,
                 optimizer: Component, where: str):
        self.defaults = defaults
        self.rules = rules
        self.optimizer = optimizer
        self.where = where

    def __call__(self, param_name: str) -> dict:
        return {**self.defaults, **(self.rules(param_name) if self.rules else {})}

    def check(self, param_names: list[str]) -> None:
        """Refuse rules that match no parameter, or settings the optimizer does not take."""
        if self.rules is None:
            return
        try:
            check = getattr(self.rules, "check", None)
            if check is not None:
                check(param_names)
            given = {name: self.rules(name) for name in param_names}
        except (ValueError, TypeError) as exc:
            raise UsageError(f"{self.where}: {exc}") from None
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
    rules = (build(registry, "optim_args", nested, defaults=dict(defaults), device=device)
             if nested else None)
    return OptimArgs(defaults, rules, optimizer, "optimizer.optim_args")


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
