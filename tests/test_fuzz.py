"""Property-based: whatever recipe or overrides a user throws at the loader, it either
accepts them or says what is wrong in a UsageError; it never fails any other way."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import COIN
from workbench.config import recipe as recipes
from workbench.errors import UsageError
from workbench.plugins.registry import get_registry

KEYS = ["name", "seed", "device", "data", "model", "guide", "loss", "optimizer", "train",
        "data.flips", "data.file", "data.dataset", "data.columns", "model.name",
        "guide.name", "guide.init_alpha", "loss.num_particles", "loss.jit", "optimizer.lr",
        "optimizer.betas", "optimizer.optim_args", "optimizer.optim_args.rules",
        "optimizer.schedule", "optimizer.schedule.gamma", "train.steps", "train.batch_size",
        "train.eval_every", "guid", "loss..x", "", "a.b.c.d"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                    st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(["beta", "auto_normal", "elbo", "adam", "cuda", "per_param",
                                     "exponential", "synthetic_coin", "1e-3", "[1, 0]"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def check(raw: object, sets: list[str]) -> None:
    try:
        recipe = recipes.parse(yaml.safe_dump(raw), "fuzz.yaml") if not isinstance(raw, str) \
            else recipes.parse(raw, "fuzz.yaml")
        recipe, overridden = recipes.apply_overrides(recipe, sets)
        recipes.resolve(recipe, get_registry(), "fuzz.yaml", overridden)
    except UsageError as error:
        assert str(error).strip(), "an error must say something"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(st.sampled_from(KEYS[:9] + ["guid", "x"]), values, max_size=9),
       st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=4))
def test_random_recipes_and_overrides_are_accepted_or_cleanly_refused(raw, sets):
    check(raw, [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
                for key, value in sets])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(KEYS), values), max_size=5))
def test_random_overrides_on_the_coin(sets):
    check(recipes.load(COIN), [f"{key}={yaml.safe_dump(value, default_flow_style=True).strip()}"
                               for key, value in sets])


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_random_text_is_a_recipe_or_a_clean_error(text):
    check(text, [])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.text(max_size=30), max_size=4))
def test_random_set_strings(sets):
    check(recipes.load(COIN), sets)


def test_deeply_nested_yaml_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "deep.yaml"
    path.write_text("a: " + "[" * 100_000 + "]" * 100_000 + "\n")
    try:
        recipes.load(path)
    except UsageError as error:
        assert "\n" not in str(error)
    else:
        raise AssertionError("a 100,000-deep recipe was accepted")


@pytest.mark.parametrize("key, value", [("data.file", "\0"), ("model.name", "a\0b.py:model")])
def test_a_nul_character_in_a_path_is_refused_in_one_line(key, value):
    """A NUL in a path (YAML can hold one) made pathlib raise ValueError: found by the fuzz
    test above on a fresh checkout."""
    recipe, overridden = recipes.apply_overrides(recipes.parse(yaml.safe_dump({}), "r.yaml"),
                                                 [f"{key}={yaml.safe_dump(value).strip()}"])
    with pytest.raises(UsageError) as refused:
        recipes.resolve(recipe, get_registry(), "r.yaml", overridden)
    said = [line for line in str(refused.value).splitlines() if key in line]  # one a problem
    assert len(said) == 1 and ("NUL" in said[0] or "expected a path" in said[0]), said
