"""The posterior report and the "did it work?" diagnostics, on the seed's coin (exact
posterior Beta(16, 14)) and on a small model with tensor sites, called directly (no recipe)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.optim import ClippedAdam

from vibench_plugins.guides import (
    auto_delta,
    auto_diagonal_normal,
    auto_multivariate_normal,
    auto_normal,
)
from vibench_plugins.models import BetaBernoulli
from workbench.report import posterior

FLIPS = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0, 0, 0])
EXACT = dist.Beta(torch.tensor(16.0), torch.tensor(14.0))
EXACT_MEAN, EXACT_STD = 16 / 30, math.sqrt(16 * 14 / (30**2 * 31))


def beta_quantile(q: float, alpha: float = 16.0, beta: float = 14.0) -> float:
    """A Beta's quantile from its CDF on a fine grid (torch has no Beta icdf)."""
    z = torch.linspace(1e-6, 1 - 1e-6, 20_001, dtype=torch.float64)
    density = dist.Beta(torch.tensor(alpha, dtype=torch.float64),
                        torch.tensor(beta, dtype=torch.float64)).log_prob(z).exp()
    cdf = torch.cumulative_trapezoid(density, z)
    return z[1:][torch.searchsorted(cdf, torch.tensor(q, dtype=torch.float64))].item()


def fixed_beta_guide(alpha: float, beta: float):
    """A Beta guide with given (not learned) parameters: the state of a fitted BetaGuide,
    safe from other tests clearing the param store."""
    a, b = torch.tensor(float(alpha)), torch.tensor(float(beta))

    def guide(flips):
        pyro.sample("latent_fairness", dist.Beta(a, b))

    return guide


def fit(model, guide, data, steps, lr=0.05, particles=7, nesting=1):
    """The seed's loss (ELBO, vectorised particles) and Adam's betas, with a larger, decaying
    learning rate and fewer steps."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    svi = SVI(model, guide, ClippedAdam({"lr": lr, "betas": (0.90, 0.999), "lrd": 0.99}),
              Trace_ELBO(num_particles=particles, vectorize_particles=True,
                         max_plate_nesting=nesting))
    for _ in range(steps):
        svi.step(**data)
    return guide


@pytest.fixture(scope="module")
def coin():
    model = BetaBernoulli()
    data = {"flips": FLIPS}
    trace = poutine.trace(model).get_trace(**data)
    return {"model": model, "data": data, "sites": posterior.latent_sites(trace),
            "nesting": posterior.plate_nesting(trace), "exact": model.exact_posterior(**data)}


@pytest.fixture(scope="module")
def fitted_beta(coin):
    """The seed's Beta guide (log-space parameters from log 15) fitted to the coin; returns
    its learned alpha and beta."""
    from vibench_plugins.guides import BetaGuide

    fit(coin["model"], BetaGuide(coin["model"]), coin["data"], steps=100)
    return pyro.param("log_alpha_q").exp().item(), pyro.param("log_beta_q").exp().item()


def summarize(coin, guide, **kw):
    pyro.set_rng_seed(1)
    return posterior.summarize(guide, coin["data"], coin["sites"], coin["nesting"],
                               coin["exact"], **kw)["latent_fairness"]


def diagnose(coin, guide, **kw):
    pyro.set_rng_seed(2)
    return posterior.diagnostics(coin["model"], guide, coin["data"], coin["nesting"], **kw)


def test_quantiles_bracket_the_mean_and_match_the_exact_posterior(coin, fitted_beta):
    post = summarize(coin, fixed_beta_guide(*fitted_beta))
    assert post["method"] == "analytic"
    assert post["q05"] < post["q50"] < post["q95"]
    assert post["q05"] < post["mean"] < post["q95"]
    for key, q in [("q05", 0.05), ("q50", 0.5), ("q95", 0.95)]:
        assert post[key] == pytest.approx(beta_quantile(q), abs=0.02), key
    assert post["exact_mean"] == pytest.approx(EXACT_MEAN)
    assert post["exact_std"] == pytest.approx(EXACT_STD, rel=1e-5)
    assert post["mean_error"] == pytest.approx(post["mean"] - EXACT_MEAN, abs=1e-6)
    assert post["std_error"] == pytest.approx(post["std"] - EXACT_STD, abs=1e-6)
    assert abs(post["mean_error"]) < 0.015 and abs(post["std_error"]) < 0.01


def test_kl_is_closed_form_for_a_beta_guide_small_when_fitted_large_when_not(coin, fitted_beta):
    good = summarize(coin, fixed_beta_guide(*fitted_beta))
    bad = summarize(coin, fixed_beta_guide(100, 2))
    assert good["kl_method"] == bad["kl_method"] == "closed_form"
    assert 0 <= good["kl"] < 0.02
    assert bad["kl"] > 10
    expected = torch.distributions.kl_divergence(dist.Beta(torch.tensor(100.0),
                                                           torch.tensor(2.0)), EXACT)
    assert bad["kl"] == pytest.approx(expected.item(), rel=1e-5)


def test_khat_is_good_for_the_fitted_coin_and_bad_for_a_guide_far_away(coin, fitted_beta):
    good = diagnose(coin, fixed_beta_guide(*fitted_beta))
    assert good["khat"] < 0.5 and good["reading"] == "good"
    assert good["ess_fraction"] > 0.8 and good["ess"] == pytest.approx(
        good["ess_fraction"] * good["num_draws"])
    site = good["sites"]["latent_fairness"]
    assert site["iw_mean"] == pytest.approx(EXACT_MEAN, abs=0.005)
    assert site["iw_std"] == pytest.approx(EXACT_STD, abs=0.005)

    bad = diagnose(coin, fixed_beta_guide(100, 2))
    assert bad["khat"] > 0.7 and bad["reading"] == "bad: do not trust"
    assert bad["ess_fraction"] < 0.01
    assert "sites" not in bad  # no importance-weighted estimates from weights like these


def test_importance_weights_correct_a_poor_guide(coin):
    """The seed's starting guide Beta(15, 15) is off by 0.033 in the mean; reweighted, its
    draws give the exact posterior's mean and sd."""
    guide = fixed_beta_guide(15, 15)
    own = summarize(coin, guide)
    result = diagnose(coin, guide)
    assert result["khat"] < 0.7
    site = result["sites"]["latent_fairness"]
    assert abs(own["mean"] - EXACT_MEAN) > 0.03
    assert abs(site["iw_mean"] - EXACT_MEAN) < 0.005
    assert abs(site["iw_std"] - EXACT_STD) < 0.005


