"""The gaussian stage's funnel lever (``reparam: auto``, plugins/reparam.py): where the fits of
a centred hierarchical model are poor, the stage fits the same model with its funnel's sites
non-centred, and the answer still speaks of the user's sites; on a model with a mode it does
not fire."""

from __future__ import annotations

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import yaml

from tests.helpers import arviz, exported_again, vibench
from vibench_plugins.reparam import centred_sites
from workbench import service
from workbench.plugins.registry import get_registry

HERE = Path(__file__).resolve()
STAGES = ["start", {"name": "gaussian", "runs": 2, "modes": 0, "lr": 0.03, "max_steps": 50},
          "rhat", "psis"]
HARD = HERE.parent.parent / "packages" / "vibench-hardcases" / "recipes"


def centred(y):
    """Eight groups' means, centred, weak data: alpha ~ Normal(mu, tau), one noisy
    observation each, so tau's posterior reaches down to 0: a funnel, and no mode."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0)))
    with pyro.plate("groups", 8):  # as Pyro writes it: particles and draws broadcast
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(alpha, 2.0), obs=y)


def regression(x, y):
    """A line with an unknown noise scale: a posterior with a mode, nothing to non-centre
    (the scale's only child is observed)."""
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 5.0))
    b = pyro.sample("b", dist.Normal(torch.tensor(0.0), 5.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(torch.tensor(2.0)))
    with pyro.plate("rows", x.shape[-1]):
        pyro.sample("y", dist.Normal(a + b * x, sigma), obs=y)


def banana():
    """Haario's banana: x2's location bends with x1, a curved ridge."""
    x1 = pyro.sample("x1", dist.Normal(torch.tensor(0.0), 10.0))
    pyro.sample("x2", dist.Normal(-0.1 * (x1 ** 2 - 100.0), 1.0))


def sheared():
    """x2's location moves linearly with x1: a shear, which a Gaussian fits as it is."""
    x1 = pyro.sample("x1", dist.Normal(torch.tensor(0.0), 10.0))
    pyro.sample("x2", dist.Normal(0.5 * x1 + 1.0, 1.0))


def run(tmp_path: Path, model: str, data: dict, plots: bool = False) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": f"{HERE}:{model}"}, "data": data, "loggers": [],
        "train": {"plots": plots, "eval_every": 0}, "auto": {"stages": STAGES}}))
    return service.start(path, [], tmp_path / "run", get_registry()).train()


@pytest.fixture(scope="module")
def refitted(tmp_path_factory) -> tuple[dict, Path]:
    """The centred funnel through the pipeline, refitted non-centred, with its plots."""
    where = tmp_path_factory.mktemp("refitted")
    summary = run(where, "centred", {"y": [1.0, -0.5, 0.3, 2.0, -1.2, 0.8, 0.1, -0.3]},
                  plots=True)
    return summary, where / "run"


def test_the_funnels_sites_are_the_ones_whose_scale_is_another_latent():
    y = torch.zeros(8)
    assert centred_sites(centred, {"y": y}) == ["alpha"]
    x = torch.linspace(-1, 1, 5)
    assert centred_sites(regression, {"x": x, "y": x}) == []


def test_a_location_that_bends_with_another_latent_is_non_centred_and_a_shear_is_not():
    assert centred_sites(banana, {}) == ["x2"]
    assert centred_sites(sheared, {}) == []


@pytest.mark.parametrize("family", [
    lambda loc, scale: dist.Gumbel(loc, scale),
    lambda loc, scale: dist.Logistic(loc, scale),
    lambda loc, scale: dist.AsymmetricLaplace(loc, scale, torch.tensor(1.5)),
    lambda loc, scale: dist.NanMaskedNormal(loc, scale),  # a subclass of Normal
], ids=["gumbel", "logistic", "asymmetric_laplace", "normal_subclass"])
def test_every_location_scale_family_of_locscalereparam_is_a_funnels_site(family):
    def model(y):
        tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0)))
        with pyro.plate("groups", 8):
            alpha = pyro.sample("alpha", family(torch.zeros(8), tau[..., None]))
            pyro.sample("y", dist.Normal(alpha, 2.0), obs=y)

    assert centred_sites(model, {"y": torch.zeros(8)}) == ["alpha"]


