"""The verdicts' words agree with their numbers: one owner of the thresholds, and a bad k-hat
beside nearly equal weights explained rather than left as a contradiction."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

from workbench.report import posterior, thresholds


def test_readings_follow_the_thresholds():
    assert thresholds.khat_reading(thresholds.KHAT_GOOD - 0.01) == "good"
    assert thresholds.khat_reading(thresholds.KHAT_TRUSTED) == "ok"
    assert thresholds.khat_reading(thresholds.KHAT_TRUSTED + 0.01) == "bad: do not trust"
    assert thresholds.khat_reading(math.nan) == "bad: do not trust"
    assert not thresholds.khat_trusted(None) and not thresholds.khat_trusted(math.nan)


def test_a_bad_k_hat_beside_nearly_equal_weights_says_why():
    reading = thresholds.khat_reading(5.7, 0.9995)
    assert reading.startswith("bad: do not trust its tails")
    assert "ESS 99.9% of the draws" in reading  # never rounded up to all of them
    assert thresholds.khat_reading(5.7, 0.5) == "bad: do not trust"


def test_the_report_weighs_draws_in_float64_and_puts_the_guide_back():
    """A float32 run's log weights are computed in float64; its parameters come back as
    they were, bit for bit."""
    pyro.clear_param_store()

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    def guide(y):
        loc = pyro.param("loc", torch.tensor(0.3))
        pyro.sample("mu", dist.Normal(loc, 0.5))

    data = {"y": torch.tensor([0.1, 0.5, 0.4])}
    guide(**data)
    before = pyro.param("loc").detach().clone()
    torch.manual_seed(0)
    result = posterior.diagnostics(model, guide, data, nesting=1, num_draws=2000)
    assert result["precision"] == "float64" and result["khat"] is not None
    after = pyro.param("loc")
    assert after.dtype == torch.float32 and torch.equal(after.detach(), before)
    pyro.clear_param_store()
