"""The command line as a user meets it: bad input, listing, interruption, devices."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from tests.helpers import COIN, LONG, python, start, vibench, wait_training


@pytest.mark.parametrize("args, expected", [
    (["run", "missing.yaml"], "error: missing.yaml: no such recipe file"),
    (["run", str(COIN), "--set", "guide=betta"],
     f"error: {COIN}: guide.name: unknown guide 'betta'; did you mean 'beta'? "
     "(set on the command line)"),
    (["run", str(COIN), "--set", "loss.num_particle=16"],
     f"error: {COIN}: loss.num_particle: loss 'elbo' has no option 'num_particle'; "
     "did you mean 'num_particles'? (set on the command line)"),
    (["run", str(COIN), "--set", "optimizer.lr=fast"],
     f"error: {COIN}: optimizer.lr: expected float, got 'fast' (set on the command line)"),
    (["run", str(COIN), "--set", "loss.num_particles"],
     "error: command line: --set 'loss.num_particles': expected KEY=VALUE, "
     "e.g. --set loss.num_particles=16"),
    (["run", str(COIN), "--set", "data.flip=[1, 0]"],
     "error: data.flip: model 'beta_bernoulli' takes no argument 'flip'; did you mean 'flips'?"),
    (["run", str(COIN), "--set", "data.flips=[1, 2, 0]"],
     "error: data.flips: 2.0 at index [1] is outside the support of the Bernoulli likelihood "
     "(Boolean())"),
    (["run", str(COIN), "--set", "model.prior_alpha=-1"],
     "error: model 'beta_bernoulli': prior_alpha and prior_beta must be > 0"),
    (["run", str(COIN), "--set", "optimizer.optim_args=per_param",
      "--set", "optimizer.optim_args.rules.log_alpa_q.lr=0"],
     "error: optimizer.optim_args: rule 'log_alpa_q' matches no parameter; the parameters are "
     "log_alpha_q, log_beta_q"),
    (["run", str(COIN), "--set", "optimizer.optim_args=per_param",
      "--set", "optimizer.optim_args.rules.log_alpha_q.learning_rate=0"],
     "error: optimizer.optim_args: gives parameter 'log_alpha_q' setting 'learning_rate', "
     "which optimizer 'adam' does not take; choose from amsgrad, betas, eps, lr, weight_decay"),
    (["run", str(COIN), "--steps", "many"], "error: Invalid value for '--steps'"),
    (["run", str(COIN), "--bogus"], "error: No such option: --bogus"),
    (["frobnicate"], "error: No such command 'frobnicate'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args, expected):
    result = vibench(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_recipe_with_several_problems_lists_them_all(tmp_path: Path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("guid: beta\nmodel: beta_bernoulli\nloss: {name: elbo, particles: 3}\n")
    result = vibench("run", str(recipe), cwd=tmp_path)
    assert result.returncode == 2
    assert [line.split(": ")[2] for line in result.stderr.strip().splitlines()] == [
        "guid", "guide", "loss.particles", "optimizer"]


def test_cuda_on_a_machine_without_it_is_a_clear_error(tmp_path: Path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; test_cuda_run covers it")
    result = vibench("run", str(COIN), "--device", "cuda", "--steps", "3", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: device 'cuda': CUDA is not available here")


def test_list_shows_every_component_with_plugin_options_and_description():
    result = vibench("list", "--json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    by_name = {(kind, c["name"]): c for kind in ("model", "guide", "loss", "optimizer",
                                                 "optim_args") for c in listing[kind]}
    assert {("model", "beta_bernoulli"), ("guide", "beta"), ("guide", "auto_normal"),
            ("loss", "elbo"), ("optimizer", "adam"), ("optim_args", "per_param")} <= set(by_name)
    beta = by_name[("guide", "beta")]
    assert beta["plugin"] == "vibench.guides"
    assert beta["options"]["init_alpha"] == {"default": 15.0, "required": False, "type": "float"}
    assert "model" not in beta["options"]  # injected by vibench, not an option
    assert by_name[("optimizer", "adam")]["options"]["betas"]["default"] == [0.9, 0.999]
    assert all(c["description"] for c in by_name.values())
    assert listing["broken"] == [] and listing["conflicts"] == []
    models = {c["name"]: c for c in listing["model"]}
    assert models["beta_bernoulli"]["data_arguments"] == ["flips"]
    assert models["linear_regression"]["data_arguments"] == ["x", "y"]
    assert "data_arguments" not in beta

    text = vibench("list").stdout
    assert "beta_bernoulli" in text and "init_alpha=15.0" in text
    assert "[plugin vibench.guides]" in text
    assert "data: flips" in text


def test_list_shows_whole_descriptions_wrapped_and_guide_auto():
    """A description is its docstring's first paragraph, whole; a terminal's width (COLUMNS)
    wraps it at spaces under the first line. ``guide: auto`` is listed as built in: no plugin
    registers it and no component is made of it."""
    from workbench.plugins.registry import get_registry

    listing = json.loads(vibench("list", "--json").stdout)
    models = {c["name"]: c for c in listing["model"]}
    guides = {c["name"]: c for c in listing["guide"]}
    assert models["eight_schools"]["description"].endswith(
        "with each school's effect theta = mu + tau * theta_tilde recorded as a deterministic "
        "site.")
    assert guides["pathfinder"]["description"].endswith("more steps go on with SVI from there.")
    assert guides["auto"] == {
        "name": "auto", "plugin": None, "built_in": True, "options": {},
        "description": guides["auto"]["description"],
        "stages": ["start", "gaussian", "rhat", "psis", "hmc", "flow"]}
    assert guides["auto"]["description"].startswith("The automatic pipeline")
    assert [c["name"] for c in listing["guide"]][:2] == ["auto", "auto_delta"]
    assert "auto" not in get_registry().components["guide"]

    text = vibench("list", "guide", env={"COLUMNS": "80"}, child=False).stdout.splitlines()
    for name in ("pathfinder", "auto"):
        (at,) = [i for i, line in enumerate(text) if line.split()[:1] == [name]]
        end = next(i for i in range(at, len(text)) if text[i].split()[:1] == ["options:"])
        assert end - at > 2  # wrapped over several lines ...
        assert all(len(line) <= 80 for line in text[at:end])  # ... to the terminal's width
        column = text[at].index(text[at].split()[1])  # each line under the first
        assert all(line[:column].strip() == "" for line in text[at + 1:end])
        shown = " ".join(" ".join(text[at:end]).split()[1:])
        assert shown == guides[name]["description"]  # every word, none broken
    assert "[built in]" in text[end]


class _Model:
    def __call__(self, x, y=None):
        pass


class _Static:
    @staticmethod
    def __call__(counts):
        pass


class _AnyData:
    def __call__(self, *args, **kwargs):
        pass


@pytest.mark.parametrize("factory, expected", [
    (_Model, ["x", "y"]), (_Static, ["counts"]), (_AnyData, None), (dict, None),
    (lambda scale=1.0: _Model(), None),
])
def test_data_arguments_are_read_from_the_model_class_without_building_it(factory, expected):
    from workbench.service import data_arguments

    assert data_arguments(factory) == expected


HEAVY = ("torch", "pyro", "arviz", "xarray", "h5netcdf")


def test_listing_and_help_import_nothing_heavy():
    code = ("import sys; from workbench.cli import app\n"
            "for args in (['list'], ['run', '--help'], ['--help'], ['runs', '--help'],\n"
            "             ['show', '--help'], ['export', '--help'], ['--version'], []):\n"
            "    app(args=args, standalone_mode=False)\n"
            f"print(*(name in sys.modules for name in {HEAVY!r}))")
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == " ".join(["False"] * len(HEAVY))


def test_version_is_the_installed_package_version():
    from importlib.metadata import version

    result = vibench("--version")
    expected = (0, f"vibench {version('vibench')}\n", "")
    assert (result.returncode, result.stdout, result.stderr) == expected


def test_bare_vibench_shows_the_help_and_exits_0():
    result = vibench()
    assert result.returncode == 0 and result.stderr == ""
    assert "Usage: vibench [OPTIONS] COMMAND" in result.stdout and "runs" in result.stdout


def _commands() -> list[str]:
    import typer

    from workbench.cli import app

    return sorted(typer.main.get_command(app).commands)


@pytest.mark.parametrize("command", _commands())
def test_each_command_s_help_has_examples_and_shows_flags_as_flags(command: str):
    """The help text itself, from the app in this process (``vibench --help`` in a child
    process is tested beside it)."""
    from typer.testing import CliRunner

    from workbench.cli import app

    result = CliRunner().invoke(app, [command, "--help"], prog_name="vibench")
    assert result.exit_code == 0, result.output
    examples = result.stdout.split("Examples:", 1)[1].split("╭", 1)[0]
    assert f"vibench {command}" in examples
    assert "<bool>" not in result.stdout and "--help " in result.stdout


def test_the_app_s_help_shows_completion_and_no_bool_labels():
    result = vibench("--help")
    assert result.returncode == 0
    for option in ("--version", "--install-completion", "--show-completion"):
        assert option in result.stdout
    assert "<bool>" not in result.stdout


def test_ctrl_c_stops_saves_and_exits_130(tmp_path: Path):
    out = tmp_path / "r"
    child = start(COIN, out, "--steps", LONG)
    wait_training([out], child)
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "interrupted after" in stderr and str(out) in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["steps"] < 1_000_000
    assert summary["posterior"]["latent_fairness"]["mean"] > 0
    assert (out / "params.pt").exists()


def test_threads_sets_torch_s_thread_count(tmp_path: Path):
    out = tmp_path / "r"
    result = vibench("run", str(COIN), "--steps", "5", "--threads", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["threads"] == 2
    bad = vibench("run", str(COIN), "--threads", "0")
    assert bad.returncode == 2 and "--threads" in bad.stderr


def test_a_run_without_threads_takes_omp_num_threads_again_after_one_with_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """In one process (a notebook, say), ``threads=2`` does not outlive its run: the next run
    without it has the count OMP_NUM_THREADS says."""
    import torch

    from workbench import fit

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    before = torch.get_num_threads()
    try:
        fit(COIN, steps=2, threads=2, out=tmp_path / "a", progress=False)
        assert torch.get_num_threads() == 2
        assert fit(COIN, steps=2, out=tmp_path / "b", progress=False).summary["threads"] == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_list_help_names_every_kind():
    from workbench.config.kinds import KINDS

    text = " ".join(vibench("list", "--help", env={"COLUMNS": "200"}, child=False).stdout.split())
    assert all(kind in text for kind in KINDS), text
