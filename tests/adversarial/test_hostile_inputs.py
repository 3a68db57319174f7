"""Hostile recipes, command lines, data and plugins (made by ``hostile.py``): each is refused
with one line naming what and where, exit 2, and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile import failing_models, nested, one_line_exit_2, optim_args_plugin, recipe_with

from conftest import COIN, vibench

QUICK = ["--steps", "5", "--set", "train.plots=false", "--set", "train.diagnostics=false"]


@pytest.mark.parametrize("seed", [str(2**64), str(2**32), "-1"])
def test_a_seed_no_generator_takes_is_one_line(tmp_path: Path, seed: str):
    refused = vibench("run", str(COIN), *QUICK, "--seed", seed, "--out", str(tmp_path / "run"))
    one_line_exit_2(refused, "seed", "4294967295", seed)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("depth", [33, 65, 199])
def test_data_nested_deeper_than_an_array_is_one_line(tmp_path: Path, depth: int):
    (tmp_path / "deep.json").write_text(json.dumps({"flips": nested(depth)}))
    from_file = recipe_with(COIN, tmp_path, data={"file": "deep.json"})
    refused = vibench("run", str(from_file), *QUICK, "--out", str(tmp_path / "a"))
    one_line_exit_2(refused, "deep.json", "'flips'", "32")
    inline = recipe_with(COIN, tmp_path, "inline.yaml", data={"flips": nested(depth)})
    refused = vibench("run", str(inline), *QUICK, "--out", str(tmp_path / "b"))
    one_line_exit_2(refused, "data.flips", "32")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("rules, says", [("Raises", "failed on parameter 'log_alpha_q' "
                                                    "(RuntimeError: boom in the plugin)"),
                                         ("GivesInt", "gave parameter 'log_alpha_q' int 3")])
def test_an_optim_args_plugin_that_fails_is_named(tmp_path: Path, rules: str, says: str):
    plugin = optim_args_plugin(tmp_path)
    refused = vibench("run", str(COIN), *QUICK, "--out", str(tmp_path / "run"),
                      "--set", f"optimizer.optim_args={{name: '{plugin}:{rules}'}}")
    one_line_exit_2(refused, "optimizer.optim_args", f"from '{plugin}'", says, "a bug in")
    assert not (tmp_path / "run").exists()


def test_a_run_that_fails_to_set_up_leaves_nothing(tmp_path: Path):
    models = failing_models(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text("12345")  # a stale lock, as a killed run leaves
    for where in (["--out", str(out)], []):
        failed = vibench("run", str(COIN), *QUICK, "--set", f"model={models}:broken", *where,
                         cwd=tmp_path)
        one_line_exit_2(failed, "broken model")
    assert list(out.iterdir()) == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("model", ["discrete", "no_latent"])
def test_a_pipeline_that_fits_nothing_leaves_nothing(tmp_path: Path, model: str):
    models = failing_models(tmp_path)
    recipe = tmp_path / "auto.yaml"
    recipe.write_text(f"data: {{flips: [1, 1, 0]}}\nmodel: {{name: '{models}:{model}'}}\n")
    failed = vibench("run", str(recipe), cwd=tmp_path)
    assert failed.returncode in (1, 2) and "Traceback" not in failed.stderr, failed.stderr
    assert not (tmp_path / "runs").exists(), sorted((tmp_path / "runs").rglob("*"))
    assert " see " not in failed.stderr.splitlines()[-1]
