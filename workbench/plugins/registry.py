"""The plugin manager and the registry of components it collects.

Plugins are found through the ``vibench`` entry-point group, vibench's own first. Each import
and each registration hook runs on its own, in a daemon thread under a time limit, with what
it prints to stdout moved to stderr: a plugin that raises, hangs or prints is reported by name
and the rest keep working.

A component may also be named by where its code is, ``path/to/file.py:attr`` or
``package.module:attr``, for a user's own model without a package: ``Registry.get`` imports it
(a file once per process) and reads it exactly as it reads a registered factory.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import inspect
import io
import keyword
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from workbench import environment, hookspecs
from workbench.config.kinds import INJECTED, ITSELF, KINDS
from workbench.config.options import Option, read_options
from workbench.errors import Interrupted, UsageError, did_you_mean

PLUGIN_TIMEOUT = 30.0  # seconds a plugin may take to import, or to run one registration hook
# Unless VIBENCH_PLUGIN_TIMEOUT is set, a plugin that has used next to no CPU (IDLE_SHARE of
# the time) for IDLE_S seconds is waiting on something, not working, and is left behind then.
IDLE_S = 3.0
IDLE_SHARE = 0.05


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
    note: str = ""  # why it takes no options, where an option given to it needs saying

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

    def get(self, kind: str, name: str, base: Path | None = None,
            code: Callable[[str], None] | None = None) -> Component:
        """The component of that kind and name, or a UsageError saying what there is; a name
        with a ``:`` is a file's or module's attribute, a relative file path taken from
        ``base`` (the recipe's directory; the working directory if None). ``code`` is called
        with such a name before its code is imported, and may refuse it by raising."""
        if (kind, name) in self.conflicts:
            plugins = " and ".join(repr(p) for p in self.conflicts[(kind, name)])
            raise UsageError(
                f"{kind} {name!r} is registered by both {plugins}; uninstall one of them"
            )
        try:
            return self.components[kind][name]
        except KeyError:
            pass
        if ":" in name:
            if code is not None:
                code(name)
            return locate(kind, name, base)
        if name.endswith(".py"):
            raise UsageError(f"unknown {kind} {name!r}; to use a file, name its function or "
                             f"class too: '{name}:{kind}'")
        hint = did_you_mean(name, self.components[kind], see=f"'vibench list {kind}'")
        if self.problems:
            hint += " (some plugins failed to load: see 'vibench list')"
        raise UsageError(f"unknown {kind} {name!r}; {hint}")

    def with_objects(self, objects: dict[tuple[str, str], Any],
                     source: str = "python") -> Registry:
        """A copy of this registry with Python objects added, ``(kind, name) -> object``, each
        read as ``locate`` reads a file's attribute: the Python API's session objects (a
        model function defined in a notebook), for one run."""
        scoped = Registry({kind: dict(found) for kind, found in self.components.items()},
                          dict(self.conflicts), list(self.problems))
        for (kind, name), value in objects.items():
            scoped.components[kind][name] = _component(kind, name, value, source, name)
        return scoped

    def add(self, kind: str, name: Any, factory: Any, plugin: str) -> None:
        where = f"register_{kind} {name!r}"
        if not isinstance(name, str) or not name:
            self.problems.append(PluginProblem(plugin, where,
                                               "the name must be a non-empty string"))
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
        self.components[kind][name] = Component(
            kind, name, factory, plugin, _description(factory.__doc__), options, wants,
            open_options
        )


def locate(kind: str, name: str, base: Path | None = None) -> Component:
    """The component ``path/to/file.py:attr`` or ``package.module:attr`` names, its name made
    absolute so that the run directory's recipe finds it from anywhere."""
    where, _, attr = name.rpartition(":")
    if "\0" in where:
        raise UsageError(f"{name!r}: a path cannot hold a NUL character")
    if not attr.isidentifier() or keyword.iskeyword(attr):
        raise UsageError(f"{name}: {attr!r} is not a Python name; expected "
                         "path/to/file.py:attr or package.module:attr")
    if where.endswith(".py"):
        path = (Path(base or ".") / Path(where).expanduser()).resolve()
        module, source, canonical = _import_file(path, where, name), str(path), f"{path}:{attr}"
    elif where and all(part.isidentifier() for part in where.split(".")):
        module, source, canonical = _import_module(where, name), where, name
    else:
        raise UsageError(f"{name}: expected a registered name, path/to/file.py:attr or "
                         "package.module:attr")
    return _component(kind, canonical, _attribute(module, attr, where, name), source, name)


# A file's module by its resolved path: a recipe's file is imported once per process.
_FILES: dict[Path, ModuleType] = {}


def _import_file(path: Path, shown: str, name: str) -> ModuleType:
    """Import a user's Python file under a module name of its own, as ``python file.py``
    would run it; any failure is one line naming the file."""
    if path in _FILES:
        return _FILES[path]
    if not path.exists():
        raise UsageError(f"{name}: no such file {shown} (looked for {path})")
    if not path.is_file():
        raise UsageError(f"{name}: {shown} is not a regular file")
    stem = re.sub(r"\W", "_", path.stem)
    module_name = f"vibench_file_{stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{name}: cannot import {shown}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # as for any import: dataclasses and pickle look here
    try:
        spec.loader.exec_module(module)
    except BaseException as exc:
        sys.modules.pop(module_name, None)
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"{name}: {_import_failure(exc, shown, str(path))}") from exc
    _FILES[path] = module
    return module


