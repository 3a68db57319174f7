"""The one table of component kinds: each kind's registration hook, the factory parameters
vibench fills in from the run, and where a recipe names a component of each kind. The
registry, the recipe checks, the CLI and the docs all read it."""

from __future__ import annotations

# kind -> the hook that registers it; the kind is also the recipe section's name.
KINDS: dict[str, str] = {
    "model": "register_models",
    "dataset": "register_datasets",
    "guide": "register_guides",
    "loss": "register_losses",
    "optimizer": "register_optimizers",
    "optim_args": "register_optim_args",
    "schedule": "register_schedules",
    "logger": "register_loggers",
    "stage": "register_stages",
}

# Factory parameters vibench fills in from the run instead of the recipe, per kind.
INJECTED: dict[str, frozenset[str]] = {
    "model": frozenset({"device"}),
    "dataset": frozenset({"device", "rows"}),
    "guide": frozenset({"device", "model"}),
    "loss": frozenset({"device"}),
    "optimizer": frozenset({"device", "optim_args"}),
    "optim_args": frozenset({"device", "defaults"}),
    "schedule": frozenset({"device", "optimizer", "steps"}),
    "logger": frozenset({"device", "run_dir", "start_step", "recipe"}),
    "stage": frozenset({"device"}),
}

# Kinds for which a function named by its place (``file.py:attr``) is the component itself,
# as Pyro writes models and guides; a class is a factory for every kind.
ITSELF = frozenset({"model", "guide"})

# Component sections by their path in the recipe, with the kind of component each names.
COMPONENTS: dict[tuple[str, ...], str] = {
    ("model",): "model",
    ("guide",): "guide",
    ("loss",): "loss",
    ("optimizer",): "optimizer",
    ("optimizer", "optim_args"): "optim_args",
    ("optimizer", "schedule"): "schedule",
    ("data", "dataset"): "dataset",
}
# Sections that list components of one kind, each item a name or a component section.
LISTS: dict[tuple[str, ...], str] = {("loggers",): "logger", ("auto", "stages"): "stage"}