def latent_gp(x):
    """A latent Gaussian process's values at ``x``: their covariance scales with one latent and
    changes shape with another (a funnel in many dimensions)."""
    amplitude = pyro.sample("amplitude", dist.HalfNormal(torch.tensor(1.0)))
    lengthscale = pyro.sample("lengthscale", dist.LogNormal(torch.tensor(0.0), 0.5))
    K = (amplitude[..., None, None] ** 2
         * torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / lengthscale[..., None, None] ** 2)
         + 1e-4 * torch.eye(len(x)))
    return pyro.sample("f", dist.MultivariateNormal(torch.zeros(len(x)), covariance_matrix=K))


def test_a_multivariate_normal_whose_covariance_is_another_latents_is_non_centred():
    """f = L z, z ~ Normal(0, 1): given the hyperparameters, f's draws have the covariance K."""
    from pyro import poutine

    from vibench_plugins.reparam import NonCentred

    x = torch.linspace(0.0, 3.0, 4)
    assert centred_sites(latent_gp, {"x": x}) == ["f"]
    fixed = {"amplitude": torch.tensor(1.5), "lengthscale": torch.tensor(0.8)}
    model = poutine.condition(NonCentred(latent_gp, ["f"]), data=fixed)
    with pyro.plate("draws", 20_000, dim=-1):
        trace = poutine.trace(model).get_trace(x)
    assert trace.nodes["f_decentered"]["value"].shape == (20_000, 4)
    assert trace.nodes["f"]["is_observed"]  # derived: its density is z's
    draws = trace.nodes["f"]["value"]
    K = 1.5 ** 2 * torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / 0.8 ** 2)
    # each entry's sampling sd is below sqrt(2/n) K_max: 5 of them is a 1e-6 chance per entry
    assert torch.allclose(draws.T.cov(), K, atol=5 * (2 / 20_000) ** 0.5 * 2.25)


def test_the_starts_potential_of_a_non_centred_model_moves_with_its_auxiliary_site():
    """The Laplace start, the mode searches and Pathfinder climb the density of the model as
    written: a non-centred site follows its ``_decentered`` coordinate there (under the
    guide's init strategy it kept its initial value, and the starts climbed the prior)."""
    from pyro import poutine
    from pyro.infer import Trace_ELBO

    from vibench_plugins import laplace
    from vibench_plugins.guides import auto_multivariate_normal
    from vibench_plugins.reparam import NonCentred

    y = torch.tensor([1.0, -0.5, 0.3, 2.0, -1.2, 0.8, 0.1, -0.3])
    model = NonCentred(centred, ["alpha"])
    guide = auto_multivariate_normal(model)
    Trace_ELBO().loss(model, guide, y)
    sites = laplace.layout(guide)
    potential = laplace.potential_fn(laplace.model_of(guide), sites, (y,), {})
    point = torch.randn(sites[-1].stop, generator=torch.Generator().manual_seed(0))
    values, log_jacobian = {}, 0.0
    for site in sites:
        unconstrained = point[site.start:site.stop].reshape(site.shape)
        values[site.name] = site.transform(unconstrained)
        log_jacobian += site.transform.log_abs_det_jacobian(unconstrained, values[site.name]).sum()
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(y)
    assert torch.allclose(trace.nodes["alpha"]["value"],
                          values["mu"] + values["tau"] * values["alpha_decentered"])
    assert float(potential(point)) == pytest.approx(float(-(trace.log_prob_sum() + log_jacobian)))


def test_a_scale_family_off_the_real_line_is_no_funnels_site():
    def model(y):
        tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0)))
        with pyro.plate("groups", 8):
            alpha = pyro.sample("alpha", dist.LogNormal(torch.zeros(8), tau[..., None]))
            pyro.sample("y", dist.Normal(alpha, 2.0), obs=y)

    assert centred_sites(model, {"y": torch.zeros(8)}) == []