def _import_module(module: str, name: str) -> ModuleType:
    """Import an installed module (or one on PYTHONPATH); any failure is one line."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and (module == exc.name or module.startswith(exc.name + ".")):
            raise UsageError(f"{name}: no module named {exc.name!r} (is it installed, or its "
                             "directory on PYTHONPATH?)") from exc
        raise UsageError(f"{name}: {_import_failure(exc, module, None)}") from exc
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise UsageError(f"{name}: {_import_failure(exc, module, None)}") from exc


def _import_failure(exc: BaseException, shown: str, filename: str | None) -> str:
    """What went wrong importing ``shown``; for a user's file (``filename``), at which line."""
    if isinstance(exc, SyntaxError):
        where = shown if exc.filename == filename else exc.filename or shown
        return f"syntax error in {where} at line {exc.lineno}: {exc.msg}"
    lines = [f.lineno for f in traceback.extract_tb(exc.__traceback__) if f.filename == filename]
    at = f" at line {lines[-1]}" if lines else ""
    return f"importing {shown} raised {_describe(exc)}{at}"


def _attribute(module: ModuleType, attr: str, shown: str, name: str) -> Any:
    """The attribute a name points at, or a UsageError suggesting the module's public ones."""
    try:
        return getattr(module, attr)
    except AttributeError:
        public = [n for n, v in vars(module).items() if not n.startswith("_") and callable(v)]
        raise UsageError(f"{name}: no attribute {attr!r} in {shown}; "
                         f"{did_you_mean(attr, public)}") from None


def _component(kind: str, name: str, value: Any, source: str, shown: str) -> Component:
    """A file's or module's attribute as a component: a factory as a plugin would register
    it, or, for a model or guide, a function that is the component itself (no options)."""
    if not callable(value):
        raise UsageError(f"{shown}: not a function or class (it is {type(value).__name__})")
    if inspect.isbuiltin(value):  # os:system would run its data as a shell command
        raise UsageError(f"{shown}: a built-in function, not a {kind}: name Python code "
                         f"written as a {kind}")
    description = _description(inspect.getdoc(value))
    if kind in ITSELF and not inspect.isclass(value):
        note = (f"a function is the {kind} itself (its parameters are the data), so it takes "
                f"no options; to give it options, make it a class whose __init__ takes them")
        return Component(kind, name, functools.partial(_itself, value), source, description,
                         {}, note=note)
    try:
        options, wants, open_options = read_options(value, INJECTED[kind])
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{shown}: cannot read its signature: {exc}") from None
    settable = {key: option for key, option in options.items()
                if option.required or _plain(option.default)}
    return Component(kind, name, value, source, description, settable, wants, open_options)


def _description(doc: str | None) -> str:
    """A docstring's first paragraph on one line: a component's description (its first line
    alone would stop mid-sentence where the sentence goes on to the next)."""
    paragraph = re.split(r"\n\s*\n", inspect.cleandoc(doc or "").strip(), maxsplit=1)[0]
    return " ".join(paragraph.split())


