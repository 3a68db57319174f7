"""Models with enumerated discrete sites (``infer={"enumerate": "parallel"}``, summed out by
loss enum_elbo): their log density with those sites summed out, PSIS on it, and the automatic
pipeline on them."""

from __future__ import annotations

import itertools
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from tests import plain_models
from tests.helpers import QUICK, RECIPES, fit
from vibench_plugins.models import GaussianMixture
from workbench.report import marginal

Y = torch.tensor([-3.1, 2.9, 0.4, 3.3, -2.2], dtype=torch.float64)
SITES = ("weights", "locs", "scale")


@pytest.fixture
def float64():
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def prior_draws(n: int) -> dict[str, torch.Tensor]:
    """``n`` draws of the mixture's continuous sites from its prior, laid out as under a plate
    of draws at dim -2."""
    pyro.set_rng_seed(0)
    with pyro.plate("draws", n, dim=-2):
        trace = poutine.trace(poutine.block(GaussianMixture(), hide=["assignment"])).get_trace(Y)
    return {name: trace.nodes[name]["value"] for name in SITES}


def one(draws: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """The ``i``-th draw alone, shaped as one run of the model gives it."""
    return {"weights": draws["weights"][i, 0], "locs": draws["locs"][i],
            "scale": draws["scale"][i, 0]}


def brute_force(draw: dict[str, torch.Tensor]) -> torch.Tensor:
    """log p(y, z): the prior and the likelihood summed over all 2^5 assignments."""
    w, locs, scale = draw["weights"], draw["locs"], draw["scale"]
    prior = (dist.Dirichlet(torch.ones(2)).log_prob(w) + dist.Normal(0.0, 10.0).log_prob(locs).sum()
             + dist.HalfNormal(5.0).log_prob(scale))
    terms = [w.log()[a].sum() + dist.Normal(locs[a], scale).log_prob(Y).sum()
             for a in map(torch.tensor, itertools.product(range(2), repeat=len(Y)))]
    return prior + torch.logsumexp(torch.stack(terms), 0)


def test_the_summed_out_density_of_a_plate_of_draws_is_the_brute_force_sum(float64):
    draws = prior_draws(4)
    with pyro.plate("draws", 4, dim=-2):
        trace = poutine.trace(marginal.enumerated(
            poutine.condition(GaussianMixture(), data=draws), 2)).get_trace(Y)
    found = marginal.log_density(trace, "draws", 4)
    expected = torch.stack([brute_force(one(draws, i)) for i in range(4)])
    assert found.shape == (4,)
    assert torch.allclose(found, expected, rtol=1e-12, atol=1e-10)


def test_one_draw_is_minus_traceenum_elbos_loss_with_an_empty_guide(float64):
    draw = one(prior_draws(1), 0)
    conditioned = poutine.condition(GaussianMixture(), data=draw)
    trace = poutine.trace(marginal.enumerated(conditioned, 1)).get_trace(Y)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, lambda y: None, Y)
    assert marginal.log_density(trace).item() == pytest.approx(-loss, rel=1e-12)


def test_a_model_that_does_not_broadcast_is_summed_one_draw_a_run(float64):
    draws = prior_draws(3)
    flat = {"weights": draws["weights"][:, 0], "locs": draws["locs"],
            "scale": draws["scale"][:, 0]}
    found = marginal.each_draw(plain_models.gaussian_mixture, {"y": Y}, flat, 3, 1)
    expected = torch.stack([brute_force(one(draws, i)) for i in range(3)])
    assert torch.allclose(found, expected, rtol=1e-12, atol=1e-10)


@pytest.mark.slow  # a fit of 300 steps and its report: 5 s of CPU
def test_the_report_weighs_a_fit_of_an_enumerated_model(tmp_path: Path):
    """The shipped mixture recipe, shortened: PSIS k-hat computed with the assignments
    summed out, small for a good AutoNormal fit, and its ELBO near the loss's."""
    summary, _ = fit(tmp_path, "data.dataset.n=200", "train.steps=300",
                     "optimizer.schedule.gamma=0.985", *QUICK[:2],
                     source=RECIPES / "gaussian_mixture.yaml")
    found = summary["diagnostics"]
    assert found["khat"] is not None, found
    assert found["khat"] < 0.5
    assert found["ess_fraction"] > 0.5
    assert found["elbo"] == pytest.approx(-summary["final_loss"], abs=5.0)
