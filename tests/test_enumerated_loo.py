"""posterior.nc of a model whose discrete sites are summed out by enumeration: the pointwise
log-likelihood with them summed out, per observation, as ``az.loo`` reads it (a run's and the
automatic pipeline's answer's), and none, with the reason, where the observations are coupled
through a summed-out chain."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import h5netcdf
import pytest
import torch
import yaml

from tests.helpers import fit

MIXTURE = ["model=gaussian_mixture", "loss=enum_elbo", "loss.max_plate_nesting=1",
           "guide=auto_multivariate_normal", "data={dataset: {name: synthetic_mixture, n: 40}}",
           "train.steps=20", "train.plots=false", "train.eval_every=0",
           "train.diagnostics=false"]

HMM = '''
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex


def model(y):
    stay = pyro.sample("stay", dist.Beta(torch.tensor(8.0), 2.0))
    locs = pyro.sample("locs", dist.Normal(torch.tensor([-2.0, 2.0]), 1.0).to_event(1))
    moves = torch.stack([torch.stack([stay, 1 - stay], -1), torch.stack([1 - stay, stay], -1)],
                        -2)  # moves[..., i, j]: from state i to j
    state = 0
    for t in pyro.markov(range(len(y))):
        state = pyro.sample(f"state_{t}", dist.Categorical(Vindex(moves)[..., state, :]),
                            infer={"enumerate": "parallel"})
        pyro.sample(f"y_{t}", dist.Normal(Vindex(locs)[..., state], 1.0), obs=y[t])
'''


def loo(path: Path):
    import arviz as az

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = az.from_netcdf(path)
        return data, az.loo(data, pointwise=True)


def test_a_run_s_pointwise_likelihood_sums_the_labels_out_per_observation(tmp_path: Path):
    summary, run_dir = fit(tmp_path, *MIXTURE)
    assert summary["diagnostics"]["inference_data"] == "written"
    data, found = loo(run_dir / "posterior.nc")
    weights = torch.as_tensor(data.posterior["weights"].values[0])  # draws x 2
    locs = torch.as_tensor(data.posterior["locs"].values[0])
    scale = torch.as_tensor(data.posterior["scale"].values[0])
    y = torch.as_tensor(data.observed_data["obs"].values)
    component = torch.distributions.Normal(locs[:, None, :], scale[:, None, None])
    expected = torch.logsumexp(weights.log()[:, None, :] + component.log_prob(y[None, :, None]),
                               -1)  # draws x observations: log sum_k w_k N(y_n | loc_k, scale)
    got = torch.as_tensor(data.log_likelihood["obs"].values[0])
    assert got.shape == (1000, 40)
    assert torch.allclose(got.double(), expected.double(), atol=1e-4)
    assert math.isfinite(found.elpd_loo) and found.pareto_k.shape == (40,)
    assert {"lp", "log_weight"} <= set(data.sample_stats.data_vars)
    with h5netcdf.File(run_dir / "posterior.nc", "r") as file:
        assert "left_out" not in file.groups["posterior"].attrs


def test_observations_coupled_through_a_summed_out_chain_get_no_pointwise_likelihood(
        tmp_path: Path):
    (tmp_path / "hmm.py").write_text(HMM)
    summary, run_dir = fit(tmp_path, f"model={{name: {tmp_path / 'hmm.py'}:model}}",
                           "loss=enum_elbo", "guide=auto_normal", "data={y: [-2.1, -1.8, 2.2]}",
                           "train.steps=10", "train.plots=false", "train.eval_every=0",
                           "train.diagnostics=false")
    assert summary["diagnostics"]["inference_data"] == "written"
    with h5netcdf.File(run_dir / "posterior.nc", "r") as file:
        assert "log_likelihood" not in file.groups and "sample_stats" in file.groups
        left_out = file.groups["posterior"].attrs["left_out"]
    assert left_out.startswith("log_likelihood: 'y_0' depends on the summed-out site(s) ")
    assert left_out.endswith("so its likelihood does not split by observation")


@pytest.mark.slow  # a one-fit pipeline of 400 steps and its answer's draws: about 25 s
def test_the_pipeline_s_answer_has_the_summed_out_pointwise_likelihood(tmp_path: Path):
    recipe = {"model": {"name": "gaussian_mixture"}, "loggers": [],
              "data": {"dataset": {"name": "synthetic_mixture", "n": 40}},
              "train": {"plots": False, "eval_every": 0},
              "auto": {"stages": ["start", {"name": "gaussian", "runs": 1, "min_runs": 1,
                                            "max_steps": 400, "modes": 0, "reparam": "none"},
                                 "psis"]}}
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(recipe))
    summary, run_dir = fit(tmp_path, source=tmp_path / "auto.yaml")
    assert summary["diagnostics"]["inference_data"] == "written"
    data, found = loo(run_dir / "posterior.nc")
    assert data.log_likelihood["obs"].shape == (1, 1000, 40)
    assert math.isfinite(found.elpd_loo)
    assert data.sample_stats["resampled"].values.all()  # the fit's draws weighed, summed out


@pytest.mark.slow  # a short fit and the funnel lever's look at the model: 8 s of CPU
def test_a_bad_fit_of_an_enumerated_model_is_flagged_not_a_failed_stage(tmp_path: Path):
    """Where the fit's k-hat is bad the gaussian stage looks for funnels in the model, at a
    feasible point: a site it enumerates gets a draw there (Pyro's init_to_feasible refuses
    a discrete site), and the pipeline answers, flagged."""
    recipe = {"model": {"name": "gaussian_mixture"}, "loggers": [],
              "data": {"dataset": {"name": "synthetic_mixture", "n": 40}},
              "train": {"plots": False, "eval_every": 0},
              "auto": {"stages": ["start", {"name": "gaussian", "runs": 1, "min_runs": 1,
                                            "max_steps": 40, "modes": 0}, "psis"]}}
    (tmp_path / "auto.yaml").write_text(yaml.safe_dump(recipe))
    summary, _ = fit(tmp_path, source=tmp_path / "auto.yaml")
    assert summary["auto"]["flags"]
