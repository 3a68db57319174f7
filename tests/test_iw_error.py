"""The Monte Carlo error of the importance-weighted moments (workbench/report/iw_error.py) and
the pipeline's flag or caution where an answer's sd is not known to +-10%."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.stats import fit_generalized_pareto

from tests.helpers import fit, one_fit_recipe
from workbench import service
from workbench.auto import pipeline
from workbench.report import iw_error, posterior, thresholds

HERE = Path(__file__).resolve()


def test_the_mcse_of_a_weighted_mean_and_sd_is_the_delta_method_s():
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0]], dtype=torch.float64)
    w = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    found = iw_error.moments(x, w, w)
    # mean 2, deviations -2 -1 0 1, var 0.1*4 + 0.2 + 0 + 0.4 = 1
    assert found["mean"].item() == pytest.approx(2.0)
    assert found["std"].item() == pytest.approx(1.0)
    # sum w^2 d^2 = .01*4 + .04*1 + .09*0 + .16*1; sum w^2 (d^2 - 1)^2 = .01*9 + .09*1
    assert found["mean_mcse"].item() == pytest.approx(math.sqrt(0.24))
    assert found["std_mcse"].item() == pytest.approx(math.sqrt(0.18) / 2)


def test_equal_weights_give_the_plain_standard_error_of_the_mean():
    x = torch.randn(400, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w = torch.full((400,), 1 / 400, dtype=torch.float64)
    found = iw_error.moments(x, w, w)
    sd = x.std(0, unbiased=False)
    assert torch.allclose(found["mean_mcse"], sd / 20)


def test_the_tail_k_hat_is_pyro_s_fit_column_by_column():
    generator = torch.Generator().manual_seed(0)
    normal = torch.randn(5000, dtype=torch.float64, generator=generator) ** 2
    pareto = torch.rand(5000, dtype=torch.float64, generator=generator) ** -1.0  # k = 1
    found = iw_error.tail_khat(torch.stack([normal, pareto], 1))
    for column, k in zip((normal, pareto), found):
        ordered = column.sort().values
        size = math.ceil(min(0.2 * 5000, 3 * math.sqrt(5000)))
        expected, _ = fit_generalized_pareto((ordered[-size:] - ordered[-size - 1])
                                             / ordered[-1])
        assert k.item() == pytest.approx(expected, abs=1e-9)
    assert found[0] < thresholds.KHAT_GOOD < thresholds.KHAT_TRUSTED < found[1]


def test_sd_unknown_reads_the_mcse_and_the_tail():
    assert thresholds.sd_unknown(0.05, 0.2) == ""
    assert "15%" in thresholds.sd_unknown(0.15, 0.2)
    assert "k-hat 1.10" in thresholds.sd_unknown(0.05, 1.1)
    assert thresholds.sd_unknown(math.nan, math.nan) == ""


def heavy():
    """z fitted exactly by a Gaussian guide, and x = exp(z), log-normal with sigma 3: its
    importance-weighted sd, from 10,000 draws, is not known to +-10%, by the posterior's own
    tail (the draws are a good importance sampler)."""
    z = pyro.sample("z", dist.Normal(torch.tensor(0.0), 3.0))
    pyro.deterministic("x", torch.exp(z))


def light():
    """heavy's twin whose derived site is Gaussian, x = 2 z: its sd is well known."""
    z = pyro.sample("z", dist.Normal(torch.tensor(0.0), 3.0))
    pyro.deterministic("x", 2 * z)


@pytest.mark.parametrize("model, cautioned", [("heavy", True), ("light", False)])
def test_the_pipeline_cautions_on_a_heavy_tailed_sd_of_a_good_sampler(tmp_path, model,
                                                                       cautioned):
    summary, _ = fit(tmp_path, source=one_fit_recipe(f"{HERE}:{model}", 300))
    auto = summary["auto"]
    assert auto["weighted"] == ["mine"] and summary["diagnostics"]["khat"] < 0.5
    assert auto["flags"] == [] and auto["trusted"]
    assert bool(auto["cautions"]) == cautioned
    if cautioned:
        assert auto["cautions"][0].startswith("the sd of x is not known to +-10%")
        assert "k-hat" in auto["cautions"][0] and "quantiles" in auto["cautions"][0]
        shown = pipeline.lines(summary)
        assert f"auto: CAUTION: {auto['cautions'][0]}" in shown
        assert "auto: no flags (R-hat and k-hat within bounds)" in shown


