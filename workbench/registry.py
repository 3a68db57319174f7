"""The plugin manager and the registry of components it collects.

Plugins are found through the ``vibench`` entry-point group, vibench's own first. Each is
loaded inside its own try, so a broken plugin is reported by name and the rest keep working.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterable

import pluggy

from workbench import hookspecs
from workbench.errors import UsageError, did_you_mean
from workbench.options import Option, read_options

# kind -> the hook that registers it; the kind is also the recipe section's name.
KINDS: dict[str, str] = {
    "model": "register_models",
    "dataset": "register_datasets",
    "guide": "register_guides",
    "loss": "register_losses",
    "optimizer": "register_optimizers",
    "optim_args": "register_optim_args",
    "schedule": "register_schedules",
}

# Factory parameters vibench fills in from the run instead of the recipe, per kind.
INJECTED: dict[str, frozenset[str]] = {
    "model": frozenset({"device"}),
    "dataset": frozenset({"device"}),
    "guide": frozenset({"device", "model"}),
    "loss": frozenset({"device"}),
    "optimizer": frozenset({"device", "optim_args"}),
    "optim_args": frozenset({"device", "defaults"}),
    "schedule": frozenset({"device", "optimizer", "steps"}),
}


@dataclass(frozen=True)
class Component:
    """A registered factory with what vibench knows of it."""

    kind: str
    name: str
    factory: Callable
    plugin: str
    description: str
    options: dict[str, Option]
    wants: frozenset[str] = frozenset()  # the injected parameters the factory takes
    open_options: bool = False  # the factory takes **kwargs

    def build(self, options: dict[str, Any], **context: Any) -> Any:
        """Call the factory with the recipe's options and the context values it asks for."""
        return self.factory(**options, **{name: context[name] for name in self.wants})


@dataclass(frozen=True)
class PluginProblem:
    """A plugin, or one thing it registered, that vibench had to leave out."""

    plugin: str
    where: str
    error: str

    def __str__(self) -> str:
        return f"plugin {self.plugin!r} ({self.where}): {self.error}"


@dataclass
class Registry:
    """Every component by kind and name, with the plugins that could not be used."""

    components: dict[str, dict[str, Component]] = field(
        default_factory=lambda: {kind: {} for kind in KINDS}
    )
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)
    problems: list[PluginProblem] = field(default_factory=list)

    def names(self, kind: str) -> list[str]:
        return sorted(self.components[kind])

    def get(self, kind: str, name: str) -> Component:
        """The component of that kind and name, or a UsageError saying what there is."""
        if (kind, name) in self.conflicts:
            plugins = " and ".join(repr(p) for p in self.conflicts[(kind, name)])
            raise UsageError(
                f"{kind} {name!r} is registered by both {plugins}; uninstall one of them"
            )
        try:
            return self.components[kind][name]
        except KeyError:
            pass
        hint = did_you_mean(name, self.components[kind], see=f"'vibench list {kind}'")
        if self.problems:
            hint += " (some plugins failed to load: see 'vibench list')"
        raise UsageError(f"unknown {kind} {name!r}; {hint}")

    def add(self, kind: str, name: Any, factory: Any, plugin: str) -> None:
        where = f"register_{kind} {name!r}"
        if not isinstance(name, str) or not name:
            self.problems.append(PluginProblem(plugin, where, "the name must be a non-empty string"))
            return
        if not callable(factory):
            self.problems.append(PluginProblem(plugin, where, f"{factory!r} is not callable"))
            return
        try:
            options, wants, open_options = read_options(factory, INJECTED[kind])
        except (TypeError, ValueError) as exc:
            self.problems.append(PluginProblem(plugin, where, f"cannot read its signature: {exc}"))
            return
        taken = self.components[kind].get(name)
        if taken is not None and taken.plugin == plugin:
            self.problems.append(PluginProblem(plugin, where, "registers this name twice"))
            return
        if taken is not None or (kind, name) in self.conflicts:
            owners = self.conflicts.setdefault((kind, name), [taken.plugin] if taken else [])
            owners.append(plugin)
            self.components[kind].pop(name, None)
            return
        doc = (factory.__doc__ or "").strip().splitlines()
        self.components[kind][name] = Component(
            kind, name, factory, plugin, doc[0] if doc else "", options, wants, open_options
        )


def make_plugin_manager() -> tuple[pluggy.PluginManager, list[PluginProblem]]:
    """A plugin manager with every installed plugin that loads and fits the hook specs."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    problems: list[PluginProblem] = []
    blocked = set(filter(None, os.environ.get("VIBENCH_DISABLE_PLUGINS", "").split(",")))
    eps = sorted(
        entry_points(group=hookspecs.PROJECT),
        key=lambda ep: (getattr(ep.dist, "name", "") != "vibench", ep.name),
    )
    for ep in eps:
        if ep.name in blocked:
            continue
        if pm.has_plugin(ep.name):
            owner = getattr(ep.dist, "name", "?")
            problems.append(PluginProblem(ep.name, f"entry point {ep.value}",
                                          f"another plugin has this name; {owner}'s is left out"))
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except (Exception, SystemExit) as exc:  # a broken plugin must not take vibench down
            problems.append(PluginProblem(ep.name, f"entry point {ep.value}", _describe(exc)))
    return pm, problems


def collect(pm: pluggy.PluginManager, problems: Iterable[PluginProblem] = ()) -> Registry:
    """Call each plugin's registration hooks in turn, recording which plugin gave what."""
    registry = Registry(problems=list(problems))
    while True:  # a hook name no spec knows is a plugin bug (a typo): drop that plugin
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            pm.unregister(exc.plugin)
            registry.problems.append(PluginProblem(name, "hooks", _describe(exc)))
    for kind, hook_name in KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            plugin = impl.plugin_name

            def register(name: str, factory: Callable, _kind=kind, _plugin=plugin) -> None:
                registry.add(_kind, name, factory, _plugin)

            given = {"register": register}
            unknown = [arg for arg in impl.argnames if arg not in given]
            if unknown:  # pluggy refuses these at registration; a hook never guesses
                registry.problems.append(PluginProblem(
                    plugin, hook_name, f"asks for {', '.join(map(repr, unknown))}, but a "
                                       "registration hook is given only 'register'"))
                continue
            try:
                impl.function(**{arg: given[arg] for arg in impl.argnames})
            except (Exception, SystemExit) as exc:
                registry.problems.append(PluginProblem(plugin, hook_name, _describe(exc)))
    return registry


@functools.lru_cache(maxsize=None)
def get_registry() -> Registry:
    """The registry of every installed plugin, loaded once per process."""
    return collect(*make_plugin_manager())


def _describe(exc: BaseException) -> str:
    """An exception on one line, as a warning or a listing shows it."""
    return f"{type(exc).__name__}: " + " ".join(str(exc).split())
