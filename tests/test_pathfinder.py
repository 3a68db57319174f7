"""Pathfinder (``guide.init: pathfinder`` on the Gaussian autoguides, and the ``pathfinder``
guide): on Gaussian posteriors known in closed form, then through a run."""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch

from tests.gaussian_models import GAUSSIAN, data_for, regression, regression_posterior
from tests.helpers import EXACT_MEAN, EXACT_STD, RECIPES, TOLERANCE, coin_fit, setup
from workbench.errors import UsageError

# A correlated 4-d Gaussian target with sds from 0.1 to 3: the scales differ 30-fold.
SDS = torch.tensor([0.1, 1.0, 3.0, 0.5], dtype=torch.float64)
CORRELATION = torch.tensor([[1.0, 0.9, 0.3, 0.0], [0.9, 1.0, 0.5, 0.2], [0.3, 0.5, 1.0, -0.4],
                            [0.0, 0.2, -0.4, 1.0]], dtype=torch.float64)
MEAN = torch.tensor([1.0, -2.0, 5.0, 0.0], dtype=torch.float64)


def correlated():
    covariance = SDS[:, None] * CORRELATION * SDS
    pyro.sample("x", dist.MultivariateNormal(MEAN, covariance))


def started(model, name: str, data: dict, **options):
    """A guide on ``model`` made and then set by Pathfinder; its notes."""
    from vibench_plugins import guides, losses

    pyro.clear_param_store()
    if name == "pathfinder":
        guide = guides.pathfinder(model, **options)
    else:
        guide = getattr(guides, name)(model, init="pathfinder")
    losses.elbo().loss_and_grads(model, guide, **data)
    return guide, guide.initialise(**data)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pathfinder_finds_a_correlated_gaussian(float64, seed):
    """On a Gaussian target the L-BFGS inverse Hessian near the mode is the covariance: the
    guide (the weighted draws' moments) has means within 6 sd / sqrt(draws) and sds within
    15% of the target's, PSIS's k-hat is below 0.7, and the resampled draws' means are within
    8 sd / sqrt(draws) (their standard error is at least sd / sqrt(draws)). Measured over
    seeds 0-39: worst mean error 2.8 sd / sqrt(draws), worst sd error 8%, worst k-hat 0.28,
    worst resampled mean 3.5 sd / sqrt(draws)."""
    pyro.set_rng_seed(seed)
    guide, notes = started(correlated, "pathfinder", {})
    assert len(notes) == 1 and notes[0].startswith("pathfinder: 4 paths, "), notes
    with torch.no_grad():
        posterior = guide.get_posterior()
        z = (posterior.mean - MEAN).abs() / SDS
        ratio = posterior.variance.sqrt() / SDS
    assert z.max() < 6 / len(guide.pathfinder_result.draws) ** 0.5, z
    assert (ratio - 1).abs().max() < 0.15, ratio
    result = guide.pathfinder_result
    assert result.khat < 0.7
    draws = result.draws
    assert ((draws.mean(0) - MEAN).abs() / SDS).max() < 8 / len(draws) ** 0.5


@pytest.mark.parametrize("name", GAUSSIAN)
def test_init_pathfinder_sets_every_gaussian_autoguide(float64, name):
    """The conjugate regression: the full-rank and low-rank guides get the posterior's
    covariance (rank 1 holds a 2-d one), the diagonal ones its conditional sds."""
    data = data_for(regression)
    mean, covariance = regression_posterior(data["y"])
    sds = covariance.diagonal().sqrt()
    guide, notes = started(regression, name, data)
    assert notes[0].startswith("pathfinder: 4 paths, ") and "k-hat" in notes[0]
    with torch.no_grad():
        if name == "auto_normal":
            loc = torch.stack([guide.locs.first, guide.locs.second])
            scale = torch.stack([guide.scales.first, guide.scales.second])
        else:
            posterior = guide.get_posterior()
            loc, scale = posterior.mean, posterior.variance.sqrt()
    conditional = torch.linalg.inv(covariance).diagonal().rsqrt()
    expected = sds if name in ("auto_multivariate_normal",
                               "auto_lowrank_multivariate_normal") else conditional
    assert ((loc - mean).abs() / sds).max() < 0.2
    assert ((scale / expected) - 1).abs().max() < 0.2, (scale, expected)


