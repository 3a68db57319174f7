"""posterior.nc: every run's draws as ArviZ InferenceData, read back with ArviZ's own reader;
deterministic sites in the report; the posterior predictive plot; ``vibench export``."""

from __future__ import annotations

import json
import math
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import COIN, REPO, arviz, exported_again, vibench

SCHOOLS = REPO / "recipes" / "eight_schools.yaml"
GROUPS = {"posterior", "posterior_predictive", "log_likelihood", "sample_stats",
          "observed_data"}



@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """The coin and eight schools recipes, a few hundred steps each."""
    base = tmp_path_factory.mktemp("runs")
    recipes = {"coin": COIN, "schools": SCHOOLS}
    results = {name: (base / name, vibench("run", str(recipe), "--steps", "300", "--out",
                                           str(base / name)))
               for name, recipe in recipes.items()}
    for _, result in results.values():
        assert result.returncode == 0, result.stderr
    return results


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_posterior_nc_holds_the_groups_arviz_expects(runs):
    out, _ = runs["coin"]
    assert summary(out)["diagnostics"]["inference_data"] == "written"
    idata = arviz().from_netcdf(out / "posterior.nc")
    assert set(idata.groups()) == GROUPS
    draws = int(idata.posterior.attrs["num_draws"])
    assert draws == 1000
    assert dict(idata.posterior.sizes) == {"chain": 1, "draw": draws}
    assert idata.posterior["latent_fairness"].dims == ("chain", "draw")
    for group in ("posterior_predictive", "log_likelihood"):
        assert idata[group]["obs"].dims == ("chain", "draw", "flips")
        assert idata[group]["obs"].shape == (1, draws, 10)
    assert idata.observed_data["obs"].dims == ("flips",)
    assert idata.observed_data["obs"].values.tolist() == [1] * 6 + [0] * 4
    assert set(np.unique(idata.posterior_predictive["obs"].values)) <= {0.0, 1.0}
    assert set(idata.sample_stats.data_vars) == {"lp", "log_weight"}
    assert idata.sample_stats["log_weight"].shape == (1, draws)
    assert math.isfinite(idata.sample_stats.attrs["khat"]) and \
        idata.sample_stats.attrs["khat"] < 0.7
    flips = idata.log_likelihood["obs"].values[0]  # log Bernoulli(flip | fairness)
    fairness = idata.posterior["latent_fairness"].values[0][:, None]
    expected = np.where(idata.observed_data["obs"].values == 1, np.log(fairness),
                        np.log1p(-fairness))
    assert np.allclose(flips, expected, atol=1e-5)


@pytest.mark.parametrize("name", ["coin", "schools"])
def test_arviz_summary_agrees_with_summary_json_and_loo_runs(runs, name):
    out, _ = runs[name]
    az = arviz()
    idata = az.from_netcdf(out / "posterior.nc")
    table = az.summary(idata, kind="stats")
    draws = int(idata.posterior.attrs["num_draws"])
    for site, entry in summary(out)["posterior"].items():
        means = np.atleast_1d(entry["mean"])
        stds = np.atleast_1d(entry["std"])
        rows = [site] if len(means) == 1 and not isinstance(entry["mean"], list) else \
            [f"{site}[{i}]" for i in range(len(means))]
        for row, mean, std in zip(rows, means, stds):
            assert abs(table.loc[row, "mean"] - mean) < 5 * std / math.sqrt(draws) + 1e-3, row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a few schools are influential: Pareto k warnings
        loo = az.loo(idata, pointwise=True)
    assert math.isfinite(loo.elpd_loo) and loo.n_data_points == len(idata.observed_data.obs)


def test_eight_schools_theta_is_a_deterministic_site_everywhere(runs):
    out, result = runs["schools"]
    idata = arviz().from_netcdf(out / "posterior.nc")
    post = idata.posterior
    assert set(post.data_vars) == {"mu", "tau", "theta_tilde", "theta"}
    assert post["theta"].dims == post["theta_tilde"].dims == ("chain", "draw", "schools")
    assert np.allclose(post["theta"], post["mu"] + post["tau"] * post["theta_tilde"],
                       atol=1e-4)
    theta = summary(out)["posterior"]["theta"]
    assert theta["method"] == "sampled" and len(theta["mean"]) == 8
    assert all(low < mid < high for low, mid, high in
               zip(theta["q05"], theta["q50"], theta["q95"]))
    assert any(line.startswith("theta[0]: ") for line in result.stdout.splitlines())


