"""What a comparison runs: the ``--grid`` options parsed, every combination of their values
checked as ``vibench run`` would check it (no torch needed), times each seed, each run named.

A problem with a grid value itself, or one every combination has, is bad input and stops the
comparison before anything runs; a problem only some combinations have refuses just those.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from workbench.errors import RecipeError, UsageError

SAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
MAX_NAME = 120


@dataclass
class Grid:
    """One ``--grid KEY=V1,V2``: the key and each value's text (YAML, as ``--set`` reads it)."""

    key: str
    values: list[str]


@dataclass
class Spec:
    """One run: a combination of grid values and a seed."""

    combo: tuple[str, ...]  # the value text for each grid key
    seed: int
    sets: list[str]  # the --set items the child gets, in order
    name: str  # the run directory's name inside the compare directory
    refused: list[str] = field(default_factory=list)  # problems found before it ran
    hparams: dict[str, Any] = field(default_factory=dict)
    recipe: Path | None = None  # the recipe it runs (set by ``plan``)


class Combination(NamedTuple):
    """One combination of grid values, checked: its ``--set`` items, the problems that refuse
    it, and the recipe's name as it resolves (None where it does not)."""

    combo: tuple[str, ...]
    sets: list[str]
    refused: list[str]
    name: str | None


def label(grids: list[Grid], combo: tuple[str, ...]) -> str:
    """A combination as ``key=value, ...``, for a line or a plot's row."""
    return ", ".join(f"{g.key}={v}" for g, v in zip(grids, combo)) or "recipe"


def parse_grid(items: Sequence[str]) -> list[Grid]:
    """``KEY=V1,V2,...`` for each ``--grid``; commas inside brackets, braces or quotes do not
    split, so ``optimizer.betas=[0.9,0.99],[0.8,0.99]`` is two values."""
    grids: list[Grid] = []
    problems: list[str] = []
    for item in items:
        problem = _grid_problem(item, grids)
        if problem:
            problems.append(f"--grid {item!r}: {problem}")
        else:
            key, _, text = item.partition("=")
            grids.append(Grid(key.strip(), [v.strip() for v in _split(text)]))
    if problems:
        raise RecipeError("command line", problems)
    return grids


def _grid_problem(item: str, grids: list[Grid]) -> str:
    """What is wrong with one ``--grid`` item, given the ones before it ("" if nothing)."""
    key, equals, text = item.partition("=")
    key = key.strip()
    if not equals or not key:
        return "expected KEY=V1,V2,..., e.g. --grid optimizer.lr=0.01,0.05"
    values = [v.strip() for v in _split(text)]
    if not text.strip() or any(not v for v in values):
        return "an empty value; give KEY=V1,V2,..."
    if key == "seed":
        return "use --seeds N to run seeds 0..N-1"
    if any(g.key == key for g in grids):
        return f"{key} is given twice; put all its values in one --grid"
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        return f"the value {repeated[0]!r} is given twice"
    return ""


def _split(text: str) -> list[str]:
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            if char == quote:
                quote = ""
        elif char in "'\"":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth = max(0, depth - 1)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def plan(recipe: Path, grids: list[Grid], sets: Sequence[str], steps: int | None,
         seeds: int) -> tuple[list[Spec], str]:
    """Every run of the comparison, each checked as ``vibench run`` would check it, and the
    recipe's name.

    A problem with a grid value itself (an unknown key, component or a bad value), or one
    that every combination has, is bad input: a UsageError listing every such problem. A
    problem only some combinations have (``guide.name=auto_normal`` keeping options of the
    old guide that do not fit) refuses just those combinations.
    """
    from workbench.config import recipe as recipes
    from workbench.plugins.registry import get_registry

    raw = recipes.load(recipe)
    registry = get_registry()
    for problem in registry.problems:
        print(f"warning: {problem}", file=sys.stderr)
    base_sets = list(sets) + ([f"train.steps={steps}"] if steps is not None else [])
    base, base_keys = recipes.apply_overrides(raw, base_sets)  # a bad --set: exit 2 here
    _note_hidden_sets(sets, grids)
    bad, settable = _unsettable(base, grids)
    checked = []
    for combo in itertools.product(*(g.values for g in settable)):
        problems, combination = _check(recipe, base, base_keys, settable, combo, registry)
        bad += problems
        if combination is not None:
            checked.append(combination)
    if checked and all(c.refused for c in checked):  # no combination can run:
        common = set.intersection(*(set(c.refused) for c in checked))  # bad whatever varies
        bad += [line for line in checked[0].refused if line in common]
    if bad:
        raise _Problems(_unique(bad))
    name = next((c.name for c in checked if c.name), raw.get("name") or recipe.stem)
    return _specs(recipe, checked, settable, base_sets, seeds), str(name)


def _note_hidden_sets(sets: Sequence[str], grids: list[Grid]) -> None:
    """Say on stderr where a ``--grid`` key overrides a ``--set``."""
    for item in sets:
        key = item.partition("=")[0].strip()
        hidden = [g.key for g in grids if key == g.key or key.startswith(g.key + ".")]
        if hidden:
            print(f"note: --grid {hidden[0]} goes on top of --set {item}, so each run has "
                  f"the grid's {hidden[0]}", file=sys.stderr)


