"""Recipes: read the YAML, apply ``--set`` overrides, and check the whole recipe at once.

A checked recipe is a plain dict in which every component section holds its name and all of
its options, defaults filled in: it is what a run saves, and what reproduces the run.
"""

from __future__ import annotations

import copy
import os
import re
import stat
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

from workbench.config.kinds import COMPONENTS, LISTS
from workbench.config.options import Option
from workbench.errors import RecipeError, UsageError, did_you_mean, one_line

if TYPE_CHECKING:  # the registry is handed in; config sits below the plugins
    from workbench.plugins.registry import Registry

DEFAULT_LOGGERS = ["tensorboard"]
SECTIONS = ("name", "seed", "device", "dtype", "data", "model", "guide", "loss", "optimizer",
            "train", "loggers", "auto")
AUTO = "auto"  # the guide name (or a missing guide) that asks for the automatic pipeline
# The automatic pipeline's stages when the recipe lists none (plugins/stages.py).
DEFAULT_STAGES = ["start", "gaussian", "rhat", "psis", "hmc", "flow"]
STOPS = ("converged",)  # train.stop: how a run may end before train.steps
TRAIN: dict[str, Option] = {
    option.name: option
    for option in (
        Option("steps", 1000, int),
        Option("eval_every", 0, int),  # 0: never evaluate (Train/loss estimates it each step)
        Option("log_params_every", 500, int),  # 0: only at the end
        Option("batch_size", None, int | None),  # subsample one plate of the model each step
        Option("subsample_plate", None, str | None),  # which, when the model has several
        Option("checkpoint_every", 500, int),  # 0: only at the end, on Ctrl-C and on failure
        Option("skip_bad_steps", 0, int),  # steps with a non-finite loss or gradient to skip
        Option("average_last", None, float | None),  # Polyak-Ruppert: average this fraction
        Option("early_stop_patience", 0, int),  # 0: never stop early
        Option("early_stop_window", 100, int),  # steps the smoothed loss averages over
        Option("early_stop_min_delta", 0.0, float),  # what counts as an improvement
        Option("stop", None, str | None),  # converged: end when the iterate averages settle
        Option("converge_window", 100, int),  # iterates each check of train.stop looks at
        Option("converge_skl", 0.01, float),  # settled: symmetric KL per dimension below this
        Option("converge_lr_factor", 0.5, float),  # the step size's decrease once settled
        Option("converge_rhat", 1.1, float),  # a guide with no Gaussian nor draws: R-hat below
        Option("diagnostics", True, bool),  # PSIS k-hat and importance-weighted estimates
        Option("plots", True, bool),  # the loss and per-site density plots
        Option("predictive", True, bool),  # posterior.nc's replicated data and log-likelihood
        Option("compile", "auto", Literal["auto", True, False]),  # compile/compiled_step.py
    )
}
MAX_BYTES = 1_000_000
# The machine's default for train.compile where a recipe leaves it out (VIBENCH_COMPILE=false
# on a machine without a C++ compiler, or where every run meets a cold compile cache); the
# run's recipe.yaml records what it got.
COMPILE_ENV = "VIBENCH_COMPILE"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
DTYPE_NAMES = ("float32", "float64")  # workbench/device.py makes them torch dtypes
MAX_LOOPED_PARTICLES = 10_000  # a loss's particles one after another: minutes a step beyond
MAX_SEED = 2**32 - 1  # the widest seed every generator a run seeds (numpy's included) takes


def compile_default() -> str | bool:
    """train.compile where a recipe does not set it: VIBENCH_COMPILE, else auto."""
    text = os.environ.get(COMPILE_ENV, "").strip().lower()
    values = {"": "auto", "auto": "auto", "true": True, "false": False}
    if text not in values:
        raise UsageError(f"{COMPILE_ENV}={os.environ[COMPILE_ENV]!r}: expected auto, true or "
                         "false")
    return values[text]