def test_discrete_observations_are_integers_that_plot_ppc_draws_as_a_histogram(runs):
    """The coin's flips (Bernoulli, floats in Pyro) are read back by ArviZ as integers, in the
    data and in their replicates, so ``az.plot_ppc`` draws steps (a histogram), not a KDE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, _ = runs["coin"]
    az = arviz()
    idata = az.from_netcdf(out / "posterior.nc")
    assert idata.observed_data["obs"].dtype.kind == "i"
    assert idata.posterior_predictive["obs"].dtype.kind == "i"
    assert set(np.unique(idata.posterior_predictive["obs"].values)) <= {0, 1}
    ax = az.plot_ppc(idata, num_pp_samples=20, random_seed=0)
    try:
        (observed,) = [line for line in np.ravel(ax)[0].get_lines()
                       if line.get_label() == "Observed"]
        assert observed.get_drawstyle() == "steps-pre"
    finally:
        plt.close("all")


def test_binomial_poisson_and_categorical_sites_keep_an_integer_dtype(tmp_path: Path):
    """Every discrete likelihood's data and replicates are integers in posterior.nc, as ArviZ
    reads them; a continuous site's stay floats."""
    import pyro
    import pyro.distributions as dist
    import torch

    from workbench.report import inference_data

    def model(trials, counts, events, classes, y):
        rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
        p = pyro.sample("p", dist.Beta(2.0, 2.0))
        with pyro.plate("rows", 6):
            pyro.sample("successes", dist.Binomial(trials, p), obs=counts)
            pyro.sample("events", dist.Poisson(rate), obs=events)
            pyro.sample("class", dist.Categorical(torch.tensor([0.2, 0.3, 0.5])), obs=classes)
            pyro.sample("y", dist.Normal(rate, 1.0), obs=y)

    def guide(trials, counts, events, classes, y):
        pyro.sample("rate", dist.Gamma(20.0, 10.0))
        pyro.sample("p", dist.Beta(5.0, 5.0))

    data = {"trials": torch.full((6,), 10.0), "counts": torch.tensor([3.0, 5, 4, 6, 2, 5]),
            "events": torch.tensor([1.0, 0, 3, 2, 2, 1]),
            "classes": torch.tensor([0, 2, 1, 2, 2, 0]),
            "y": torch.tensor([1.5, 2.0, 0.3, 2.2, 1.9, 2.4])}
    groups, attrs = inference_data.draw(model, guide, data, 1, num_draws=200)
    inference_data.save(groups, attrs, tmp_path / "posterior.nc")
    idata = arviz().from_netcdf(tmp_path / "posterior.nc")
    for name in ("successes", "events", "class"):
        for group in ("observed_data", "posterior_predictive"):
            assert idata[group][name].dtype.kind == "i", (group, name)
    assert idata.observed_data["successes"].values.tolist() == [3, 5, 4, 6, 2, 5]
    assert idata.posterior_predictive["successes"].values.max() <= 10
    assert set(np.unique(idata.posterior_predictive["class"].values)) <= {0, 1, 2}
    assert idata.observed_data["y"].dtype.kind == "f"
    assert idata.posterior_predictive["y"].dtype.kind == "f"


def test_a_posterior_predictive_plot_for_each_run(runs):
    for out, _ in runs.values():
        assert (out / "plots" / "ppc.png").stat().st_size > 10_000


def test_export_rewrites_a_missing_posterior_nc(runs, tmp_path: Path):
    original, _ = runs["coin"]
    old, new = exported_again(original, tmp_path / "old-run")
    assert old.groups() == new.groups()
    for group in old.groups():
        before, after = old[group], new[group]
        assert dict(before.sizes) == dict(after.sizes), group
        assert set(before.attrs) == set(after.attrs), group
        for name in before.data_vars:  # the report's random stream: the same draws
            assert before[name].dims == after[name].dims
            assert np.array_equal(before[name].values, after[name].values), (group, name)


def test_predictive_off_leaves_the_data_sized_groups_out_and_export_agrees(tmp_path: Path):
    """``train.predictive: false``: posterior.nc without replicated data or pointwise
    log-likelihood (its left_out says why), no predictive plot, and ``vibench export``
    rewrites the same file."""
    out = tmp_path / "coin"
    result = vibench("run", str(COIN), "--steps", "100", "--out", str(out), "--set",
                     "train.predictive=false")
    assert result.returncode == 0, result.stderr
    idata = arviz().from_netcdf(out / "posterior.nc")
    assert set(idata.groups()) == {"posterior", "sample_stats", "observed_data"}
    assert idata.posterior.attrs["left_out"] == (
        "posterior_predictive and log_likelihood: train.predictive is off")
    assert idata.sample_stats["lp"].shape == (1, 1000)
    assert not (out / "plots" / "ppc.png").exists()
    assert (out / "plots" / "site-latent_fairness.png").is_file()
    old, new = exported_again(out, tmp_path / "old-run")
    assert old.groups() == new.groups()
    assert np.array_equal(old.posterior["latent_fairness"].values,
                          new.posterior["latent_fairness"].values)


