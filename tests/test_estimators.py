"""The gradient estimators (``loss.estimator: stl``, ``iwae`` with ``estimator: dreg``) and the
Laplace start of the Gaussian autoguides (``guide.init: laplace``)."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from tests.gaussian_models import GAUSSIAN, data_for, independent, regression, regression_posterior
from tests.helpers import EXACT_STD, FAST, REPO, TOLERANCE, coin_fit, setup
from workbench.device import run_context
from workbench.errors import UsageError

DRAWS = 50
COIN_LOC = math.log(16 / 14)  # the mode of Beta(16, 14) in logit space
COIN_SCALE = math.sqrt(30 / (16 * 14))  # 1 / sqrt of the potential's curvature there


def build_guide(model, name: str, data: dict, init: str = "laplace"):
    """A default guide on ``model``, its parameters made, then started as ``init`` says."""
    from vibench_plugins import guides, losses

    guide = getattr(guides, name)(model, init=init)
    losses.elbo().loss_and_grads(model, guide, **data)
    notes = guide.initialise(**data) if init == "laplace" else []
    assert notes == []
    return guide


def gradients(model, guide, loss, data: dict, draws: int = DRAWS) -> torch.Tensor:
    """``draws`` gradients of ``loss`` with respect to every parameter, one row each."""
    store = pyro.get_param_store()
    rows = []
    for _ in range(draws):
        loss.loss_and_grads(model, guide, **data)
        params = [p for _, p in sorted(store.named_parameters())]
        rows.append(torch.cat([torch.zeros_like(p).reshape(-1) if p.grad is None
                               else p.grad.reshape(-1) for p in params]))
        for p in params:
            p.grad = None
    return torch.stack(rows)


# ------------------------------------------------------------------------------------------
# sticking the landing


@pytest.mark.parametrize("model, name", [(independent, name) for name in GAUSSIAN]
                         + [(regression, "auto_multivariate_normal")])
@pytest.mark.parametrize("particles", [1, 4])
def test_stl_gradient_has_no_variance_at_the_exact_posterior(float64, model, name, particles):
    """Roeder et al. 2017: where q is the posterior, log p - log q is constant in z, so the
    path derivative is 0 for every draw; the plain estimator keeps the noisy score term."""
    from vibench_plugins import losses

    data = data_for(model)
    guide = build_guide(model, name, data)  # Laplace is exact here (next test)
    variance = {estimator: gradients(model, guide, losses.elbo(particles, estimator=estimator),
                                     data).var(0).sum().item()
                for estimator in ("reparam", "stl")}
    print(name, particles, variance)
    assert variance["stl"] < 1e-20
    assert variance["reparam"] > 0.1


def test_stl_is_unbiased_away_from_the_optimum(float64):
    """Off the optimum both estimators estimate the same gradient: their means agree within
    the standard error of 4 x 50 draws."""
    from vibench_plugins import losses

    data = data_for(regression)
    guide = build_guide(regression, "auto_multivariate_normal", data, init="init_loc")
    plain, stl = (gradients(regression, guide, losses.elbo(estimator=estimator), data, 200)
                  for estimator in ("reparam", "stl"))
    error = ((plain.var(0) + stl.var(0)) / 200).sqrt()
    moving = error > 0  # scale_tril's fixed unit diagonal has no gradient
    assert ((stl.mean(0) - plain.mean(0))[moving].abs() < 4 * error[moving]).all()


def test_stl_fits_the_coin(tmp_path: Path):
    _, summary = coin_fit(tmp_path, "guide=auto_normal", "loss.estimator=stl", *FAST)
    post = summary["posterior"]["latent_fairness"]
    assert abs(post["mean"] - 16 / 30) < TOLERANCE and abs(post["std"] - EXACT_STD) < TOLERANCE


def test_stl_refuses_what_it_cannot_apply_to():
    from vibench_plugins import losses

    def model():
        pyro.sample("coin", dist.Bernoulli(0.5))

    def guide():
        pyro.sample("coin", dist.Bernoulli(pyro.param("p", torch.tensor(0.3))))

    pyro.clear_param_store()
    for loss in (losses.elbo(estimator="stl"), losses.iwae(estimator="dreg")):
        with pytest.raises(ValueError, match="needs reparameterised guide sites; 'coin'"):
            loss.loss_and_grads(model, guide)
    with pytest.raises(UsageError, match="estimator 'stl' does not run under jit"):
        setup("loss.jit=true", "loss.estimator=stl")


# ------------------------------------------------------------------------------------------
# doubly reparameterised IWAE


def coin_guide(loc: float, scale: float):
    """auto_normal on the coin, set to Normal(loc, scale) in logit space."""
    from pyro.distributions import constraints

    from vibench_plugins import guides
    from vibench_plugins.models import BetaBernoulli

    model, data = BetaBernoulli(), {"flips": torch.tensor([1.0] * 6 + [0.0] * 4)}
    guide = guides.auto_normal(model)
    guide(**data)
    positive = torch.distributions.transform_to(constraints.softplus_positive)
    with torch.no_grad():
        guide.locs.latent_fairness_unconstrained.fill_(loc)
        guide.scales.latent_fairness_unconstrained.copy_(positive.inv(torch.tensor(scale)))
    return model, guide, data


@pytest.mark.parametrize("loc, scale", [(COIN_LOC, COIN_SCALE), (0.5, 0.8)],
                         ids=["at-laplace", "wider-than-posterior"])
def test_dreg_lowers_the_gradient_variance_at_16_particles(float64, loc, scale):
    """Tucker et al. 2018: at K = 16 the guide's DReG gradient varies far less than plain
    IWAE's (measured: 1e-5 and 0.008 times as much), on every one of 5 seeds, and the two
    agree in the mean (over the 250 draws of all seeds)."""
    from vibench_plugins import losses

    draws = {"reparam": [], "dreg": []}
    for seed in range(5):
        for estimator in draws:
            pyro.clear_param_store()
            pyro.set_rng_seed(seed)
            model, guide, data = coin_guide(loc, scale)
            draws[estimator].append(
                gradients(model, guide, losses.iwae(16, estimator=estimator), data))
        ratio = draws["dreg"][-1].var(0).sum() / draws["reparam"][-1].var(0).sum()
        print(f"seed {seed}: variance ratio dreg / plain {ratio.item():.2g}")
        assert ratio < 0.1
    plain, dreg = (torch.cat(draws[estimator]) for estimator in ("reparam", "dreg"))
    error = ((plain.var(0) + dreg.var(0)) / len(plain)).sqrt()
    assert ((dreg.mean(0) - plain.mean(0)).abs() < 4 * error).all()


def test_iwae_with_dreg_fits_the_coin(tmp_path: Path):
    _, summary = coin_fit(tmp_path, "guide=auto_normal", "loss=iwae", "loss.num_particles=16",
                          "loss.estimator=dreg", *FAST)
    post = summary["posterior"]["latent_fairness"]
    assert abs(post["mean"] - 16 / 30) < TOLERANCE and abs(post["std"] - EXACT_STD) < TOLERANCE


# ------------------------------------------------------------------------------------------
# the Laplace start


@pytest.mark.parametrize("name", GAUSSIAN)
def test_laplace_is_exact_on_a_gaussian_posterior(float64, name):
    """On a Gaussian posterior the Laplace approximation is the posterior: a full-rank guide
    holds it exactly; a diagonal one gets the exact mean and the conditional sds
    1/sqrt(precision_ii), the factorised Gaussian closest to it in KL(q || p)."""
    data = data_for(regression)
    guide = build_guide(regression, name, data)
    mean, covariance = regression_posterior(data["y"])
    with torch.no_grad():
        posterior = (guide.get_posterior() if hasattr(guide, "get_posterior") else dist.Normal(
            torch.stack([guide.locs.first, guide.locs.second]),
            torch.stack([guide.scales.first, guide.scales.second])))
        assert torch.allclose(posterior.mean, mean, atol=1e-8)
        if name in ("auto_multivariate_normal", "auto_lowrank_multivariate_normal"):
            assert torch.allclose(posterior.covariance_matrix, covariance, atol=1e-8)
        else:
            assert torch.allclose(posterior.variance, 1 / torch.linalg.inv(covariance).diagonal(),
                                  atol=1e-8)


@pytest.mark.parametrize("name", GAUSSIAN)
def test_laplace_starts_the_coin_at_the_mode(name):
    run = setup(f"guide={name}", "guide.init=laplace", "train.eval_every=0")
    assert run.notes == []
    with run_context(run.device, run.dtype), torch.no_grad():
        if name == "auto_normal":
            loc, scale = run.guide.locs.latent_fairness, run.guide.scales.latent_fairness
        else:
            posterior = run.guide.get_posterior()
            loc, scale = posterior.mean, posterior.variance.sqrt()
    assert loc.item() == pytest.approx(COIN_LOC, abs=1e-4)
    assert scale.item() == pytest.approx(COIN_SCALE, abs=1e-4)


def test_laplace_refuses_discrete_sites_and_notes_its_fallbacks(float64):
    from vibench_plugins import guides, laplace, losses

    def coin(y):  # a discrete site no loss sums out (enumerated ones: test_enumerated.py)
        heads = pyro.sample("heads", dist.Bernoulli(0.5))
        pyro.sample("y", dist.Normal(heads, 1.0), obs=y)

    with pytest.raises(ValueError, match="init 'laplace' needs continuous latent sites; "
                                         "'heads' is discrete"):
        laplace.check_continuous(guides.auto_normal(coin, init="laplace"), (),
                                 {"y": torch.tensor(0.5)})

    def flat(y):  # 'free' does not touch the likelihood: the Hessian is singular
        pyro.sample("free", dist.Normal(0.0, 1.0).mask(False))  # no density: flat
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    data = {"y": torch.tensor(0.5)}
    guide = guides.auto_normal(flat, init="laplace", init_loc="feasible")
    losses.elbo().loss_and_grads(flat, guide, **data)
    notes = guide.initialise(**data)
    assert any("nor its diagonal; the scale stays init_scale" in note for note in notes), notes
    assert guide.locs.mu.item() == pytest.approx(0.25)
    assert guide.scales.free.item() == pytest.approx(0.1)

    indefinite = torch.tensor([[1.0, 2.0], [2.0, 1.0]])
    covariance, precision_diag, note = laplace.curvature(indefinite)
    assert covariance is None and precision_diag.tolist() == [1.0, 1.0]
    assert "scale comes from its diagonal" in note


@pytest.mark.slow
def test_laplace_gets_kilpisjarvi_right_in_far_fewer_steps(tmp_path: Path):
    """kilpisjarvi's intercept and slope correlate at -0.99999 and their sds differ 4000-fold.
    With the Laplace start auto_multivariate_normal is within 0.2 sd of the reference means
    and 20% of its sds from the first check (measured: step 250; at step 0 sigma is 0.29 sd
    low, the mode of log sigma being below its mean); from Pyro's start it is not within
    2000 steps. A small lr keeps Adam's steps, about lr per coordinate, below the slope's sd."""
    pytest.importorskip("vibench_posteriordb")
    from workbench.report import posterior

    recipe = REPO / "packages" / "vibench-posteriordb" / "recipes" / "pdb_kilpisjarvi.yaml"
    first = {}
    for init in ("laplace", "init_loc"):
        run = setup("dtype=float64", "optimizer.lr=0.0001", "train.eval_every=0",
                    f"guide.init={init}", source=recipe)
        reference = run.model.reference_posterior()["params"]
        history = []
        with run_context(run.device, run.dtype):
            for step in range(2001):
                if step % 250 == 0:
                    with torch.random.fork_rng():
                        torch.manual_seed(1)
                        post = posterior.summarize(run.guide, run.data, run.sites, run.nesting,
                                                   num_draws=4000)
                    z = max(abs(post[s]["mean"] - reference[s]["mean"]) / reference[s]["sd"]
                            for s in reference)
                    r = max(abs(post[s]["std"] / reference[s]["sd"] - 1) for s in reference)
                    history.append((step, round(z, 3), round(r, 3)))
                    if z < 0.2 and r < 0.2:
                        first[init] = step
                        break
                run.step()
        print(init, "(step, max z, max |sd ratio - 1|):", history)
    assert first.get("laplace", math.inf) <= 500
    assert "init_loc" not in first

