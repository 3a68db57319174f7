"""Every recipe shipped in recipes/ is valid, says how to run it, and runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import REPO
from workbench.config import recipe as recipes
from workbench.plugins.registry import get_registry
from workbench.train.runner import Run

RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_there_are_recipes_for_the_first_swaps():
    names = {path.stem for path in RECIPES}
    assert {"coin", "coin_auto_normal", "coin_renyi", "coin_schedule", "coin_per_param"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_runs_a_few_steps(tmp_path: Path, path: Path):
    text = path.read_text()
    assert text.startswith("#") and f"vibench run recipes/{path.name}" in text
    raw, overridden = recipes.apply_overrides(recipes.load(path), ["train.steps=20"])
    recipe = recipes.resolve(raw, get_registry(), str(path), overridden)
    summary = Run.setup(recipe, get_registry()).train(tmp_path)
    assert summary["steps"] == 20 and summary["posterior"]