def test_auto_normal_gets_a_monte_carlo_kl_with_its_jacobian(coin):
    """AutoNormal's site is a Delta carrying log |Jacobian| of the sigmoid, beside a Normal
    auxiliary: their sum is the guide's density, so the Monte Carlo KL agrees with the KL of
    the logit-normal computed by quadrature (without the Jacobian it would be off by ~1.4)."""
    guide = fit(coin["model"], auto_normal(coin["model"]), coin["data"], steps=120)
    post = summarize(coin, guide)
    assert post["method"] == "sampled" and post["kl_method"] == "monte_carlo"
    loc = guide.locs.latent_fairness.detach().double()
    scale = guide.scales.latent_fairness.detach().double()
    u = torch.linspace(-12, 12, 100_001, dtype=torch.float64) * scale + loc
    q_u = dist.Normal(loc, scale).log_prob(u)
    z = torch.sigmoid(u)
    log_q_z = q_u - torch.log(z * (1 - z))
    exact = dist.Beta(torch.tensor(16.0, dtype=torch.float64),
                      torch.tensor(14.0, dtype=torch.float64))
    quadrature = torch.trapezoid(q_u.exp() * (log_q_z - exact.log_prob(z)), u).item()
    assert post["kl"] == pytest.approx(quadrature, abs=4 * post["kl_se"] + 1e-3)
    assert post["kl"] < 0.05
    for key, q in [("q05", 0.05), ("q50", 0.5), ("q95", 0.95)]:
        assert post[key] == pytest.approx(beta_quantile(q), abs=0.03), key
    result = diagnose(coin, guide)
    assert result["khat"] < 0.7 and set(result["sites"]) == {"latent_fairness"}


def test_a_point_mass_has_no_kl_and_no_khat(coin):
    pyro.clear_param_store()
    guide = auto_delta(coin["model"])
    guide(**coin["data"])
    post = summarize(coin, guide)
    assert "kl" not in post and post["kl_method"].startswith("unavailable: ")
    assert "point mass" in post["kl_method"]
    assert post["q05"] == pytest.approx(post["q95"])
    result = diagnose(coin, guide)
    assert result["khat"] is None and "point mass" in result["reason"]


def test_a_guide_that_cannot_be_vectorised(coin):
    """Summaries fall back to one guide run per draw; the diagnostic says why it has none."""

    def guide(flips):
        a = torch.tensor(16.0)
        draw = pyro.sample("latent_fairness", dist.Beta(a, torch.tensor(14.0)))
        if draw.item() > 2:  # one number only: refuses a plate of draws
            raise AssertionError

    post = summarize(coin, guide, num_draws=2000)
    assert post["kl"] == pytest.approx(0.0, abs=1e-6)
    assert post["q50"] == pytest.approx(beta_quantile(0.5), abs=0.03)
    result = diagnose(coin, guide)
    assert result["khat"] is None and "vectorised" in result["reason"]


