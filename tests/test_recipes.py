"""Every recipe shipped in recipes/ is valid, says how to run it, and runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import RECIPES, setup, train

SHIPPED = sorted(RECIPES.glob("*.yaml"))


def test_there_are_recipes_for_the_first_swaps():
    names = {path.stem for path in SHIPPED}
    assert {"coin", "coin_auto_normal", "coin_renyi", "coin_schedule", "coin_per_param"} <= names


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_recipe_runs_a_few_steps(tmp_path: Path, path: Path):
    text = path.read_text()
    assert text.startswith("#") and f"vibench run recipes/{path.name}" in text
    summary = train(setup("train.steps=20", source=path), tmp_path)
    assert summary["steps"] == 20 and summary["posterior"]
