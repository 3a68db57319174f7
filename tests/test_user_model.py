"""A component named by its file or module (``file.py:attr``, ``package.module:attr``): a
user's own model, guide or loss without a package, checked and built like a registered one."""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, vibench
from workbench.config import recipe as recipes
from workbench.errors import RecipeError
from workbench.plugins.registry import get_registry
from workbench.train.runner import Run

COIN_MODEL = """
    import pyro
    import pyro.distributions as dist


    class Coin:
        \"\"\"A coin whose fairness has a Beta(prior, prior) prior.\"\"\"

        def __init__(self, prior: float = 10.0):
            self.prior = prior

        def __call__(self, flips):
            fairness = pyro.sample("fairness", dist.Beta(float(self.prior), float(self.prior)))
            with pyro.plate("flips", len(flips)):
                pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)


    def model(flips):
        fairness = pyro.sample("fairness", dist.Beta(10.0, 10.0))
        with pyro.plate("flips", len(flips)):
            pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)
"""

FLIPS = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    return path


def recipe_file(directory: Path, **sections) -> Path:
    """A recipe in ``directory``: the coin's data, AutoNormal and Adam unless ``sections``
    say otherwise."""
    recipe = {"data": {"flips": FLIPS}, "guide": {"name": "auto_normal"}, "loss": {"name": "elbo"},
              "optimizer": {"name": "adam", "lr": 0.05},
              "train": {"steps": 20, "eval_every": 0, "plots": False}, **sections}
    return write(directory / "recipe.yaml", yaml.safe_dump(recipe))


def resolve(path: Path, *sets: str) -> dict:
    raw, overridden = recipes.apply_overrides(recipes.load(path), list(sets))
    return recipes.resolve(raw, get_registry(), str(path), overridden)


def train(run: Run, directory: Path) -> dict:
    (directory / "out").mkdir()
    return run.train(directory / "out")


def problems(path: Path, *sets: str) -> list[str]:
    with pytest.raises(RecipeError) as caught:
        resolve(path, *sets)
    return caught.value.problems