@pytest.mark.parametrize("how", ["parallel", "sequential"])
def test_enumerated_models_are_weighed_with_their_sites_summed_out(how: str):
    """Parallel enumeration is summed out of the weights (tests/test_enumerated.py checks
    the sum); sequential enumeration is out of scope, and the reason says so."""
    def model(y):
        weights = torch.tensor([0.5, 0.5])
        locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 10.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            which = pyro.sample("which", dist.Categorical(weights), infer={"enumerate": how})
            pyro.sample("obs", dist.Normal(locs[which], 1.0), obs=y)

    def guide(y):
        pyro.sample("locs", dist.Normal(torch.zeros(2), 1.0).to_event(1))

    result = posterior.diagnostics(model, guide, {"y": torch.tensor([-1.0, 1.0])}, 1)
    if how == "parallel":
        assert result["khat"] is not None and "reason" not in result, result
    else:
        assert result["khat"] is None and "sequentially" in result["reason"]


class VectorModel:
    """Tensor sites with an exact posterior: z (3 numbers, one event) and w (one per group,
    in a plate), each a Normal mean with Normal observations."""

    def __call__(self, y, v):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        with pyro.plate("data", y.shape[0]):
            pyro.sample("obs_z", dist.Normal(z, 1.0).to_event(1), obs=y)
        with pyro.plate("groups", v.shape[0]):
            w = pyro.sample("w", dist.Normal(torch.tensor(0.0), 1.0))
            pyro.sample("obs_w", dist.Normal(w, 0.5), obs=v)

    def exact_posterior(self, y, v):
        n = y.shape[0]
        return {"z": dist.Normal(y.sum(0) / (n + 1), (1.0 / (n + 1)) ** 0.5).to_event(1),
                "w": dist.Normal(v * 4 / 5, (1 / 5) ** 0.5)}


@pytest.fixture(scope="module")
def vector():
    model = VectorModel()
    data = {"y": torch.tensor([[1.0, -2.0, 0.5], [2.0, -1.0, 0.0], [0.0, -3.0, 1.0]]),
            "v": torch.tensor([1.5, -0.5])}
    trace = poutine.trace(model).get_trace(**data)
    return {"model": model, "data": data, "sites": posterior.latent_sites(trace),
            "nesting": posterior.plate_nesting(trace), "exact": model.exact_posterior(**data)}


def vector_summary(vector, guide):
    pyro.set_rng_seed(3)
    return posterior.summarize(guide, vector["data"], vector["sites"], vector["nesting"],
                               vector["exact"])


def check_shapes(summary):
    keys = ("mean", "std", "q05", "q50", "q95", "exact_mean", "exact_std", "mean_error",
            "std_error")
    for name, size in [("z", 3), ("w", 2)]:
        for key in keys:
            value = summary[name][key]
            assert isinstance(value, list) and len(value) == size, (name, key, value)
        assert isinstance(summary[name]["kl"], float)


def test_tensor_sites_with_a_hand_written_mean_field_guide(vector):
    """Plain Normals: closed-form KL (summed over the site) and quantiles by inverse CDF."""
    z_loc, z_scale = torch.tensor([1.0, -1.0, 0.0]), torch.tensor([0.4, 0.6, 0.5])
    w_loc, w_scale = torch.tensor([1.0, -0.5]), torch.tensor([0.5, 0.3])

    def guide(y, v):
        pyro.sample("z", dist.Normal(z_loc, z_scale).to_event(1))
        with pyro.plate("groups", v.shape[0]):
            pyro.sample("w", dist.Normal(w_loc, w_scale))

    summary = vector_summary(vector, guide)
    check_shapes(summary)
    exact = vector["exact"]
    for name, (loc, scale) in {"z": (z_loc, z_scale), "w": (w_loc, w_scale)}.items():
        entry = summary[name]
        assert entry["method"] == "analytic" and entry["kl_method"] == "closed_form"
        base = exact[name].base_dist if name == "z" else exact[name]
        expected = torch.distributions.kl_divergence(dist.Normal(loc, scale), base).sum()
        assert entry["kl"] == pytest.approx(expected.item(), rel=1e-5)
        assert entry["q05"] == pytest.approx((loc - 1.6448536 * scale).tolist(), abs=1e-5)
        assert entry["q50"] == pytest.approx(loc.tolist(), abs=1e-6)