class _SafeLoader(yaml.SafeLoader):
    """The safe loader, refusing duplicate keys (YAML keeps the last silently) and aliases
    (they can expand a small file into a huge or recursive value)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.events.AliasEvent):
            raise yaml.composer.ComposerError(
                None, None, "aliases (*name) are not allowed in a recipe",
                self.peek_event().start_mark,
            )
        return super().compose_node(parent, index)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping says so
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
    return loader.construct_mapping(node, deep=True)


_SafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
# YAML 1.1 reads 1e-3 as text; users mean a number (as YAML 1.2 and JSON do).
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load(path: Path) -> dict:
    """Read a recipe file into a dict, or raise a UsageError saying what is wrong with it."""
    source = str(path)
    try:
        info = path.stat()
        if stat.S_ISDIR(info.st_mode):
            raise UsageError(f"{source}: is a directory, not a recipe file")
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{source}: is not a regular file (a device or a pipe); "
                             "give a recipe file")
        with path.open("rb") as handle:  # bounded: the file may grow after stat
            content = handle.read(MAX_BYTES + 1)
        size = max(info.st_size, len(content))
        if size > MAX_BYTES:
            raise UsageError(f"{source}: {size} bytes is too large for a recipe (at most 1 MB)")
        text = content.decode("utf-8")
    except FileNotFoundError:
        raise UsageError(f"{source}: no such recipe file") from None
    except UnicodeDecodeError:
        raise UsageError(f"{source}: is not UTF-8 text") from None
    except OSError as exc:
        raise UsageError(f"{source}: cannot read it: {exc.strerror}") from None
    return parse(text, source)


def parse(text: str, source: str) -> dict:
    """Parse recipe text with the safe loader; ``source`` names it in error messages."""
    try:
        recipe = yaml.load(text, Loader=_SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = exc.problem or str(exc)
        tag = re.search(r"constructor for the tag '([^']*)'", problem)
        if tag:
            problem = f"the tag {tag.group(1)} is not allowed: a recipe holds plain data only"
        raise UsageError(f"{where}: invalid YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: invalid YAML: {exc}") from None
    except RecursionError:
        raise UsageError(f"{source}: nested too deeply to be a recipe") from None
    if recipe is None:
        raise UsageError(f"{source}: the recipe is empty")
    if not isinstance(recipe, dict):
        raise UsageError(
            f"{source}: a recipe is a mapping of sections ({', '.join(SECTIONS)}), "
            f"not {_describe(recipe)}"
        )
    return recipe


def apply_overrides(recipe: dict, sets: Sequence[str]) -> tuple[dict, set[str]]:
    """A copy of ``recipe`` with each ``KEY=VALUE`` applied, and the keys they set.

    The value is YAML. Setting a component section to a name (``guide=auto_normal``)
    replaces the whole section, so no option of the old component is left behind.
    """
    recipe = _expand_shorthands(copy.deepcopy(recipe))
    problems: list[str] = []
    overridden: set[str] = set()
    for item in sets:
        key, equals, text = item.partition("=")
        key = key.strip()
        parts = tuple(key.split("."))
        if not equals:
            problems.append(f"--set {item!r}: expected KEY=VALUE, e.g. --set loss.num_particles=16")
            continue
        if not all(parts):
            problems.append(f"--set {item!r}: {key!r} is not a key like loss.num_particles")
            continue
        if parts[0] not in SECTIONS:
            problems.append(
                f"--set {item!r}: no recipe section {parts[0]!r}; "
                f"{did_you_mean(parts[0], SECTIONS)}"
            )
            continue
        try:
            value = yaml.load(text, Loader=_SafeLoader)
        except yaml.YAMLError as exc:
            problems.append(f"--set {item!r}: the value is not valid YAML ({one_line(exc)})")
            continue
        if parts in COMPONENTS and isinstance(value, str):
            value = {"name": value}
        target = recipe
        for depth, part in enumerate(parts[:-1]):
            if target.get(part) is None:  # missing or null: a new mapping
                target[part] = {}
            child = target[part]
            if not isinstance(child, dict):
                where = ".".join(parts[: depth + 1])
                problems.append(f"--set {item!r}: {where} is {child!r}, not a mapping")
                break
            target = child
        else:
            target[parts[-1]] = value
            overridden.add(key)
    if problems:
        raise RecipeError("command line", problems)
    return recipe, overridden


def as_yaml(value: Any) -> Any:
    """``value`` as YAML would give it back: tuples (a factory's defaults) become lists, so a
    resolved recipe, saved and checked again, is the same recipe."""
    if isinstance(value, dict):
        return {key: as_yaml(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_yaml(item) for item in value]
    return value


def resolve(
    recipe: dict, registry: Registry, source: str, overridden: Iterable[str] = (),
    code: Callable[[str], None] | None = None,
) -> dict:
    """Check a recipe whole against the registry and fill in every default.

    Every problem found is reported at once, in one RecipeError. ``code`` is called with each
    ``file.py:attr`` or ``module:attr`` name before its code is imported; it may refuse the
    name by raising a UsageError (then a problem of the recipe) or say that it runs code.
    """
    recipe = _expand_shorthands(recipe)
    checker = _Checker(registry, set(overridden), Path(source).parent, code)
    for key in recipe:
        if key not in SECTIONS:
            checker.problem(str(key), f"unknown section; {did_you_mean(str(key), SECTIONS)}")
    resolved: dict[str, Any] = {}
    resolved["name"] = checker.value(
        recipe, "name", Path(source).stem or "run", str,
        lambda v: NAME_PATTERN.fullmatch(v), "a name of letters, digits, '.', '_' and '-'",
    )
    resolved["seed"] = checker.value(recipe, "seed", 0, int, lambda v: 0 <= v <= MAX_SEED,
                                     f"a whole number from 0 to {MAX_SEED}")
    resolved["device"] = checker.value(
        recipe, "device", "auto", str, DEVICE_PATTERN.fullmatch, "auto, cpu, cuda or cuda:N"
    )
    resolved["dtype"] = checker.value(
        recipe, "dtype", "float32", str, lambda v: v in DTYPE_NAMES, "float32 or float64"
    )
    resolved["data"] = checker.data(recipe.get("data"))
    automatic = _automatic(recipe)
    resolved.update(_components(recipe, checker, registry, automatic))
    resolved["train"] = checker.train(recipe.get("train", {}))
    resolved["loggers"] = checker.component_list(("loggers",),
                                                 recipe.get("loggers", DEFAULT_LOGGERS))
    if automatic:
        resolved["auto"] = checker.auto(recipe.get("auto") or {})
    elif "auto" in recipe:
        checker.problem("auto", f"the automatic pipeline's stages; it runs only with no guide "
                                f"or 'guide: {{name: {AUTO}}}'")
    if checker.problems:
        raise RecipeError(source, checker.problems)
    return resolved


def _components(recipe: dict, checker: _Checker, registry: Registry,
                automatic: bool) -> dict[str, Any]:
    """The model, guide, loss and optimizer sections, checked; with the automatic pipeline,
    the guide alone (it picks the loss and optimizer itself)."""
    resolved: dict[str, Any] = {}
    for (section,), kind in ((p, k) for p, k in COMPONENTS.items() if len(p) == 1):
        if automatic and section in ("guide", "loss", "optimizer"):
            if section == "guide":
                resolved["guide"] = {"name": AUTO}
                extra = sorted(set(recipe.get("guide") or {}) - {"name"}) if isinstance(
                    recipe.get("guide"), dict) else []
                if extra:
                    checker.problem(f"guide.{extra[0]}", f"guide {AUTO!r} takes no options; "
                                                         "set them on its stages (auto.stages)")
            elif section in recipe and "guide" not in checker.overridden:  # --set guide=auto
                checker.problem(section, f"the automatic pipeline (guide {AUTO!r}) picks its "
                                         f"own {kind}; remove this section, or name a guide")
            continue
        if section not in recipe:
            checker.problem(
                section,
                f"missing; a recipe names its {kind}, e.g. '{section}: {{name: ...}}' with "
                f"a name from: {', '.join(registry.names(kind)) or 'none installed'}"
                + (f" (or '{AUTO}', for the automatic pipeline)" if kind == "guide" else ""),
            )
        else:
            resolved[section] = checker.component((section,), recipe[section])
    return resolved


class _Checker:
    """Collects every problem of one recipe, each naming the key it is about."""

    def __init__(self, registry: Registry, overridden: set[str], base: Path,
                 code: Callable[[str], None] | None = None):
        self.code = code
        self.registry = registry
        self.overridden = overridden
        self.base = base  # the recipe's directory: where its relative paths start from
        self.problems: list[str] = []

    def base_of(self, path: str) -> Path:
        """Where a relative path at ``path`` starts from: the working directory for one given
        on the command line (``--set``, as every path typed in a shell), else the recipe's
        directory, wherever vibench runs from."""
        given = any(path == key or path.startswith(key + ".") for key in self.overridden)
        return Path(".") if given else self.base

    def problem(self, path: str, message: str) -> None:
        if any(path == key or key.startswith(path + ".") or path.startswith(key + ".")
               for key in self.overridden):
            message += " (set on the command line)"
        self.problems.append(f"{path}: {message}")

    def value(self, recipe: dict, key: str, default: Any, kind: type, valid, wanted: str) -> Any:
        value = recipe.get(key, default)
        if not Option(key, default, kind).accepts(value) or not valid(value):
            self.problem(key, f"expected {wanted}, got {value!r}")
        return value

    def data(self, data: Any) -> dict:
        """Inline arguments, plus at most one of ``file`` (made absolute: see ``base_of``)
        and ``dataset`` (a component); ``columns`` maps arguments to a file's names."""
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.problem("data", "expected a mapping of the model's arguments, got "
                                 f"{_describe(data)}")
            return {}
        resolved = dict(data)
        if "file" in data and "dataset" in data:
            self.problem("data", "give either a file or a dataset, not both")
        if "file" in data:
            resolved["file"] = self.data_file(data["file"], self.base_of("data.file"))
        if "dataset" in data:
            resolved["dataset"] = self.component(("data", "dataset"), data["dataset"])
        columns = data.get("columns")
        if columns is not None and not (
            isinstance(columns, dict)
            and all(isinstance(v, str) or (isinstance(v, list) and v and
                                           all(isinstance(c, str) for c in v))
                    for v in columns.values())
        ):
            self.problem("data.columns", "expected a mapping of model argument to a column name "
                                         "or a list of column names")
        elif columns is not None and not {"file", "dataset"} & set(data):
            self.problem("data.columns", "names columns of a file or data set; give data.file")
        for key in data:
            if not isinstance(key, str) or not key.isidentifier():
                self.problem(f"data.{key}", "a data key names a model argument, like 'flips'")
        return resolved

    def data_file(self, file: Any, base: Path) -> str | None:
        from workbench.data.sources import SUFFIXES

        if not isinstance(file, str) or not file or "\0" in file:
            self.problem("data.file", f"expected a path, got {file!r}")
            return None
        path = (base / file).resolve()
        if path.suffix.lower() not in SUFFIXES:
            self.problem("data.file", f"{file}: a data file is one of {', '.join(SUFFIXES)}")
        elif not path.is_file():
            self.problem("data.file", f"no such file {file} (looked for {path})")
        return str(path)

    def train(self, train: Any) -> dict:
        if not isinstance(train, dict):
            self.problem("train", "expected a mapping of training settings, got "
                                  f"{_describe(train)}")
            train = {}
        lowest = {"steps": 0, "batch_size": 1, "early_stop_window": 1}
        for key, value in train.items():
            option = TRAIN.get(key)
            if option is None:
                self.problem(f"train.{key}", f"unknown setting; {did_you_mean(str(key), TRAIN)}")
            elif not option.accepts(value):
                self.problem(f"train.{key}", option.refusal(value))
            elif key == "stop" and value is not None and value not in STOPS:
                self.problem("train.stop", f"expected one of {', '.join(STOPS)} (or null), "
                                           f"got {value!r}")
            elif key == "converge_window" and value < 8:
                self.problem("train.converge_window", f"expected a whole number >= 8, got "
                                                      f"{value!r}")
            elif key == "converge_skl" and not value > 0:
                self.problem("train.converge_skl", f"expected a number > 0, got {value!r}")
            elif key == "converge_lr_factor" and not 0 < value <= 1:
                self.problem("train.converge_lr_factor", f"expected a factor in (0, 1], got "
                                                         f"{value!r}")
            elif key == "compile" and not (value == "auto" or isinstance(value, bool)):
                self.problem("train.compile", f"expected one of 'auto', true, false, got {value!r}")
            elif key == "average_last" and value is not None and not 0 < value <= 1:
                self.problem("train.average_last", f"expected a fraction in (0, 1], got {value!r}")
            elif isinstance(value, int) and value < lowest.get(key, 0):
                self.problem(f"train.{key}", f"expected a whole number >= {lowest.get(key, 0)}, "
                                             f"got {value!r}")
        defaults = {name: option.default for name, option in TRAIN.items()}
        defaults["compile"] = compile_default()
        return {name: train.get(name, defaults[name]) for name in TRAIN}

    def auto(self, section: Any) -> dict:
        """The automatic pipeline's section: its stages, in order, each with every option."""
        if not isinstance(section, dict):
            self.problem("auto", f"expected a mapping like '{{stages: [...]}}', got "
                                 f"{_describe(section)}")
            return {"stages": []}
        for key in section:
            if key != "stages":
                self.problem(f"auto.{key}",
                             f"unknown setting; {did_you_mean(str(key), ['stages'])}")
        return {"stages": self.component_list(("auto", "stages"),
                                              section.get("stages", DEFAULT_STAGES))}

    def component_list(self, path: tuple[str, ...], items: Any) -> list:
        """A list of components of one kind (``loggers: [tensorboard, {name: csv}]``)."""
        if isinstance(items, (str, dict)):
            items = [items]
        if not isinstance(items, list):
            self.problem(".".join(path), f"expected a list of {LISTS[path]} names, got "
                                         f"{_describe(items)}")
            return []
        sections = [{"name": item} if isinstance(item, str) else item for item in items]
        return [resolved for resolved in (self.component(path, s) for s in sections)
                if resolved is not None]

    def component(self, path: tuple[str, ...], section: Any) -> dict | None:
        kind, where = {**COMPONENTS, **LISTS}[path], ".".join(path)
        if not isinstance(section, dict):
            self.problem(where, f"expected a mapping with a 'name' key, got {_describe(section)}")
            return None
        name = section.get("name")
        if not isinstance(name, str):
            choices = ", ".join(self.registry.names(kind)) or "none installed"
            got = "missing" if name is None else f"expected a name, got {name!r}"
            self.problem(f"{where}.name", f"{got}; name the {kind} component, one of: {choices}")
            return None
        try:
            component = self.registry.get(kind, name, self.base_of(f"{where}.name"), self.code)
        except UsageError as exc:
            self.problem(f"{where}.name", str(exc))
            return None
        nested = {p[-1]: p for p in COMPONENTS if p[:-1] == path}
        resolved: dict[str, Any] = {"name": component.name}  # a file's path made absolute
        for key, value in section.items():
            option = component.options.get(key)
            if key == "name":
                continue
            if key in nested:
                if value is not None:
                    resolved[key] = self.component(nested[key], value)
            elif option is None and not component.open_options:
                real = [*component.options, *nested]
                hint = component.note if not real and component.note else did_you_mean(
                    str(key), real)
                self.problem(f"{where}.{key}", f"{kind} {name!r} has no option {key!r}; {hint}")
            elif option is not None and not option.accepts(value) and not (
                    path == ("optimizer",) and key == "lr" and value == AUTO):
                self.problem(f"{where}.{key}", option.refusal(value))
        for option in component.options.values():
            if option.name in section:
                resolved[option.name] = section[option.name]
            elif option.required:
                self.problem(f"{where}.{option.name}", f"required by {kind} {name!r}")
            else:
                resolved[option.name] = as_yaml(option.default)
        if path == ("optimizer",) and section.get("lr") == AUTO and section.get("schedule"):
            self.problem(f"{where}.lr", "lr auto searches one step size for the whole run; "
                                        "it does not combine with a schedule")
        for key, value in section.items():  # options a **kwargs factory takes unchecked
            resolved.setdefault(key, value)
        if path == ("loss",):
            self.particles(resolved)
        return resolved

    def particles(self, loss: dict) -> None:
        """Refuse more particles one after another than a step can take: each runs the model
        and guide once in a Python loop (vectorised ones are sized against memory at set-up)."""
        count = loss.get("num_particles")
        if (isinstance(count, int) and count > MAX_LOOPED_PARTICLES
                and loss.get("vectorize_particles") is not True):
            self.problem("loss.num_particles", (
                f"{count} particles one after another run the model {count} times a step "
                f"(the most is {MAX_LOOPED_PARTICLES}); use fewer, or vectorize_particles: true"))


def _automatic(recipe: dict) -> bool:
    """Whether a recipe asks for the automatic pipeline: guide auto, or no guide, loss or
    optimizer at all (a recipe that names only its model and data)."""
    guide = recipe.get("guide")
    if guide is None:
        return "loss" not in recipe and "optimizer" not in recipe
    return guide == AUTO or (isinstance(guide, dict) and guide.get("name") == AUTO)


def _expand_shorthands(section: dict, path: tuple[str, ...] = ()) -> dict:
    """``guide: beta`` means ``guide: {name: beta}``: a copy with every such shorthand expanded."""
    expanded = dict(section)
    for key, value in section.items():
        sub = (*path, key)
        if sub in COMPONENTS and isinstance(value, str):
            expanded[key] = {"name": value}
        elif isinstance(value, dict) and any(p[: len(sub)] == sub for p in COMPONENTS):
            expanded[key] = _expand_shorthands(value, sub)
    return expanded


def options(section: dict, path: tuple[str, ...]) -> dict:
    """A checked component section's options: all but its name and nested component sections."""
    return {k: v for k, v in section.items() if k != "name" and (*path, k) not in COMPONENTS}


def dump(recipe: dict) -> str:
    """A checked recipe as YAML, in section order; values YAML cannot hold are written as text."""
    return yaml.dump(recipe, Dumper=_Dumper, sort_keys=False, default_flow_style=None)


class _Dumper(yaml.SafeDumper):
    pass


_Dumper.add_representer(tuple, lambda d, v: d.represent_list(list(v)))
_Dumper.add_multi_representer(object, lambda d, v: d.represent_str(repr(v)))


def _describe(value: Any) -> str:
    kind = {list: "a list", str: "a string", int: "a number", float: "a number",
            bool: "true/false"}.get(type(value), type(value).__name__)
    text = repr(value)
    return f"{kind} ({text if len(text) <= 40 else text[:37] + '...'})"