def unknown(count: int) -> dict:
    """A posterior of ``count`` sds, the last one worst, none known to +-10%."""
    return {"a": {"mean": [0.0] * count, "std": [1.0] * count,
                  "iw_std_mcse": [0.01] * count,
                  "iw_std_khat": [0.8 + 0.1 * i for i in range(count)]}}


def test_an_unknown_sd_flags_the_answer_unless_its_sampler_is_good():
    flags, cautions = iw_error.verdict(unknown(1), khat=0.6)  # the weights may be the cause
    assert cautions == [] and flags[0].startswith("the sd of a[0] is not known to +-10%:")
    assert "k-hat 0.80 > 0.7" in flags[0]
    for khat in (None, math.nan, 0.5):
        assert iw_error.verdict(unknown(1), khat)[0] == flags
    flags, cautions = iw_error.verdict(unknown(1), khat=0.2)
    assert flags == [] and "k-hat 0.20 < 0.5" in cautions[0]


def test_the_line_names_every_unknown_sd_worst_first():
    line = iw_error.verdict(unknown(2), khat=0.6)[0][0]
    assert line.startswith("the sd of a[1] is not known to +-10% (nor is that of a[0]):")
    line = iw_error.verdict(unknown(6), khat=0.6)[0][0]
    assert line.startswith("the sd of a[5] is not known to +-10% (nor are those of a[4], "
                           "a[3], a[2] and 2 more): the tail of its squared deviations has "
                           "k-hat 1.30")
    known = {"a": {**unknown(1)["a"], "iw_std_khat": [0.2]}}
    assert iw_error.verdict(known, khat=0.6) == ([], [])


def test_the_answer_s_flag_reads_the_pooled_sd_s_relative_mcse():
    def fit(sd: float, mcse: float) -> dict:
        return {"a": {"iw_std": [sd, sd], "iw_std_mcse": [mcse, 3 * mcse],
                      "iw_std_khat": [0.1, 0.1]}}

    pooled = {"a": {"mean": [0.0, 0.0], "std": [30.0, 30.0]}}
    # two fits of sd 30: MCSE(var) = 2 * 30 * MCSE(sd) each, pooled sqrt(2) * that / 2
    assert iw_error.verdict(iw_error.pooled([fit(30.0, 0.2)] * 2, 2, pooled), 0.6) == ([], [])
    [flag], _ = iw_error.verdict(iw_error.pooled([fit(30.0, 4.0)] * 2, 2, pooled), 0.6)
    assert flag.startswith("the sd of a[1] is not known to +-10%")
    assert f"{3 * 4.0 * math.sqrt(2) / 2 / 30:.0%}" in flag  # a[1]: 3 x 4 / 30 / sqrt(2)


def near(scale: float = 3.05):
    """A guide for heavy and light close to their posterior (z ~ Normal(0, 3)): a good
    importance sampler whose weights still vary."""
    pyro.sample("z", dist.Normal(torch.tensor(0.0), scale))


@pytest.mark.parametrize("model, more", [(heavy, True), (light, False)])
def test_psis_takes_ten_times_the_draws_where_a_good_sampler_leaves_an_sd_s_tail_unbounded(
        model, more):
    pyro.set_rng_seed(0)
    found = posterior.diagnostics(model, near, {}, 0)
    assert found["khat"] < thresholds.KHAT_GOOD
    assert found["num_draws"] == (10 * posterior.NUM_IS_DRAWS if more
                                  else posterior.NUM_IS_DRAWS)
    assert ("more_draws" in found) == more
    if more:
        assert found["more_draws"].startswith("PSIS on 100000 draws, 10 times 10000: on those "
                                              "the squared deviations of x had a tail k-hat")
        assert "    " + found["more_draws"] in service.khat_lines(found)


def test_no_more_draws_where_they_would_pass_the_work_allowed(monkeypatch):
    monkeypatch.setattr(posterior, "MORE_DRAWS_WORK", 10 * posterior.NUM_IS_DRAWS - 1)
    pyro.set_rng_seed(0)
    found = posterior.diagnostics(heavy, near, {}, 0)
    assert found["num_draws"] == posterior.NUM_IS_DRAWS and "more_draws" not in found
    assert max(iw_error.flat(found["sites"]["x"]["iw_std_khat"])) > thresholds.KHAT_TRUSTED
