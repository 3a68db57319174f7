"""Hostile recipes, command lines, data and plugins (made by ``hostile.py``): each is refused
with one line naming what and where, exit 2, and leaves nothing behind."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hostile import (
    ECHO_AT_IMPORT,
    escaping_link_chain,
    failing_models,
    nested,
    one_line_exit_2,
    optim_args_plugin,
    packed,
    plugin_site,
    recipe_with,
    report_lost,
)

from tests.helpers import COIN, vibench
from workbench.compare import backends
from workbench.rundir import files

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


@pytest.mark.parametrize("members", [
    lambda dest: escaping_link_chain(dest),
    lambda dest: [("flag", "symlink", str(dest.parent / "flag")), ("flag", "file", "x")],
    lambda dest: [("inside", "symlink", "summary.json"), ("summary.json", "file", "{}")],
    lambda dest: [("flag", "hardlink", str(dest.parent / "flag"))],
    lambda dest: [(str(dest.parent / "flag"), "file", "overwritten")],
    lambda dest: [("plots/../../flag", "file", "overwritten")],
], ids=["CVE-2025-4517 chain", "symlink out", "symlink in", "hard link", "absolute", "dot-dot"])
def test_a_ray_task_s_files_with_a_link_or_a_way_out_are_refused_whole(tmp_path: Path, members):
    dest = tmp_path / "outer" / "run"
    dest.parent.mkdir()
    (dest.parent / "flag").write_text("precious\n")
    with pytest.raises(files.UnsafeFile, match="none were unpacked") as refused:
        backends.unpack(packed(*members(dest)), dest)
    assert "\n" not in str(refused.value) and str(dest) in str(refused.value)
    assert (dest.parent / "flag").read_text() == "precious\n"
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["flag", "outer"]


def test_a_ray_task_s_plain_run_folder_is_unpacked(tmp_path: Path):
    source = tmp_path / "source"
    (source / "plots").mkdir(parents=True)
    (source / "summary.json").write_text("{}")
    (source / "plots" / "loss.png").write_bytes(b"png")
    backends.unpack(backends.pack(source), tmp_path / "run")
    assert (tmp_path / "run" / "plots" / "loss.png").read_bytes() == b"png"
    assert (tmp_path / "run" / "summary.json").read_text() == "{}"


def test_a_ray_task_s_resume_hint_names_the_folder_its_files_are_copied_to(tmp_path: Path):
    job = backends.Job(COIN, tmp_path / "compare" / "lr=1e6,seed=0", 0, [
        "train.steps=5", "optimizer.lr=1e6", "train.skip_bad_steps=0", "train.plots=false"])
    outcome = backends.run_task(job, "no compare folder here", None, "1")  # as on a cluster
    assert outcome.exit_code == 1, outcome.stderr
    assert f"--resume {job.run_dir} " in outcome.stderr
    assert "vibench-run-" not in outcome.stderr + outcome.stdout
    backends.unpack(outcome.files, job.run_dir)
    assert (job.run_dir / "checkpoint.pt").exists()


def test_recipe_paths_start_from_its_folder_and_set_paths_from_the_working_one(tmp_path: Path):
    (tmp_path / "models").mkdir()
    (tmp_path / "recipes").mkdir()
    (tmp_path / "elsewhere").mkdir()
    models = failing_models(tmp_path / "models")  # its "broken" model names each run's source
    recipe = recipe_with(COIN, tmp_path / "recipes", model={
        "name": f"../models/{models.name}:broken"})
    from_recipe = vibench("run", str(recipe), *QUICK, cwd=tmp_path / "elsewhere")
    one_line_exit_2(from_recipe, "broken model")
    from_set = vibench("run", str(recipe), *QUICK, "--set", f"model=models/{models.name}:broken",
                       cwd=tmp_path)
    one_line_exit_2(from_set, "broken model")
    wrong = vibench("run", str(recipe), *QUICK, "--set", f"model=../models/{models.name}:broken",
                    cwd=tmp_path)
    one_line_exit_2(wrong, f"looked for {tmp_path.parent / 'models'}", "(set on the command line)")


def test_a_recipe_naming_a_shell_as_its_model_is_refused_and_its_code_announced(tmp_path: Path):
    marker = tmp_path / "ran"
    shell = recipe_with(COIN, tmp_path, model={"name": "os:system"},
                        data={"command": f"touch {marker}"})
    refused = vibench("run", str(shell), *QUICK, "--out", str(tmp_path / "a"))
    one_line_exit_2(refused, "os:system", "a built-in function, not a model")
    assert refused.stderr.splitlines()[0] == "note: the recipe runs code from module os: system"
    assert not marker.exists() and not (tmp_path / "a").exists()
    models = failing_models(tmp_path)
    named = vibench("run", str(COIN), *QUICK, "--set", f"model={models}:broken")
    assert "note: the recipe runs code" not in named.stderr  # a model file the user names


@pytest.mark.parametrize("reason", [None, "the report failed: boom"])
def test_runs_and_show_say_a_completed_run_s_report_is_missing(tmp_path: Path, reason):
    out = tmp_path / "run"
    assert vibench("run", str(COIN), *QUICK, "--out", str(out)).returncode == 0
    report_lost(out, reason)
    [line] = vibench("runs", str(tmp_path)).stdout.splitlines()[1:]
    assert "completed (report missing)" in line
    [info] = json.loads(vibench("runs", str(tmp_path), "--json").stdout)
    assert info["status"] == "completed" and info["report_missing"]
    shown = vibench("show", str(out))
    assert shown.returncode == 0
    assert f"completed (report missing): {reason or 'its report did not finish'}" in shown.stderr
    assert f"--resume {out} writes it" in shown.stderr


def test_a_plugin_writing_to_file_descriptor_1_at_import_leaves_list_json_whole(tmp_path: Path):
    env = plugin_site(tmp_path, "tp_echo", ECHO_AT_IMPORT)
    listed = vibench("list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout)["model"]  # stdout is the JSON and nothing else
    assert "from the plugin's import" in listed.stderr
    assert "plugin 'tp_echo' printed to stdout" in listed.stderr


def test_a_billion_particles_one_after_another_is_refused_before_set_up(tmp_path: Path):
    refused = vibench("run", str(COIN), *QUICK, "--set", "loss.num_particles=1000000000",
                      "--set", "loss.vectorize_particles=false", "--out", str(tmp_path / "run"),
                      timeout=120)
    one_line_exit_2(refused, "loss.num_particles", "10000", "vectorize_particles: true")
    assert not (tmp_path / "run").exists()