def _plain(value: Any) -> bool:
    """Whether a default is data a recipe can hold; a parameter defaulting to an object (a
    function, a tensor) is no option, since the saved recipe could not give it back."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(map(_plain, value))
    return isinstance(value, dict) and all(
        isinstance(key, str) and _plain(item) for key, item in value.items())


def _itself(value: Any) -> Any:
    """The factory of a component that is its own: it returns it."""
    return value


def make_plugin_manager(loader: _Loader | None = None
                        ) -> tuple[pluggy.PluginManager, list[PluginProblem]]:
    """A plugin manager with every installed plugin that loads in time and fits the hook specs."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    problems: list[PluginProblem] = []
    blocked = set(filter(None, os.environ.get("VIBENCH_DISABLE_PLUGINS", "").split(",")))
    eps = sorted(
        entry_points(group=hookspecs.PROJECT),
        key=lambda ep: (getattr(ep.dist, "name", "") != "vibench", ep.name),
    )
    with _loading(loader) as loader:
        for ep in eps:
            if ep.name in blocked:
                continue
            where = f"entry point {ep.value}"
            if pm.has_plugin(ep.name):
                owner = getattr(ep.dist, "name", "?")
                problems.append(PluginProblem(
                    ep.name, where, f"another plugin has this name; {owner}'s is left out"))
                continue
            outcome = loader.call(ep.name, f"importing {ep.value}", ep.load)
            if outcome.timed_out:
                problems.append(PluginProblem(ep.name, where, (
                    f"did not finish importing {loader.overran_by(outcome)}, so vibench goes "
                    f"on without it; set VIBENCH_DISABLE_PLUGINS={ep.name} to skip it, or "
                    f"VIBENCH_PLUGIN_TIMEOUT to wait longer")))
                continue
            if outcome.error is not None:
                problems.append(PluginProblem(ep.name, where, _describe(outcome.error)))
                continue
            try:
                pm.register(outcome.value, name=ep.name)
            except Exception as exc:  # its hooks do not fit the specs
                problems.append(PluginProblem(ep.name, where, _describe(exc)))
    return pm, problems


def collect(pm: pluggy.PluginManager, problems: Iterable[PluginProblem] = (),
            loader: _Loader | None = None) -> Registry:
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
    stalled: set[str] = set()  # a plugin whose hook overran: its later hooks are not called
    with _loading(loader) as loader:
        for kind, hook_name in KINDS.items():
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                if impl.plugin_name in stalled:
                    continue
                if not _call_hook(loader, registry, kind, impl):
                    stalled.add(impl.plugin_name)
    return registry


def _call_hook(loader: _Loader, registry: Registry, kind: str, impl: pluggy.HookImpl) -> bool:
    """Call one plugin's registration hook and add what it registered; False if it overran."""
    plugin, hook_name = impl.plugin_name, KINDS[kind]
    added: list[tuple[Any, Any]] = []
    given = {"register": _recorder(added)}
    unknown = [arg for arg in impl.argnames if arg not in given]
    if unknown:  # pluggy refuses these at registration; a hook never guesses
        registry.problems.append(PluginProblem(
            plugin, hook_name, f"asks for {', '.join(map(repr, unknown))}, but a "
                               "registration hook is given only 'register'"))
        return True
    outcome = loader.call(plugin, hook_name,
                          lambda: impl.function(**{arg: given[arg] for arg in impl.argnames}))
    if outcome.timed_out:
        registry.problems.append(PluginProblem(plugin, hook_name, (
            f"did not return {loader.overran_by(outcome)}, so vibench goes on without this "
            f"hook and the plugin's later ones; set VIBENCH_DISABLE_PLUGINS={plugin} to skip "
            f"the plugin, or VIBENCH_PLUGIN_TIMEOUT to wait longer")))
        return False
    for name, factory in added:
        registry.add(kind, name, factory, plugin)
    if outcome.error is not None:
        registry.problems.append(PluginProblem(plugin, hook_name, _describe(outcome.error)))
    return True


def _recorder(into: list[tuple[Any, Any]]) -> Callable[[str, Callable], None]:
    """The ``register`` a hook is given: it only notes each call, for the registry to check
    once the hook has returned (a hook that overran may still call it, from its thread)."""

    def register(name: str, factory: Callable) -> None:
        into.append((name, factory))

    return register


@functools.cache
def get_registry() -> Registry:
    """The registry of every installed plugin, loaded once per process."""
    with _Loader() as loader:
        return collect(*make_plugin_manager(loader), loader=loader)