def test_the_example_recipe_runs_from_anywhere_and_resumes(tmp_path: Path):
    out = tmp_path / "run"
    result = vibench("run", str(REPO / "recipes" / "my_model.yaml"), "--steps", "20",
                     "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"] == {"name": f"{REPO / 'recipes' / 'my_model.py'}:model"}
    assert "fairness" in json.loads((out / "summary.json").read_text())["posterior"]
    result = vibench("run", "--resume", str(out), "--steps", "30", cwd=tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == 30


def test_a_factory_class_from_a_file_gets_its_options(tmp_path: Path):
    write(tmp_path / "coin.py", COIN_MODEL)
    path = recipe_file(tmp_path, model={"name": "coin.py:Coin", "prior": 2.0})
    resolved = resolve(path)
    assert resolved["model"] == {"name": f"{tmp_path / 'coin.py'}:Coin", "prior": 2.0}
    run = Run.setup(resolved, get_registry())
    assert run.model.prior == 2.0
    assert problems(path, "model.prior=abc") == [
        "model.prior: expected float, got 'abc' (set on the command line)"]
    assert problems(path, "model.prio=3") == [
        "model.prio: model 'coin.py:Coin' has no option 'prio'; did you mean 'prior'? "
        "(set on the command line)"]


def test_a_plain_function_is_the_model_itself_and_takes_its_data(tmp_path: Path):
    write(tmp_path / "line.py", """
        import pyro
        import pyro.distributions as dist


        def model(x, y):
            slope = pyro.sample("slope", dist.Normal(0.0, 10.0))
            with pyro.plate("data", len(x)):
                pyro.sample("y", dist.Normal(slope * x, 0.5), obs=y)
    """)
    path = recipe_file(tmp_path, model={"name": "line.py:model"},
                       data={"x": [0.0, 1.0, 2.0, 3.0], "y": [0.1, 2.1, 3.9, 6.2]})
    summary = train(Run.setup(resolve(path), get_registry()), tmp_path)
    assert summary["steps"] == 20 and "slope" in summary["posterior"]
    assert problems(path, "model.noise=1") == [
        "model.noise: model 'line.py:model' has no option 'noise'; a function is the model "
        "itself (its parameters are the data), so it takes no options; to give it options, "
        "make it a class whose __init__ takes them (set on the command line)"]


def test_a_guide_and_a_loss_from_a_file(tmp_path: Path):
    write(tmp_path / "coin.py", COIN_MODEL)
    write(tmp_path / "mine.py", """
        import pyro
        import pyro.distributions as dist
        import torch
        from torch.distributions import constraints


        def guide(flips):
            a = pyro.param("a", torch.tensor(15.0), constraint=constraints.positive)
            b = pyro.param("b", torch.tensor(15.0), constraint=constraints.positive)
            pyro.sample("fairness", dist.Beta(a, b))


        def elbo(num_particles: int = 1):
            \"\"\"Pyro's ELBO with that many particles.\"\"\"
            return pyro.infer.Trace_ELBO(num_particles=num_particles)
    """)
    path = recipe_file(tmp_path, model={"name": "coin.py:model"},
                       guide={"name": "mine.py:guide"},
                       loss={"name": "mine.py:elbo", "num_particles": 3})
    run = Run.setup(resolve(path), get_registry())
    assert run.svi.loss.__self__.num_particles == 3
    summary = train(run, tmp_path)
    assert set(summary["params"]) == {"a", "b"} and summary["steps"] == 20
    assert problems(path, "loss.num_particle=3") == [
        "loss.num_particle: loss 'mine.py:elbo' has no option 'num_particle'; did you mean "
        "'num_particles'? (set on the command line)"]


def test_a_class_from_a_module_is_a_factory_and_its_saved_recipe_runs_again(tmp_path: Path):
    write(tmp_path / "coin.py", COIN_MODEL)
    path = recipe_file(tmp_path, model={"name": "coin.py:model"},
                       guide={"name": "pyro.infer.autoguide:AutoNormal", "init_scale": 0.05})
    resolved = resolve(path)
    # init_loc_fn defaults to a function, which no recipe could hold: it is no option
    assert resolved["guide"] == {"name": "pyro.infer.autoguide:AutoNormal",
                                 "init_scale": 0.05, "create_plates": None}
    saved = write(tmp_path / "saved" / "recipe.yaml", recipes.dump(resolved))
    assert recipes.dump(resolve(saved)) == recipes.dump(resolved)
    assert Run.setup(resolved, get_registry()).guide._init_scale == 0.05


def test_a_package_module_attribute_on_the_python_path(tmp_path: Path):
    write(tmp_path / "lib" / "mypkg" / "__init__.py", "")
    write(tmp_path / "lib" / "mypkg" / "models.py", COIN_MODEL)
    recipe = recipe_file(tmp_path, model={"name": "mypkg.models:Coin", "prior": 3.0})
    out = tmp_path / "run"
    result = vibench("run", str(recipe), "--out", str(out), cwd=tmp_path,
                     env={"PYTHONPATH": os.pathsep.join(
                         filter(None, [str(tmp_path / "lib"), os.environ.get("PYTHONPATH")]))})
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert saved["model"] == {"name": "mypkg.models:Coin", "prior": 3.0}


def test_a_file_is_imported_once_per_process(tmp_path: Path):
    write(tmp_path / "counted.py", f"""
        with open({str(tmp_path / 'imports')!r}, "a") as log:
            log.write("imported\\n")


        def model(flips):
            pass
    """)
    path = recipe_file(tmp_path, model={"name": "counted.py:model"})
    resolve(path)
    resolve(path, f"model.name={tmp_path / 'counted.py'}:model")
    get_registry().get("model", "counted.py:model", tmp_path)
    assert (tmp_path / "imports").read_text() == "imported\n"


ERRORS = {
    "missing file": (None, "nope.py:model",
                     "model.name: nope.py:model: no such file nope.py (looked for {dir}/nope.py)"),
    "missing attribute": ("def model(flips):\n    pass\n", "mine.py:modle",
                          "model.name: mine.py:modle: no attribute 'modle' in mine.py; "
                          "did you mean 'model'?"),
    "syntax error": ("x = 1\ndef model(flips:\n    pass\n", "mine.py:model",
                     "model.name: mine.py:model: syntax error in mine.py at line 2: "
                     "'(' was never closed"),
    "exception at import": ("x = 1\ny = x / 0\n", "mine.py:model",
                            "model.name: mine.py:model: importing mine.py raised "
                            "ZeroDivisionError: division by zero at line 2"),
    "exit at import": ("import sys\nsys.exit(3)\n", "mine.py:model",
                       "model.name: mine.py:model: importing mine.py raised SystemExit: 3 "
                       "at line 2"),
    "missing module": (None, "no_such_pkg.models:model",
                       "model.name: no_such_pkg.models:model: no module named 'no_such_pkg' "
                       "(is it installed, or its directory on PYTHONPATH?)"),
    "not a python name": (None, "mine.py:my-model",
                          "model.name: mine.py:my-model: 'my-model' is not a Python name; "
                          "expected path/to/file.py:attr or package.module:attr"),
    "not callable": ("model = 3\n", "mine.py:model",
                     "model.name: mine.py:model: not a function or class (it is int)"),
    "no attribute named": (None, "mine.py",
                           "model.name: unknown model 'mine.py'; to use a file, name its "
                           "function or class too: 'mine.py:model'"),
}


@pytest.mark.parametrize("case", ERRORS, ids=str)
def test_each_failure_is_one_line_and_exit_2(tmp_path: Path, case: str):
    content, name, expected = ERRORS[case]
    if content is not None:
        write(tmp_path / "mine.py", content)
    recipe = recipe_file(tmp_path, model={"name": name})
    result = vibench("run", str(recipe), "--out", str(tmp_path / "run"), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {recipe}: {expected.format(dir=tmp_path.resolve())}"], result.stderr
    assert not (tmp_path / "run").exists()


NOT_BROADCASTING = """
    import pyro
    import pyro.distributions as dist
    import torch

    def model(x, y):
        beta = pyro.sample("beta", dist.Normal(torch.zeros(2), 1.0).to_event(1))
        with pyro.plate("rows", len(y)):
            pyro.sample("y", dist.Normal(x @ beta, 1.0), obs=y)
"""


def test_a_report_failure_is_one_line_in_summary_json(tmp_path: Path):
    """A plain model that does not broadcast over draws fails in the report's batched draws;
    what summary.json says of it is one line (Pyro's shape tables left out)."""
    (tmp_path / "plain.py").write_text(textwrap.dedent(NOT_BROADCASTING))
    (tmp_path / "plain.yaml").write_text(yaml.safe_dump({
        "model": {"name": "plain.py:model"}, "guide": {"name": "auto_normal"},
        "loss": {"name": "elbo"}, "optimizer": {"name": "adam", "lr": 0.01},
        "data": {"x": [[1.0, 0.5], [0.2, -1.0], [0.3, 0.3]], "y": [1.0, -0.5, 0.2]},
        "loggers": [], "train": {"steps": 20, "plots": False}}))
    result = vibench("run", str(tmp_path / "plain.yaml"), "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())

    def texts(value):
        if isinstance(value, dict):
            return [t for v in value.values() for t in texts(v)]
        if isinstance(value, list):
            return [t for v in value for t in texts(v)]
        return [value] if isinstance(value, str) else []

    assert all("\n" not in text for text in texts(summary["diagnostics"]))