def test_a_centred_funnel_is_refitted_non_centred_under_the_users_site_names(refitted):
    summary, _ = refitted
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert "refitted with alpha non-centred" in said["gaussian"]
    labels = [fit["label"] for fit in summary["auto"]["fits"]]
    # no mode at gaussian-1's Laplace start: the non-centred fits before any other centred one
    assert labels == ["gaussian-1", "noncentred-1", "noncentred-2"]
    assert "fit 2 not launched yet: the non-centred fits come first" in said["gaussian"]
    assert "kept (ELBO" in said["gaussian"] and "against the centred fit's" in said["gaussian"]
    assert set(summary["posterior"]) >= {"mu", "tau", "alpha"}
    alpha = summary["posterior"]["alpha"]
    assert len(alpha["mean"]) == 8 and min(alpha["std"]) > 0.3  # the groups, not collapsed
    assert summary["auto"]["used"][0].startswith("noncentred-")


def test_the_refitted_answer_is_the_model_as_written(refitted, tmp_path):
    """The user's alpha is reported, written and plotted as a latent site; the fit's
    coordinate alpha_decentered nowhere; the diagnostics are the fit's."""
    import workbench

    summary, path = refitted
    assert list(summary["posterior"]) == ["mu", "tau", "alpha"]
    assert summary["diagnostics"]["khat"] is not None
    assert "alpha_decentered" not in json.dumps(summary["auto"]["rhat"])
    az = arviz()
    for folder in (path, path / "fits" / summary["auto"]["used"][0]):
        assert list(az.from_netcdf(folder / "posterior.nc").posterior.data_vars) == [
            "mu", "tau", "alpha"]
    plotted = {p.name for p in (path / "plots").glob("site-*.png")}  # a fit draws none
    assert plotted == {"site-mu.png", "site-tau.png", "site-alpha.png"}
    fit = json.loads((path / "fits" / summary["auto"]["used"][0] / "summary.json").read_text())
    assert list(fit["posterior"]) == ["mu", "tau", "alpha"]
    assert {"q05", "q95"} <= set(fit["posterior"]["alpha"])
    shown = vibench("show", str(path))
    assert shown.returncode == 0 and "alpha[7]: " in shown.stdout, shown.stderr
    assert "decentered" not in shown.stdout
    before, after = exported_again(path, tmp_path / "copy")
    assert list(after.posterior.data_vars) == list(before.posterior.data_vars)
    draws = workbench.load(path).sample(20, seed=0)
    assert set(draws) == {"mu", "tau", "alpha"} and draws["alpha"].shape == (20, 8)


