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
import yaml
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from tests import plain_models
from tests.helpers import QUICK, RECIPES, fit, setup, vibench
from vibench_plugins.models import GaussianMixture
from workbench.report import broadcast, marginal, posterior

Y = torch.tensor([-3.1, 2.9, 0.4, 3.3, -2.2], dtype=torch.float64)
SITES = ("weights", "locs", "scale")


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
    guide_trace = poutine.Trace()  # the draws as a guide's trace holds them
    for name, value in flat.items():
        guide_trace.add_node(name, type="sample", name=name, value=value, is_observed=False,
                             infer={})
    found = posterior.summed_out(plain_models.gaussian_mixture, guide_trace, {"y": Y}, 3, 1,
                                 broadcast.Verdict(broadcast.LOOP, 1),
                                 {name: value.shape[1:] for name, value in flat.items()})
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


def test_the_laplace_start_finds_the_mode_of_the_summed_out_density():
    """init laplace on the mixture, from the shipped recipe's start (locs apart: at 0 both,
    the search stays on the symmetric ridge of one wide component): its potential sums the
    assignments out, so the mode has one loc at each cluster's mean, where a draw of the
    assignments would give a random point."""
    run = setup("guide.init=laplace", "train.steps=1", "data.dataset.n=200",
                source=RECIPES / "gaussian_mixture.yaml")
    y = run.data["y"]
    locs = sorted(run.guide.locs.locs.tolist())
    assert locs == pytest.approx([y[y < 0].mean().item(), y[y > 0].mean().item()], abs=0.1)
    assert run.guide.scales.locs.max().item() < 0.2  # the curvature's sds, not init_scale's


@pytest.mark.slow  # the pipeline's fits and the shipped recipe's: about 45 s
def test_the_pipeline_fits_an_enumerated_model_with_enum_elbo(tmp_path: Path):
    """A recipe naming only the mixture and its data: every fit trains on enum_elbo at the
    model's plate nesting, and the answer (posterior.nc and plots with it) agrees with the
    shipped recipe's fit within a quarter of its sds, up to the components' labels: the
    posterior is symmetric in them, so the fits may sit at either labelling (and the
    pipeline flag that they disagree; no error)."""
    data = {"dataset": {"name": "synthetic_mixture", "n": 500, "locs": [-3.0, 3.0],
                        "scale": 1.0}}
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(
        {"name": "mixture-auto", "model": {"name": "gaussian_mixture"}, "data": data}))
    answer, where = fit(tmp_path, source=tmp_path / "auto.yaml")
    shipped, _ = fit(tmp_path, *QUICK, source=RECIPES / "gaussian_mixture.yaml")
    for recipe in where.glob("fits/*/recipe.yaml"):
        loss = yaml.safe_load(recipe.read_text())["loss"]
        assert loss["name"] == "enum_elbo" and loss["max_plate_nesting"] == 1, recipe
    assert (where / "posterior.nc").is_file() and (where / "plots" / "site-locs.png").is_file()
    assert answer["diagnostics"]["khat"] < 0.5
    got, expected = answer["posterior"], shipped["posterior"]
    order = sorted(range(2), key=lambda i: got["locs"]["mean"][i])
    for name in ("locs", "weights"):
        for i, j in enumerate(order):
            sd = expected[name]["std"][i]
            assert got[name]["mean"][j] == pytest.approx(expected[name]["mean"][i], abs=sd / 4)
            assert got[name]["std"][j] == pytest.approx(sd, rel=0.25)
    sd = expected["scale"]["std"]
    assert got["scale"]["mean"] == pytest.approx(expected["scale"]["mean"], abs=sd / 4)


SEQUENTIAL = '''
import pyro
import pyro.distributions as dist
import torch


def model(y):
    locs = pyro.sample("locs", dist.Normal(torch.zeros(2), 10.0).to_event(1))
    with pyro.plate("data", len(y)):
        which = pyro.sample("which", dist.Categorical(torch.ones(2) / 2),
                            infer={"enumerate": "sequential"})
        pyro.sample("obs", dist.Normal(locs[which], 1.0), obs=y)
'''


def test_the_pipeline_refuses_sequential_enumeration_in_one_line(tmp_path: Path):
    """Pyro sums a model's sites out only in parallel: the pipeline says so before any fit."""
    (tmp_path / "mine.py").write_text(SEQUENTIAL)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(
        {"name": "sequential", "model": {"name": "mine.py:model"},
         "data": {"y": [-3.0, 3.0, 2.5]}}))
    result = vibench("run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"),
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert error == [
        f"error: model '{tmp_path / 'mine.py'}:model' enumerates 'which' sequentially, which "
        "enum_elbo cannot sum out in a model: mark it infer={'enumerate': 'parallel'}"
    ], result.stderr
    assert "Traceback" not in result.stderr