def _describe(exc: BaseException) -> str:
    """An exception on one line, as a warning or a listing shows it."""
    if isinstance(exc, KeyboardInterrupt):  # raised by the plugin itself: Ctrl-C stops loading
        return "raised KeyboardInterrupt, though no Ctrl-C was pressed"
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class LoadInterrupted(Interrupted):
    """A stop signal while a plugin was loading."""


@dataclass
class _Outcome:
    """What one call into a plugin came to: its value, or the exception it raised, or neither
    because it was still running when its time was up."""

    value: Any = None
    error: BaseException | None = None
    timed_out: bool = False
    idle: bool = False  # left behind for using no CPU, not for the time limit


class _Loader:
    """Calls into plugins one at a time, each in a daemon thread under the time limit, while
    standing in for sys.stdout so that what a plugin prints goes to stderr, never to stdout."""

    def __init__(self) -> None:
        self.limit = plugin_timeout()
        self.idle_s = None if os.environ.get("VIBENCH_PLUGIN_TIMEOUT", "").strip() else IDLE_S
        self.tracing = bool(os.environ.get("VIBENCH_TRACE_PLUGINS"))
        self.stdout = _RoutedStdout(sys.stdout)
        self.overran: list[threading.Thread] = []
        self.saved_fd: int | None = None  # file descriptor 1 while it points at stderr
        self.done = False

    def __enter__(self) -> _Loader:
        """Stand in for sys.stdout, and point file descriptor 1 at stderr: what a plugin's
        child process or C code writes there never reaches vibench's output either."""
        sys.stdout = self.stdout
        try:
            self.stdout.real.flush()
            self.saved_fd = os.dup(1)
            os.dup2(2, 1)
        except (OSError, ValueError):  # no descriptor 1 or 2 (an embedding host): leave it
            self.saved_fd = None
        return self

    def __exit__(self, *exc_info: Any) -> None:
        """Give file descriptor 1 back, and stdout, unless a plugin that overran could still
        print to it: then its thread gives stdout back when it ends."""
        if self.saved_fd is not None:
            with contextlib.suppress(OSError, ValueError):
                self.stdout.real.flush()
            os.dup2(self.saved_fd, 1)
            os.close(self.saved_fd)
            self.saved_fd = None
        self.done = True
        self._give_back_stdout()

    def _give_back_stdout(self) -> None:
        others = [t for t in self.overran if t is not threading.current_thread()]
        if self.done and sys.stdout is self.stdout and not any(t.is_alive() for t in others):
            sys.stdout = self.stdout.real

    def call(self, plugin: str, what: str, function: Callable[[], Any]) -> _Outcome:
        """Run ``function`` for ``plugin`` and wait for it at most ``limit`` seconds."""
        outcome, printed = _Outcome(), io.StringIO()
        self.trace(f"plugin {plugin!r}: {what} ...")
        started = time.perf_counter()
        thread = self._thread(plugin, function, outcome, printed)
        outcome.timed_out = not self._wait(thread, f"plugin {plugin!r} ({what})", outcome)
        self.trace(f"plugin {plugin!r}: {what}: {_result(outcome, self.limit)} "
                   f"({time.perf_counter() - started:.3f} s)")
        if printed.getvalue():
            _warn(f"plugin {plugin!r} printed to stdout while {what}, but stdout is kept for "
                  f"vibench's own output (a plugin should write to stderr); it printed: "
                  f"{_clip(printed.getvalue())}")
        return outcome

    def _thread(self, plugin: str, function: Callable[[], Any], outcome: _Outcome,
                printed: io.StringIO) -> threading.Thread:
        """A daemon thread, not started yet, to run ``function`` into ``outcome``, what it
        prints to ``printed``."""

        def target() -> None:
            self.stdout.routes.setdefault(threading.get_ident(), printed)
            try:
                outcome.value = function()
            except BaseException as exc:  # even SystemExit or KeyboardInterrupt: the plugin's
                outcome.error = exc
            finally:  # a plugin that overran, ending after loading did
                self._give_back_stdout()

        return threading.Thread(target=target, name=f"vibench {plugin}", daemon=True)

    def overran_by(self, outcome: _Outcome) -> str:
        """How a call into a plugin ended, in words: why it was left behind, if it was."""
        if outcome.idle:
            return (f"and used no CPU for {self.idle_s:g} s (it waits on something: a "
                    "network, a lock, a sleep)")
        return f"within {self.limit:g} s"

    def _wait(self, thread: threading.Thread, doing: str, outcome: _Outcome) -> bool:
        """Start a plugin's thread and wait out the time limit for it, or less if it sits
        idle; False, its later output dropped, if it is still running. Ctrl-C here is the
        user's (a plugin's own is raised in its thread), from the thread's start on: a busy
        machine can run the plugin's first lines before ``start`` returns."""
        try:
            thread.start()
            outcome.idle = _join(thread, self.limit, self.idle_s)
        except KeyboardInterrupt as exc:
            raise LoadInterrupted(f"interrupted while loading {doing}",
                                  getattr(exc, "signum", signal.SIGINT)) from None
        finally:
            done = not thread.is_alive()
            if done:
                self.stdout.routes.pop(thread.ident, None)
            else:
                self.stdout.routes[thread.ident] = _Discard()
                self.overran.append(thread)
        return done

    def trace(self, line: str) -> None:
        """With VIBENCH_TRACE_PLUGINS set, say on stderr what each plugin is doing."""
        if self.tracing:
            print(f"trace: {line}", file=sys.stderr, flush=True)


