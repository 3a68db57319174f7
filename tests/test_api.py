"""The Python API (``from workbench import fit, load``): real runs of a few hundred steps, in
this process, against what ``vibench run`` writes and prints for the same recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import COIN, REPO, python, vibench
from workbench import fit, load
from workbench.errors import RecipeError, UsageError

QUIET = {"train.plots": False, "loggers": []}  # plots and event files no test here reads
FLIPS = [1, 1, 1, 1, 1, 1, 0, 0, 0, 0]


def coin(flips):
    """The coin as a plain Pyro model, defined here as in a notebook."""
    import pyro
    import pyro.distributions as dist

    fairness = pyro.sample("fairness", dist.Beta(10.0, 10.0))
    with pyro.plate("flips", len(flips)):
        pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)


@pytest.fixture(scope="module")
def coin_fit(tmp_path_factory):
    """The shipped coin recipe through fit, from its path: 200 steps."""
    return fit(COIN, steps=200, out=tmp_path_factory.mktemp("api") / "coin", set=QUIET)


@pytest.fixture(scope="module")
def pipeline_fit(tmp_path_factory):
    """The notebook's coin model with data alone: the automatic pipeline (about 6 s)."""
    return fit(model=coin, data={"flips": FLIPS}, out=tmp_path_factory.mktemp("api") / "auto",
               set={"loggers": []})


def near(draws, mean: float, sd: float, n: int) -> bool:
    """Whether the draws' mean is within 5 Monte Carlo standard errors (and 3 posterior sds)
    of ``mean``, and their sd within 20% of ``sd``."""
    gap = abs(float(draws.mean()) - mean)
    return gap < min(5 * sd / math.sqrt(n), 3 * sd) and abs(float(draws.std()) / sd - 1) < 0.2


def test_fit_from_a_path_returns_the_run_s_summary_and_verdict(coin_fit):
    summary = json.loads((coin_fit.run_dir / "summary.json").read_text())
    assert coin_fit.summary == summary and summary["steps"] == 200
    reading = summary["diagnostics"]["reading"]
    assert coin_fit.verdict.startswith(f"PSIS k-hat {summary['diagnostics']['khat']:.2f} "
                                       f"({reading}); importance-sampling ESS")
    assert coin_fit.reading == reading
    assert coin_fit.verdict in repr(coin_fit) and str(coin_fit.run_dir) in repr(coin_fit)


def test_sample_draws_the_fitted_posterior(coin_fit):
    post = coin_fit.summary["posterior"]["latent_fairness"]
    draws = coin_fit.sample(1000, seed=1)
    assert set(draws) == {"latent_fairness"} and draws["latent_fairness"].shape == (1000,)
    assert near(draws["latent_fairness"], post["mean"], post["std"], 1000)
    again = coin_fit.sample(1000, seed=1)["latent_fairness"]
    assert (again == draws["latent_fairness"]).all()  # a seed gives the same draws
    assert not (coin_fit.sample(1000)["latent_fairness"] == again).all()


def test_to_arviz_is_the_run_s_posterior_nc(coin_fit):
    data = coin_fit.to_arviz()
    assert "posterior" in data.groups()
    assert data.posterior["latent_fairness"].shape == (1, 1000)


def test_load_gives_back_the_same_run(coin_fit):
    loaded = load(coin_fit.run_dir)
    assert loaded.summary == coin_fit.summary and loaded.verdict == coin_fit.verdict
    assert str(loaded) == str(coin_fit)
    assert (loaded.sample(50, seed=3)["latent_fairness"]
            == coin_fit.sample(50, seed=3)["latent_fairness"]).all()


def test_fit_and_vibench_run_share_one_path(coin_fit, tmp_path: Path):
    """The same recipe and seed through the shell: the same numbers, and the lines it prints
    are the result's report."""
    out = tmp_path / "cli"
    result = vibench("run", str(COIN), "--steps", "200", "--out", str(out),
                     "--set", "train.plots=false", "--set", "loggers=[]")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    for key in ("posterior", "diagnostics", "final_loss", "params", "steps"):
        assert summary[key] == coin_fit.summary[key], key
    printed = result.stdout.splitlines()
    assert printed[:-1] == coin_fit.report()[:-1]  # the last line names the run directory
    assert coin_fit.verdict in printed


def test_fit_from_a_dict_writes_it_nowhere_but_the_run(tmp_path: Path, monkeypatch):
    import yaml

    recipe = yaml.safe_load(COIN.read_text())
    del recipe["name"]
    monkeypatch.chdir(tmp_path)
    result = fit(recipe, steps=100, seed=3, out="run", set=QUIET)
    assert result.run_dir == Path("run") and result.summary["recipe"]["name"] == "run"
    assert result.summary["recipe"]["seed"] == 3 and result.summary["steps"] == 100
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    assert yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["model"] == \
        result.summary["recipe"]["model"]


def test_fit_a_notebook_model_with_a_named_guide(tmp_path: Path):
    result = fit(model=coin, data={"flips": FLIPS}, guide="auto_normal", loss="elbo",
                 optimizer={"name": "adam", "lr": 0.05}, steps=300, out=tmp_path / "run",
                 set=QUIET)
    recipe = result.summary["recipe"]
    assert recipe["model"] == {"name": "notebook:coin"} and recipe["name"] == "coin"
    post = result.summary["posterior"]["fairness"]
    assert abs(post["mean"] - 16 / 30) < 0.05
    draws = result.sample(1000, seed=0)
    assert draws["fairness"].shape == (1000,)
    assert near(draws["fairness"], post["mean"], post["std"], 1000)
    with pytest.raises(UsageError, match=r"its model \(notebook:coin\) was a Python object .* "
                                         r"load\(run_dir, model=\.\.\.\)"):
        load(result.run_dir).sample(10)
    again = load(result.run_dir, model=coin)
    assert again.summary == result.summary
    assert (again.sample(20, seed=4)["fairness"] == result.sample(20, seed=4)["fairness"]).all()