def test_a_weighed_mixture_of_non_centred_fits_draws_the_model_as_written(refitted):
    """Where the answer is the fits' weighed mixture, its density lives in the guides'
    space, alpha_decentered's: drawn to weigh, then left out."""
    from workbench.auto import answer

    summary, path = refitted
    mixed = {**summary, "auto": {**summary["auto"], "answer": answer.MIXTURE}}

    def load(fit: Path):
        return service.load(fit, get_registry(), trust_code=True)

    for whole in (False, True):
        drawn = answer.answer_draws(path, mixed, 40, load, seed=0, whole=whole)
        assert drawn.mixture, drawn.notes
        names = set(drawn.groups["posterior"]) if whole else set(drawn.draws)
        assert names == {"mu", "tau", "alpha"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_where_the_centred_fit_has_the_higher_elbo_the_centred_fits_go_on(tmp_path, monkeypatch):
    from workbench.auto import pipeline

    elbo = pipeline.Fit.elbo.fget  # the non-centred fits made worse, as data could make them
    monkeypatch.setattr(pipeline.Fit, "elbo", property(
        lambda fit: elbo(fit) - (1e3 if fit.label.startswith("noncentred") else 0)))
    summary = run(tmp_path, "centred", {"y": [1.0, -0.5, 0.3, 2.0, -1.2, 0.8, 0.1, -0.3]})
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    labels = [fit["label"] for fit in summary["auto"]["fits"]]
    assert labels == ["gaussian-1", "noncentred-1", "noncentred-2", "gaussian-2"]
    assert "no better: kept the centred fits; the centred fits went on: 2 " in said["gaussian"]
    assert summary["auto"]["used"][0].startswith("gaussian-")
    assert said["rhat"].startswith("R-hat across 2 fits")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_a_model_with_a_mode_is_not_reparameterised(tmp_path):
    x = [float(v) for v in torch.linspace(-1, 1, 20)]
    y = [1.0 + 2.0 * v + 0.3 * ((i * 7) % 5 - 2) for i, v in enumerate(x)]
    summary = run(tmp_path, "regression", {"x": x, "y": y})
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert "non-centred" not in said["gaussian"]
    assert all(fit["label"].startswith("gaussian-") for fit in summary["auto"]["fits"])
    assert set(summary["posterior"]) == {"a", "b", "sigma"}


@pytest.mark.slow
def test_the_centred_funnel_in_ten_dimensions_is_fitted(tmp_path):
    """hard_funnel10 seed 0 with the default pipeline: trusted and right (before the lever:
    max z 3.88, r down to 0.00, flagged)."""
    pytest.importorskip("vibench_hardcases")
    summary = service.start(HARD / "hard_funnel10.yaml", ["seed=0", "loggers=[]",
                            "train.plots=false", "train.eval_every=0"], tmp_path / "run",
                            get_registry()).train()
    assert summary["auto"]["used"][0].startswith("noncentred-")
    # trusted, with a caution on the sd of x = exp(v / 2) z, which 10,000 draws do not pin
    assert summary["auto"]["flags"] == [] and summary["auto"]["trusted"]
    assert all("is not known to +-10%" in line for line in summary["auto"]["cautions"])
    reference = summary["reference"]
    assert reference["max_z"] <= 0.2 and 0.8 <= reference["min_r"] <= reference["max_r"] <= 1.2
    assert set(summary["posterior"]) >= {"v", "x"}


@pytest.mark.slow
def test_the_banana_is_fitted_non_centred(tmp_path):
    """hard_banana seed 0 with the default pipeline: x2 non-centred, where the banana is a
    Gaussian, trusted and right (centred: max z 0.67, r 0.08-0.22, flagged)."""
    pytest.importorskip("vibench_hardcases")
    summary = service.start(HARD / "hard_banana.yaml", ["seed=0", "loggers=[]",
                            "train.plots=false", "train.eval_every=0"], tmp_path / "run",
                            get_registry()).train()
    assert summary["auto"]["used"][0].startswith("noncentred-")
    assert summary["auto"]["flags"] == []
    reference = summary["reference"]
    assert reference["max_z"] <= 0.2 and 0.8 <= reference["min_r"] <= reference["max_r"] <= 1.2
    assert set(summary["posterior"]) == {"x1", "x2"}


def test_one_mode_found_by_every_centred_search_is_not_searched_for_again(tmp_path,
                                                                          monkeypatch):
    """The banana has one mode: every search of the centred model finds it, and the
    non-centred refit (the same posterior's mass under a change of variables) runs none."""
    from vibench_plugins import modes

    searched = []
    search = modes.search
    monkeypatch.setattr(modes, "search", lambda *args, **kwargs: searched.append(1) or
                        search(*args, **kwargs))
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name": f"{HERE}:banana"}, "data": {}, "loggers": [],
        "train": {"plots": False, "eval_every": 0},
        "auto": {"stages": ["start", {"name": "gaussian", "runs": 2, "modes": 2,
                                      "lr": 0.03, "max_steps": 50}, "rhat", "psis"]}}))
    summary = service.start(path, [], tmp_path / "run", get_registry()).train()
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}["gaussian"]
    assert "3 mode searches from overdispersed starts: 3 converged, one mode" in said
    assert "refitted with x2 non-centred" in said
    assert "no mode searches: every search of the centred model found its one mode" in said
    assert len(searched) == 1