def _loading(loader: _Loader | None) -> contextlib.AbstractContextManager[_Loader]:
    """The loader to use: the one given, already in charge, or a new one."""
    return contextlib.nullcontext(loader) if loader is not None else _Loader()


class _RoutedStdout:
    """sys.stdout while plugins load: each plugin thread's writes go where ``routes`` says,
    everyone else's to the real stdout."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.routes: dict[int | None, Any] = {}  # thread id -> where its writes go

    def write(self, text: str) -> int:
        return self.routes.get(threading.get_ident(), self.real).write(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


class _Discard:
    """Where a plugin that overran its time writes: nowhere."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def plugin_timeout() -> float:
    """Seconds a plugin may take to import or to run one hook: VIBENCH_PLUGIN_TIMEOUT, if set.
    A bad value is a warning, not an error: every command loads the plugins, ``--help`` too."""
    try:
        return environment.seconds("VIBENCH_PLUGIN_TIMEOUT", PLUGIN_TIMEOUT)
    except UsageError as exc:
        _warn(f"{exc}; using {PLUGIN_TIMEOUT:g}")
        return PLUGIN_TIMEOUT


def _join(thread: threading.Thread, limit: float, idle_s: float | None) -> bool:
    """Wait for ``thread`` at most ``limit`` seconds, or until it has used less than
    IDLE_SHARE of the last ``idle_s`` seconds in CPU time (it blocks); True if cut short so."""
    clock = _cpu_clock(thread)
    started = time.monotonic()
    first = _cpu_seconds(clock)
    if idle_s is None or first is None:
        thread.join(limit)
        return False
    marks = [(started, first)]  # (wall, the thread's CPU) every slice
    while thread.is_alive() and marks[-1][0] - started < limit:
        thread.join(min(0.25, limit - (marks[-1][0] - started)))
        used = _cpu_seconds(clock)
        if used is None:  # the thread ended between the join and the reading
            thread.join(max(0.0, limit - (time.monotonic() - started)))
            return False
        now = (time.monotonic(), used)
        marks.append(now)
        before = [m for m in marks if m[0] <= now[0] - idle_s]
        if thread.is_alive() and before and now[1] - before[-1][1] < IDLE_SHARE * idle_s:
            return True
    return False


def _cpu_clock(thread: threading.Thread) -> int | None:
    """The clock of a thread's CPU time, where the platform has one."""
    try:
        return time.pthread_getcpuclockid(thread.ident)  # type: ignore[arg-type]
    except (AttributeError, OSError, TypeError):
        return None


def _cpu_seconds(clock: int | None) -> float | None:
    """A thread's CPU seconds so far; None where there is no clock or the thread has ended
    (its clock is then invalid: EINVAL)."""
    if clock is None:
        return None
    try:
        return time.clock_gettime(clock)
    except OSError:
        return None


def _result(outcome: _Outcome, limit: float) -> str:
    """How a call into a plugin ended, for the trace."""
    if outcome.idle:
        return "idle (no CPU used), left behind"
    if outcome.timed_out:
        return f"still running after {limit:g} s, left behind"
    if outcome.error is not None:
        return _describe(outcome.error)
    return "done"


def _clip(text: str, limit: int = 300) -> str:
    """Text a plugin printed, on one line and not too long."""
    shown = repr(text.strip())
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def _warn(line: str) -> None:
    print(f"warning: {line}", file=sys.stderr, flush=True)