@pytest.mark.parametrize("factory, steps", [
    (auto_normal, 100), (auto_multivariate_normal, 100), (auto_diagonal_normal, 0)])
def test_tensor_sites_with_autoguides(vector, factory, steps):
    """AutoNormal (a Normal per site), AutoMultivariateNormal and AutoDiagonalNormal (one
    joint Normal: each site's KL from its marginal) get a Monte Carlo KL that matches the
    closed form, fitted or (for the last) where they start."""
    exact = vector["exact"]
    guide = fit(vector["model"], factory(vector["model"]), vector["data"], steps=steps,
                particles=4)
    guide(**vector["data"])  # makes its parameters when there were no steps
    summary = vector_summary(vector, guide)
    check_shapes(summary)
    if factory is auto_normal:
        marginals = {name: dist.MultivariateNormal(
            getattr(guide.locs, name).detach(),
            torch.diag(getattr(guide.scales, name).detach() ** 2)) for name in ("z", "w")}
    else:
        joint = guide.get_posterior()
        if isinstance(joint, torch.distributions.Independent):
            joint = dist.MultivariateNormal(joint.base_dist.loc,
                                            torch.diag(joint.base_dist.scale ** 2))
        cov = joint.covariance_matrix.detach()
        loc = joint.loc.detach()
        marginals = {"z": dist.MultivariateNormal(loc[:3], cov[:3, :3]),
                     "w": dist.MultivariateNormal(loc[3:], cov[3:, 3:])}
    for name, marginal in marginals.items():
        target = dist.MultivariateNormal(exact[name].mean, torch.diag(exact[name].variance))
        expected = torch.distributions.kl_divergence(marginal, target).item()
        entry = summary[name]
        assert entry["kl_method"] == "monte_carlo", (factory.__name__, name)
        assert entry["kl"] == pytest.approx(expected, abs=4 * entry["kl_se"] + 2e-3), (
            factory.__name__, name)
        assert entry["kl"] < (0.2 if steps else 100)
    if steps:
        pyro.set_rng_seed(4)
        result = posterior.diagnostics(vector["model"], guide, vector["data"],
                                       vector["nesting"])
        assert result["khat"] < 0.7, (factory.__name__, result)
        for name, size in [("z", 3), ("w", 2)]:
            iw_mean = result["sites"][name]["iw_mean"]
            assert len(iw_mean) == size
            assert iw_mean == pytest.approx(exact[name].mean.tolist(), abs=0.05)


def test_a_site_whose_guide_depends_on_another_draw_has_no_marginal_kl(vector):
    """w's guide is conditional on z's draw: its log_prob is not w's marginal density, so no
    KL for w; z's is closed form; the joint importance weights are still right."""

    def guide(y, v):
        z = pyro.sample("z", dist.Normal(torch.tensor([1.0, -2.0, 0.4]), 0.5).to_event(1))
        with pyro.plate("groups", v.shape[0]):
            pyro.sample("w", dist.Normal(0.8 * v + 0.1 * z.sum(-1, keepdim=False), 0.45))

    summary = vector_summary(vector, guide)
    assert summary["z"]["kl_method"] == "closed_form"
    assert "kl" not in summary["w"] and "depends on other draws" in summary["w"]["kl_method"]
    assert summary["w"]["method"] == "sampled" and len(summary["w"]["q95"]) == 2
    pyro.set_rng_seed(5)
    result = posterior.diagnostics(vector["model"], guide, vector["data"], vector["nesting"])
    assert result["khat"] < 0.7
    assert result["sites"]["w"]["iw_mean"] == pytest.approx(
        vector["exact"]["w"].mean.tolist(), abs=0.03)


def test_diagnostics_in_chunks_equal_diagnostics_at_once(coin, monkeypatch):
    guide = fixed_beta_guide(15, 15)
    whole = diagnose(coin, guide, num_draws=3000)
    monkeypatch.setattr(posterior, "MAX_ELEMENTS", 10 * 700)  # chunks of 700 draws
    chunked = diagnose(coin, guide, num_draws=3000)
    assert chunked.pop("sites") == whole.pop("sites")
    assert chunked == pytest.approx(whole)


def test_the_model_replayed_in_slices_of_draws_gives_the_same_diagnostics(coin, monkeypatch):
    """The same guide draws, the model evaluated on slices of them (``draw_slices``): the same
    numbers, exactly."""
    guide = fixed_beta_guide(15, 15)
    whole = diagnose(coin, guide, num_draws=3000)
    monkeypatch.setattr(posterior, "SLICE_NUMBERS", 300)  # slices of a few dozen draws
    assert diagnose(coin, guide, num_draws=3000) == whole