def test_export_of_a_directory_that_is_not_a_run_is_one_line(tmp_path: Path):
    result = vibench("export", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not a vibench run directory (no checkpoint.pt); give the "
        "directory `vibench run` wrote"]
    assert list(tmp_path.iterdir()) == []


def coin_model(flips):
    import pyro
    import pyro.distributions as dist

    fairness = pyro.sample("fairness", dist.Beta(10.0, 10.0))
    with pyro.plate("flips", flips.shape[0]):
        pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)


def coin_guide(flips):
    import pyro
    import pyro.distributions as dist

    pyro.sample("fairness", dist.Beta(16.0, 14.0))


def test_data_too_big_for_replicates_keep_the_posterior_only(monkeypatch):
    """Where MIN_DRAWS draws of the replicated data would pass MAX_NUMBERS, posterior.nc holds
    the latent sites and the data, and says what it left out."""
    import torch

    from workbench.report import inference_data

    monkeypatch.setattr(inference_data, "MAX_NUMBERS", 10_000)
    flips = (torch.arange(100) % 2).float()
    groups, attrs = inference_data.draw(coin_model, coin_guide, {"flips": flips}, 1)
    assert set(groups) == {"posterior", "observed_data"}
    assert attrs[""]["num_draws"] == 1000 and groups["posterior"]["fairness"][0].shape == (1000,)
    assert "posterior_predictive, log_likelihood and sample_stats" in attrs[""]["left_out"]

    groups, attrs = inference_data.draw(coin_model, coin_guide, {"flips": flips[:20]}, 1)
    assert set(groups) == GROUPS and "left_out" not in attrs[""]
    assert attrs[""]["num_draws"] == 10_000 // (1 + 2 * 20 + 2)


def test_a_scalar_observation_is_written_and_read_back(tmp_path: Path):
    """A model observing one number: posterior.nc's 0-d observed data, uncompressed."""
    import pyro
    import pyro.distributions as dist
    import torch

    from workbench.report import inference_data

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)

    def guide(y):
        pyro.sample("mu", dist.Normal(0.25, 0.7))

    groups, attrs = inference_data.draw(model, guide, {"y": torch.tensor(0.5)}, 0)
    inference_data.save(groups, attrs, tmp_path / "posterior.nc")
    idata = arviz().from_netcdf(tmp_path / "posterior.nc")
    assert float(idata.observed_data["obs"]) == 0.5
    assert idata.posterior["mu"].shape == (1, 1000)
    assert idata.log_likelihood["obs"].shape == (1, 1000)


def test_a_failing_writer_costs_the_run_nothing(tmp_path: Path, monkeypatch):
    from workbench import service
    from workbench.plugins.registry import get_registry
    from workbench.report import inference_data

    def broken(*args, **kwargs):
        raise RuntimeError("no space for draws")

    monkeypatch.setattr(inference_data, "write", broken)
    job = service.start(COIN, ["train.steps=20", "train.eval_every=0"], tmp_path / "r",
                        get_registry())
    with pytest.warns(UserWarning, match="could not write posterior.nc"):
        result = job.train()
    assert result["status"] == "completed"
    assert result["diagnostics"]["inference_data"] == "failed: no space for draws"
    assert result["diagnostics"]["khat"] is not None
    assert summary(tmp_path / "r")["diagnostics"]["inference_data"].startswith("failed")
    assert not (tmp_path / "r" / "posterior.nc").exists()
    assert {p.name for p in (tmp_path / "r" / "plots").iterdir()} == {
        "loss.png", "site-latent_fairness.png"}


def test_a_factor_beside_observed_sites_is_left_out_of_their_groups_alone():
    """A model with a likelihood and a ``pyro.factor`` (a prior written as a log density):
    the observed site is replicated and read pointwise as before; the factor, which has no
    distribution to draw from, is left out of those groups, said in ``left_out``, with no
    warning (the posterior predictive check is whole)."""
    import pyro
    import pyro.distributions as dist
    import torch

    from workbench.report import inference_data

    def model(flips):
        fairness = pyro.sample("fairness", dist.Uniform(0.0, 1.0))
        pyro.factor("beta_prior", dist.Beta(10.0, 10.0).log_prob(fairness))
        with pyro.plate("flips", flips.shape[0]):
            pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        groups, attrs = inference_data.draw(model, coin_guide, {"flips": torch.ones(10)}, 1)
    assert set(groups) == GROUPS
    for group in ("posterior_predictive", "log_likelihood", "observed_data"):
        assert set(groups[group]) == {"obs"}
    assert groups["posterior_predictive"]["obs"][0].shape == (1000, 10)
    assert attrs[""]["left_out"].startswith("pyro.factor site(s) beta_prior in")