def test_the_flow_guide_starts_at_pathfinders_gaussian(float64):
    """auto_gaussian_flow with init pathfinder (the automatic pipeline's ``start: {method:
    pathfinder}``) holds Pathfinder's Gaussian as its start: the conjugate regression's
    posterior mean and covariance."""
    from vibench_plugins import flows, losses

    data = data_for(regression)
    mean, covariance = regression_posterior(data["y"])
    sds = covariance.diagonal().sqrt()
    guide = flows.auto_gaussian_flow(regression, init="pathfinder")
    losses.elbo().loss_and_grads(regression, guide, **data)
    notes = guide.initialise(**data)
    assert notes[0].startswith("pathfinder: 4 paths, ")
    loc, tril = guide.gaussian()
    assert ((loc - mean).abs() / sds).max() < 0.2
    assert ((tril @ tril.T).diagonal().sqrt() / sds - 1).abs().max() < 0.2


def test_init_pathfinder_then_svi_on_the_coin(tmp_path: Path):
    run, summary = coin_fit(tmp_path, "guide=auto_multivariate_normal", "guide.init=pathfinder",
                            "train.steps=50", "optimizer.lr=0.01")
    assert any(note.startswith("pathfinder: 4 paths") for note in run.notes), run.notes
    post = summary["posterior"]["latent_fairness"]
    assert abs(post["mean"] - EXACT_MEAN) < TOLERANCE and abs(post["std"] - EXACT_STD) < TOLERANCE


def test_pathfinder_guide_with_no_steps_is_pathfinder_alone(tmp_path: Path):
    run, summary = coin_fit(tmp_path, "guide=pathfinder", "guide.num_paths=2", "train.steps=0")
    assert run.notes[0].startswith("pathfinder: 2 paths, "), run.notes
    assert summary["steps"] == 0
    post = summary["posterior"]["latent_fairness"]
    assert abs(post["mean"] - EXACT_MEAN) < TOLERANCE and abs(post["std"] - EXACT_STD) < TOLERANCE


def test_bad_pathfinder_options_are_one_line():
    for sets, expected in [
        (["guide=pathfinder", "guide.num_paths=0"], "num_paths must be a whole number >= 1"),
        (["guide=pathfinder", "guide.history=-2"], "history must be a whole number >= 1"),
        (["guide=pathfinder", "guide.draws=0"], "draws must be a whole number >= 1"),
        (["guide=auto_normal", "guide.init=pathfindr"], "guide.init: expected one of"),
    ]:
        with pytest.raises(UsageError, match=expected) as caught:
            setup(*sets)
        assert len(str(caught.value).strip().splitlines()) == 1


def test_pathfinder_climbs_a_mixture_with_its_labels_summed_out():
    """The potential Pathfinder climbs sums out the sites the model enumerates (as enum_elbo
    does). The posterior is symmetric in the two labels, and here the paths end at both
    labellings, each holding weight: the draws' moments would put both locs at 0, between
    the modes, so the guide starts at the best path's Gaussian, at one labelling's mode."""
    run = setup("guide.init=pathfinder", "data.dataset.n=100", "train.steps=0",
                source=RECIPES / "gaussian_mixture.yaml")
    assert "the paths found several modes" in run.notes[0], run.notes
    assert sorted(run.guide.locs.locs.tolist()) == pytest.approx([-3.0, 3.0], abs=0.3)
    assert run.guide.locs.scale.item() == pytest.approx(0.0, abs=0.15)  # log 1: sd 1


def test_lbfgs_history_gives_the_exact_inverse_hessian_on_a_quadratic(float64, monkeypatch):
    """After steps along as many Hessian-conjugate directions as dimensions, formula II.2's
    inverse Hessian is the quadratic's: BFGS keeps every earlier secant condition H y = s
    along conjugate steps (Nocedal and Wright, Theorem 6.4's argument)."""
    from vibench_plugins import pathfinder

    hessian = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, -1.0], [0.5, -1.0, 2.0]])
    steps = []
    for e in torch.eye(3):  # Gram-Schmidt in the Hessian's inner product
        for s in steps:
            e = e - (s @ hessian @ e) / (s @ hessian @ s) * s
        steps.append(e * (1 + len(steps)))
    points = [torch.tensor([0.5, -1.0, 2.0])]
    for s in steps:
        points.append(points[-1] + s)
    gradients = [hessian @ p - 1 for p in points]
    last = pathfinder.gaussians(points, gradients, history=3)[-1]
    assert torch.allclose(last.covariance(), torch.linalg.inv(hessian), atol=1e-10)
    assert torch.allclose(last.mean, torch.linalg.solve(hessian, torch.ones(3)), atol=1e-10)
    assert torch.allclose(last.precision_diagonal(), hessian.diagonal(), atol=1e-10)
    monkeypatch.setattr(pathfinder, "MAX_DENSE_DIM", 0)  # Woodbury, as for a large model
    assert torch.allclose(last.precision_diagonal(), hessian.diagonal(), atol=1e-8)
    draws, log_q = last.sample(5)
    exact = dist.MultivariateNormal(last.mean, last.covariance()).log_prob(draws)
    assert torch.allclose(log_q, exact, atol=1e-10)