def _unsettable(base: dict, grids: list[Grid]) -> tuple[list[str], list[Grid]]:
    """Each value's key, alone: a key vibench cannot set is bad whatever varies. The problems,
    and the grids left to check the others' values with."""
    from workbench.config import recipe as recipes

    bad: list[str] = []
    unsettable: set[str] = set()
    for g in grids:
        for value in g.values:
            try:
                recipes.apply_overrides(base, [f"{g.key}={value}"])
            except RecipeError as exc:
                bad += [line.replace("--set ", "--grid ", 1) for line in exc.lines()]
                unsettable.add(g.key)
    return bad, [g for g in grids if g.key not in unsettable]


def _check(recipe: Path, base: dict, base_keys: set[str], grids: list[Grid],
           combo: tuple[str, ...], registry: Any) -> tuple[list[str], Combination | None]:
    """One combination on top of the ``--set`` recipe, as the child applies them: the
    problems that are bad input, and the combination (None where its keys clash)."""
    from workbench.config import recipe as recipes

    grid_sets = [f"{g.key}={v}" for g, v in zip(grids, combo)]
    try:
        combined, grid_keys = recipes.apply_overrides(base, grid_sets)
    except RecipeError as exc:  # keys that clash with each other
        return [line.replace("--set ", "--grid ", 1) for line in exc.lines()], None
    try:
        resolved = recipes.resolve(combined, registry, str(recipe), base_keys | grid_keys)
    except RecipeError as exc:
        lines = [f"{exc.source}: {p}" for p in exc.problems]
        bad = [line for p, line in zip(exc.problems, lines)
               if _inside(p, [g.key for g in grids])]
        return bad, Combination(combo, grid_sets, lines, None)
    return [], Combination(combo, grid_sets, [], resolved["name"])


def _specs(recipe: Path, checked: list[Combination], grids: list[Grid], base_sets: list[str],
           seeds: int) -> list[Spec]:
    """Each checked combination times each seed, named and with its hparams."""
    specs: list[Spec] = []
    names: set[str] = set()
    for combination in checked:
        for seed in range(seeds):
            run_name = _safe_name(",".join([*combination.sets, f"seed={seed}"]), names)
            hparams = {g.key: _hparam(v) for g, v in zip(grids, combination.combo)}
            specs.append(Spec(combination.combo, seed, [*base_sets, *combination.sets],
                              run_name, combination.refused, {**hparams, "seed": seed}, recipe))
    _consistent_hparams(specs, grids)
    return specs


def plan_suite(recipes: Sequence[Path], grids: list[Grid], sets: Sequence[str],
               steps: int | None, seeds: int) -> tuple[list[Spec], list[Grid], str]:
    """``plan`` for each of several recipes (a suite, such as the posteriordb recipes), the
    recipe becoming the first grid key, named by its file's stem; one recipe is plain
    ``plan``. Returns the specs, the grids the table shows, and the comparison's name."""
    if len(recipes) == 1:
        specs, name = plan(recipes[0], grids, sets, steps, seeds)
        return specs, grids, name
    labels = [r.stem for r in recipes]
    if len(set(labels)) < len(labels):
        labels = [str(r) for r in recipes]
    if len(set(labels)) < len(labels):
        twice = next(label for label in labels if labels.count(label) > 1)
        raise UsageError(f"the recipe {twice} is given twice")
    specs: list[Spec] = []
    names: set[str] = set()
    problems: list[str] = []
    for recipe, recipe_label in zip(recipes, labels):
        try:
            found, _ = plan(recipe, grids, sets, steps, seeds)
        except RecipeError as exc:
            problems += [line if line.startswith(str(recipe)) else f"{recipe}: {line}"
                         for line in exc.lines()]
            continue
        for spec in found:
            spec.combo = (recipe_label, *spec.combo)
            spec.name = _safe_name(f"recipe={recipe_label},{spec.name}", names)
            spec.hparams = {"recipe": recipe_label, **spec.hparams}
            specs.append(spec)
    if problems:
        raise _Problems(_unique(problems))
    return specs, [Grid("recipe", labels), *grids], "suite"


class _Problems(UsageError):
    """Lines that are already ``source: problem``."""

    def __init__(self, lines: list[str]):
        self._lines = lines
        super().__init__("\n".join(lines))

    def lines(self) -> list[str]:
        return self._lines


def _inside(problem: str, keys: list[str]) -> bool:
    """Whether a ``path: message`` problem is about a grid key's own value."""
    path = problem.partition(": ")[0]
    return any(path == key or path.startswith(key + ".") for key in keys)


def _unique(lines: list[str]) -> list[str]:
    return list(dict.fromkeys(lines))


def _safe_name(label: str, taken: set[str]) -> str:
    name = SAFE.sub("_", label)
    if len(name) > MAX_NAME:
        name = name[: MAX_NAME - 9] + "-" + hashlib.sha1(label.encode()).hexdigest()[:8]
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}-{n}"
    taken.add(candidate)
    return candidate


def _hparam(text: str) -> Any:
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, (bool, int, float, str)) else text


def _consistent_hparams(specs: list[Spec], grids: list[Grid]) -> None:
    """TensorBoard wants one type per hparam: a key whose values mix types becomes text."""
    for grid in grids:
        kinds = {_kind(s.hparams[grid.key]) for s in specs}
        if len(kinds) > 1:
            for s in specs:
                s.hparams[grid.key] = s.combo[[g.key for g in grids].index(grid.key)]


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else "str"