def test_fit_a_notebook_model_alone_runs_the_pipeline(pipeline_fit):
    assert pipeline_fit.pipeline and "auto" in pipeline_fit.summary
    assert pipeline_fit.verdict.startswith("PSIS k-hat")
    post = pipeline_fit.summary["posterior"]["fairness"]
    draws = pipeline_fit.sample(4000, seed=0)["fairness"]
    assert draws.shape == (4000,)
    assert near(draws, post["mean"], post["std"], 4000)
    data = pipeline_fit.to_arviz()  # the pipeline's own posterior.nc: its answer's draws
    assert {"posterior", "posterior_predictive", "sample_stats"} <= set(data.groups())
    assert data.posterior.attrs["fits"] == ",".join(pipeline_fit.summary["auto"]["used"])
    assert near(data.posterior["fairness"].values[0], post["mean"], post["std"], 1000)
    loaded = load(pipeline_fit.run_dir, model=coin)
    assert loaded.summary == pipeline_fit.summary and loaded.verdict == pipeline_fit.verdict
    assert sorted(path.name for path in loaded.plot()) == ["ppc.png", "site-fairness.png"]
    assert all(path.parent == pipeline_fit.run_dir / "plots" for path in loaded.plot())


def test_pipeline_draws_are_resampled_by_weight_where_it_weighed(pipeline_fit, tmp_path: Path):
    """A pipeline run that reported importance-weighted estimates: its draws are its fits'
    draws resampled by their PSIS weights (the same run directory, said to have weighed every
    fit it used; and, as a summary from before ``auto.weighted``, its fits' k-hats said to be
    good)."""
    import shutil

    copy = tmp_path / "auto"
    shutil.copytree(pipeline_fit.run_dir, copy)
    summary = json.loads((copy / "summary.json").read_text())
    summary["auto"]["weighted"] = list(summary["auto"]["used"])
    (copy / "summary.json").write_text(json.dumps(summary))
    draws = load(copy, model=coin).sample(2000, seed=0)["fairness"]
    assert draws.unique().numel() < 2000  # resampled: some draws repeat
    assert near(draws, 16 / 30, math.sqrt(16 * 14 / (30**2 * 31)), 2000)
    del summary["auto"]["weighted"]
    for entry in summary["auto"]["fits"]:
        entry["khat"] = 0.1
    (copy / "summary.json").write_text(json.dumps(summary))
    assert (load(copy, model=coin).sample(2000, seed=0)["fairness"] == draws).all()


def test_load_imports_a_run_s_code_only_with_trust_code(tmp_path: Path):
    """fit ran the recipe's file.py:attr model itself, so its result draws; a run folder read
    back with load is data until trust_code=True."""
    result = fit(REPO / "recipes" / "my_model.yaml", steps=100, out=tmp_path / "run", set=QUIET)
    assert result.sample(5)["fairness"].shape == (5,)
    loaded = load(tmp_path / "run")
    assert loaded.summary == result.summary  # reading it runs nothing
    with pytest.raises(UsageError, match=r"names code \(.*my_model\.py:model\).*"
                                         r"trust_code=True in Python"):
        loaded.sample(5)
    assert load(tmp_path / "run", trust_code=True).sample(5)["fairness"].shape == (5,)


def test_a_bad_recipe_raises_the_error_vibench_run_prints(tmp_path: Path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(COIN.read_text().replace("name: beta\n", "name: betta\n")
                   .replace("steps: 4000", "steps: -1"))
    with pytest.raises(RecipeError) as caught:
        fit(bad, out=tmp_path / "run")
    result = vibench("run", str(bad), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {line}" for line in caught.value.lines()]
    assert len(caught.value.lines()) == 2 and not (tmp_path / "run").exists()


def test_bad_arguments_are_usage_errors(tmp_path: Path):
    with pytest.raises(UsageError, match="did you mean 'steps'"):
        fit(COIN, stpes=10)
    with pytest.raises(UsageError, match="give a recipe"):
        fit()
    with pytest.raises(UsageError, match="no such recipe file"):
        fit(tmp_path / "missing.yaml")
    with pytest.raises(UsageError, match="no summary.json"):
        load(tmp_path)


def test_progress_is_a_notebook_bar_in_jupyter_and_silent_in_a_script(tmp_path: Path,
                                                                       monkeypatch, capfd):
    from workbench import api

    fit(COIN, steps=50, out=tmp_path / "plain", set=QUIET)
    assert "step " not in capfd.readouterr().err  # no raw progress lines
    monkeypatch.setattr(api, "in_notebook", lambda: True)
    fit(COIN, steps=50, out=tmp_path / "notebook", set=QUIET)
    err = capfd.readouterr().err
    assert "SVI" in err and "50/50" in err and "loss" in err and "step 5/50" not in err


def test_from_workbench_import_fit_is_lazy_and_hookimpl_stays_torch_free():
    probe = ("import sys, workbench\nfrom workbench import hookimpl\n"
             "print('workbench.api' in sys.modules, 'torch' in sys.modules)\n"
             "from workbench import fit, load\n"
             "print(callable(fit) and callable(load), sorted(workbench.__all__))")
    done = python(probe)
    assert done.stdout.splitlines() == ["False False", "True ['fit', 'hookimpl', 'load']"], \
        done.stderr
