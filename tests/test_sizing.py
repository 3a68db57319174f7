"""The PSIS diagnostic sized to the data (workbench/sized_psis.py): the subsampled-likelihood
estimate agrees with the full one within its errors, says what it sized, and models it cannot
subsample get fewer draws instead; small models stay exact."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.optim import Adam

from vibench_plugins.datasets import synthetic_classification
from vibench_plugins.models import LogisticRegression
from workbench.report import posterior, sized_psis

ROWS = 2000
DRAWS = 2000


def sized_small(monkeypatch) -> None:
    """Budgets small enough that ROWS rows and DRAWS draws are 'big data'."""
    monkeypatch.setattr(sized_psis, "WORK", DRAWS * 100)
    monkeypatch.setattr(sized_psis, "SUBSAMPLE_WORK", DRAWS * 400)
    monkeypatch.setattr(sized_psis, "MIN_ROWS", 400)
    monkeypatch.setattr(sized_psis, "MIN_DRAWS", 500)


@pytest.fixture(scope="module")
def logistic():
    """Logistic regression on ROWS rows with a full-covariance guide, fitted well."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    data = synthetic_classification(n=ROWS)
    model = LogisticRegression()
    guide = AutoMultivariateNormal(model)
    svi = SVI(model, guide, Adam({"lr": 0.05}),
              Trace_ELBO(num_particles=2, vectorize_particles=True, max_plate_nesting=1))
    for _ in range(400):
        svi.step(**data)
    return model, guide, data


def test_subsampled_psis_agrees_with_the_full_one(logistic, monkeypatch):
    model, guide, data = logistic
    torch.manual_seed(1)
    full = posterior.diagnostics(model, guide, data, 1, num_draws=DRAWS)
    assert "sized" not in full and "khat_se" not in full and full["num_draws"] == DRAWS
    sized_small(monkeypatch)
    torch.manual_seed(1)  # the same guide draws: the difference is the subsample's alone
    sub = posterior.diagnostics(model, guide, data, 1, num_draws=DRAWS)
    assert (sub["rows"], sub["of_rows"], sub["plate"]) == (400, ROWS, "data")
    assert sub["num_draws"] == DRAWS and f"400 of {ROWS} rows of plate 'data'" in sub["sized"]
    # The Taylor remainder is second order: the subsample adds little to each log weight.
    # (Over seeds 3-8 here: log_weight_se 0.06-0.08, khat_se 0.04-0.07, |elbo difference| at
    # most 2.9 elbo_se: the 20-group standard errors are themselves rough.)
    assert sub["log_weight_se"] < 0.25 and sub["khat_se"] < 0.15
    assert abs(sub["khat"] - full["khat"]) < max(4 * sub["khat_se"], 0.05)
    assert abs(sub["elbo"] - full["elbo"]) < 5 * sub["elbo_se"]
    if full["khat"] < 0.7 and sub["khat"] < 0.7:
        for site in ("intercept", "coefficients"):
            got = torch.tensor(sub["sites"][site]["iw_mean"])
            want = torch.tensor(full["sites"][site]["iw_mean"])
            sd = torch.tensor(full["sites"][site]["iw_std"])
            assert ((got - want).abs() < 0.1 * sd).all(), (site, got, want, sd)


def unindexed_model(y):
    """A model that takes its plate's first rows, not the rows the plate names: it cannot
    be subsampled."""
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("data", y.shape[0]) as rows:
        pyro.sample("obs", dist.Bernoulli(p), obs=y[:len(rows)])


def test_a_model_that_cannot_be_subsampled_gets_fewer_draws(monkeypatch):
    sized_small(monkeypatch)
    y = (torch.rand(1000, generator=torch.Generator().manual_seed(0)) < 0.3).float()
    guide = lambda y: pyro.sample("p", dist.Beta(1.0 + y.sum(), 1.0 + (1 - y).sum()))  # noqa: E731
    torch.manual_seed(0)
    result = posterior.diagnostics(unindexed_model, guide, {"y": y}, 1, num_draws=DRAWS)
    # The guide is the exact posterior (prior Beta(2, 2) vs Beta(1, 1): close): a good k-hat.
    assert result["num_draws"] == 500 and result["khat"] < 0.7
    assert result["khat_se"] > 0 and "rows" not in result
    assert result["sized"].startswith("PSIS on 500 of 2000 draws")
    assert "does not index its data by plate 'data'" in result["sized"]


def test_small_models_are_not_sized():
    """The coin's diagnostic costs nothing near the budget: it stays whole, as before."""
    flips = torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0, 0, 0])

    def model(flips):
        f = pyro.sample("f", dist.Beta(10.0, 10.0))
        with pyro.plate("data", flips.shape[0]):
            pyro.sample("obs", dist.Bernoulli(f), obs=flips)

    guide = lambda flips: pyro.sample("f", dist.Beta(16.0, 14.0))  # noqa: E731
    result = posterior.diagnostics(model, guide, {"flips": flips}, 1)
    # A draw's cost counts the sites' numbers, not the plate's indices.
    assert sized_psis.draw_numbers(pyro.poutine.trace(model).get_trace(flips)) == 11
    assert result["num_draws"] == posterior.NUM_IS_DRAWS
    assert not {"sized", "khat_se", "rows"} & set(result)