def test_elbo_and_log_evidence_are_estimated_from_the_same_draws(coin, fitted_beta):
    """The coin's evidence is known in closed form, log p(x) = log B(16, 14) - log B(10, 10):
    the importance-sampled estimate is within 4 standard errors of it for a good guide and a
    poor one, and the ELBO sits below it by about KL(guide || exact)."""
    exact = (math.lgamma(16) + math.lgamma(14) - math.lgamma(30)) - (
        2 * math.lgamma(10) - math.lgamma(20))
    for alpha, beta in (fitted_beta, (15, 15)):
        guide = fixed_beta_guide(alpha, beta)
        result = diagnose(coin, guide)
        assert abs(result["log_evidence"] - exact) < 4 * result["log_evidence_se"]
        assert 0 < result["log_evidence_se"] < 0.01
        kl = summarize(coin, guide)["kl"]
        assert result["elbo"] == pytest.approx(exact - kl, abs=4 * result["elbo_se"] + 1e-4)
        assert result["elbo"] < result["log_evidence"]


def test_log_joint_over_draws_is_pyro_s_own_density():
    """The report's log density of a vectorised trace (each site's distribution evaluated
    before the plates expanded it) is, number for number, the one Pyro computes from the
    expanded distributions: a regression's Normal, a mixture, a masked and scaled site, a
    factor and a multivariate site."""

    def model(x, y):
        b = pyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
        theta = pyro.sample("theta", dist.Beta(2.0, 2.0))
        pyro.factor("penalty", -(b ** 2).sum(-1))
        with pyro.plate("rows", len(y), subsample_size=30) as rows:
            x, y = x[rows], y[rows]
            mean = b[..., 0] + b[..., 1] * x
            pyro.sample("y", dist.Normal(mean, sigma), obs=y)
            with poutine.scale(scale=0.5), poutine.mask(mask=y > -1):
                pyro.sample("z", dist.Normal(mean, sigma), obs=y)
            weights = dist.Categorical(probs=torch.stack([theta, 1 - theta], -1))
            pyro.sample("w", dist.MixtureSameFamily(weights, dist.Normal(b, 1.0)), obs=y)
            pyro.sample("v", dist.MultivariateNormal(mean.unsqueeze(-1).expand(
                mean.shape + (2,)), torch.eye(2)), obs=torch.stack([y, y], -1))

    torch.manual_seed(0)
    x, y = torch.randn(50), torch.randn(50)
    n = 7
    with pyro.plate("draws", n, dim=-2):
        prior = poutine.trace(model).get_trace(x, y)
        ours = poutine.trace(poutine.replay(model, trace=prior)).get_trace(x, y)
    theirs = poutine.Trace()
    for name, site in ours.nodes.items():
        theirs.add_node(name, **site)
    assert posterior.compacted(ours.nodes["y"]["fn"]) is not None  # the case at stake
    total = posterior.log_joint(ours, n, 1)
    theirs.compute_log_prob()
    expected = sum(posterior._per_draw(site["log_prob"], n, 1)
                   for site in theirs.nodes.values()
                   if site["type"] == "sample" and "log_prob" in site)
    assert torch.equal(total, expected)
    for name in ("y", "z", "w", "v", "penalty"):
        assert torch.equal(ours.nodes[name]["unscaled_log_prob"],
                           ours.nodes[name]["fn"].log_prob(ours.nodes[name]["value"])), name


def test_guide_draws_outside_the_models_support_are_weighed_zero_not_an_error():
    """theta ~ Uniform(0.1, 10), a guide over all positive numbers: its draws past either end
    (about 5%) have no density under the model, so their weight is 0, and the rest still weigh
    the posterior (1 / theta on the interval: mean 9.9 / ln 100 = 2.1498, within four of its own
    Monte Carlo standard errors). Weighed with Pyro's validation on, one such draw stopped the
    whole diagnostic."""
    def model(y):
        theta = pyro.sample("theta", dist.Uniform(0.1, 10.0))
        pyro.sample("y", dist.Uniform(0.0, theta), obs=y)

    def guide(y):
        pyro.sample("theta", dist.LogNormal(0.0, 1.2))

    pyro.set_rng_seed(3)
    result = posterior.diagnostics(model, guide, {"y": torch.tensor(0.05)}, 0)
    assert result["khat"] is not None and result["khat"] < 0.7, result
    site = result["sites"]["theta"]
    assert abs(site["iw_mean"] - 9.9 / math.log(100)) <= 4 * site["iw_mean_mcse"] + 1e-3, site
