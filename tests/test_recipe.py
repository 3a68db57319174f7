"""Recipe loading, --set overrides and whole-recipe checks, against the installed plugins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import COIN, resolved, vibench
from workbench.config import recipe as recipes
from workbench.errors import RecipeError, UsageError


def problems(sets: list[str] = (), recipe: dict | None = None) -> list[str]:
    """What checking the coin with ``sets`` (or the recipe ``recipe``) finds wrong."""
    with pytest.raises(RecipeError) as caught:
        resolved(*sets, source=COIN if recipe is None else recipe)
    return caught.value.problems


def test_coin_recipe_is_the_seed_value_for_value():
    coin = resolved()
    assert coin["data"]["flips"] == [1] * 6 + [0] * 4
    assert coin["model"] == {"name": "beta_bernoulli", "prior_alpha": 10.0, "prior_beta": 10.0}
    assert coin["guide"] == {"name": "beta", "init_alpha": 15.0, "init_beta": 15.0}
    assert coin["loss"]["name"] == "elbo" and coin["loss"]["num_particles"] == 7
    assert coin["optimizer"]["lr"] == 0.0005 and coin["optimizer"]["betas"] == [0.9, 0.999]
    assert coin["train"]["steps"] == 4000


def test_resolved_recipe_fills_every_default_and_round_trips(tmp_path: Path):
    coin = resolved()
    assert coin["optimizer"]["eps"] == 1e-8 and coin["seed"] == 0 and coin["device"] == "auto"
    saved = tmp_path / "recipe.yaml"
    saved.write_text(recipes.dump(coin))
    again = resolved(source=saved)
    assert again == coin


def test_set_swaps_a_whole_component_leaving_no_old_option():
    swapped = resolved("guide=auto_normal")
    assert swapped["guide"] == {"name": "auto_normal", "init": "init_loc", "init_scale": 0.1,
                                   "init_loc": "feasible"}


def test_set_name_only_keeps_options_and_says_when_they_do_not_fit():
    found = problems(["guide.name=auto_normal"])
    assert [p.split(":")[0] for p in found] == ["guide.init_alpha", "guide.init_beta"]
    assert found[0].startswith("guide.init_alpha: guide 'auto_normal' has no option 'init_alpha'")


def test_set_changes_one_option_parsed_as_yaml():
    changed = resolved("loss.num_particles=16", "optimizer.lr=0.01", "optimizer.betas=[0.8, 0.99]")
    assert changed["loss"]["num_particles"] == 16
    assert changed["optimizer"]["lr"] == 0.01 and changed["optimizer"]["betas"] == [0.8, 0.99]
    assert changed["guide"]["name"] == "beta"


def test_scientific_notation_is_a_number_as_users_write_it():
    changed = resolved("optimizer.lr=1e-3", "optimizer.eps=2E-8", "model.prior_alpha=1e1")
    assert changed["optimizer"]["lr"] == 0.001 and changed["optimizer"]["eps"] == 2e-8
    assert changed["model"]["prior_alpha"] == 10.0


def test_set_per_parameter_rules_into_a_nested_component():
    changed = resolved("optimizer.optim_args=per_param",
                       "optimizer.optim_args.rules.log_alpha_q.lr=0")
    assert changed["optimizer"]["optim_args"] == {
        "name": "per_param", "rules": {"log_alpha_q": {"lr": 0}}
    }


@pytest.mark.parametrize("item, expected", [
    ("loss.num_particles", "expected KEY=VALUE"),
    ("lose.num_particles=3", "no recipe section 'lose'; did you mean 'loss'?"),
    ("loss..x=3", "is not a key like loss.num_particles"),
    ("seed.x=1", "seed is 0, not a mapping"),
    ("loss.num_particles=[1", "the value is not valid YAML"),
])
def test_bad_overrides_are_named(item: str, expected: str):
    with pytest.raises(RecipeError) as caught:
        recipes.apply_overrides(recipes.load(COIN), [item])
    assert caught.value.source == "command line"
    assert expected in caught.value.problems[0]


@pytest.mark.parametrize("sets, expected", [
    (["guide=betta"], "guide.name: unknown guide 'betta'; did you mean 'beta'?"),
    (["loss.num_particle=3"], "loss.num_particle: loss 'elbo' has no option 'num_particle'; "
                              "did you mean 'num_particles'?"),
    (["loss.num_particles=many"], "loss.num_particles: expected int, got 'many'"),
    (["loss.vectorize_particles=1"], "loss.vectorize_particles: expected bool, got 1"),
    (["optimizer.betas=[0.9]"], "optimizer.betas: expected list of 2 float/float, got [0.9]"),
    (["optimizer.lr=fast"], "optimizer.lr: expected float, got 'fast'"),
    (["train.step=10"], "train.step: unknown setting; did you mean 'steps'"),  # or 'stop'
    (["train.steps=-1"], "train.steps: expected a whole number >= 0, got -1"),
    (["seed=-1"], "seed: expected a whole number from 0 to 4294967295, got -1"),
    (["device=gpu"], "device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["name=a/b"], "name: expected a name of letters"),
    (["data=[1, 0]"], "data: expected a mapping of the model's arguments"),
    (["optimizer.optim_args.rules={}"], "optimizer.optim_args.name: missing"),
])
def test_each_bad_value_is_one_problem_naming_its_key(sets: list[str], expected: str):
    found = problems(sets)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


def test_every_problem_is_reported_at_once():
    found = problems(recipe={"guid": {"name": "beta"}, "loss": {"name": "elbo", "particles": 3},
                             "train": {"steps": "many"}})
    paths = [p.split(":")[0] for p in found]
    assert paths == ["guid", "model", "guide", "loss.particles", "optimizer", "train.steps"]


@pytest.mark.parametrize("text, expected", [
    ("", "the recipe is empty"),
    ("- 1\n- 2\n", "a recipe is a mapping of sections"),
    ("name: [coin\n", "invalid YAML"),
    ("a: 1\na: 2\n", "duplicate key 'a'"),
    ("x: !!python/object/apply:os.system ['echo hacked']\n", "is not allowed"),
    ("a: &x [1]\nb: *x\n", "aliases (*name) are not allowed"),
    ("&a [*a]\n", "aliases (*name) are not allowed"),
])
def test_bad_files_get_one_clear_line(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as caught:
        recipes.load(path)
    message = str(caught.value)
    assert message.startswith(str(path)) and expected in message and "\n" not in message


def test_missing_directory_and_huge_files_are_refused(tmp_path: Path):
    for path, expected in [(tmp_path / "nope.yaml", "no such recipe file"),
                           (tmp_path, "is a directory"),
                           (tmp_path / "huge.yaml", "too large")]:
        if path.name == "huge.yaml":
            path.write_text("x: " + "y" * 2_000_000)
        with pytest.raises(UsageError, match=expected):
            recipes.load(path)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_devices_are_refused_without_reading_them():
    with pytest.raises(UsageError, match="is not a regular file"):
        recipes.load(Path("/dev/zero"))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs named pipes")
def test_a_pipe_is_refused_without_waiting_for_a_writer(tmp_path: Path):
    fifo = tmp_path / "r.yaml"
    os.mkfifo(fifo)
    with pytest.raises(UsageError, match="is not a regular file"):
        recipes.load(fifo)


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_the_cli_refuses_dev_zero_in_one_line():
    result = vibench("run", "/dev/zero", timeout=60)
    assert result.returncode == 2
    assert result.stderr == "error: /dev/zero: is not a regular file (a device or a pipe); " \
                            "give a recipe file\n"
