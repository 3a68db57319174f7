"""The gaussian stage's mode searches from overdispersed starts (``modes``, plugins/modes.py):
fits that all begin around one Laplace mode agree on it and the pipeline trusts half the
posterior; fits started at the modes the searches found disagree, the pipeline says so, and
the fits' mixture importance-weighted against the model has the posterior's moments.

The target is symmetric about 0, with a mode on each side and a 32-nat barrier between: the
searches start in antithetic pairs about 0, so each pair searches both sides and both modes
are found whatever the random stream; no fit crosses the barrier."""

from __future__ import annotations

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import yaml

from workbench import service
from workbench.plugins.registry import get_registry


def two_modes(light: float = 0.5):
    """x's posterior: a mixture of about N(-4, 0.5^2) and N(4, 0.5^2), the second with weight
    about ``light`` (equal: mean 0, sd 4)."""
    x = pyro.sample("x", dist.Normal(torch.tensor(0.0), 3.0))
    weights = torch.stack([1 - torch.as_tensor(light), torch.as_tensor(light)]).float()
    likelihood = dist.MixtureSameFamily(dist.Categorical(weights),
                                        dist.Normal(x[..., None] + torch.tensor([4.0, -4.0]), 0.5))
    pyro.sample("y", likelihood, obs=torch.tensor(0.0))


def run(tmp_path: Path, modes: int, light: float = 0.5) -> dict:
    recipe = {"model": {"name": f"{Path(__file__).resolve()}:two_modes"}, "loggers": [],
              "data": {"light": light},
              "train": {"plots": False, "eval_every": 0},
              "auto": {"stages": ["start", {"name": "gaussian", "runs": 2, "lr": 0.01,
                                            "max_steps": 20, "modes": modes}, "rhat", "psis"]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return service.start(path, [], tmp_path / "run", get_registry()).train()


def test_fits_around_one_laplace_mode_trust_half_of_a_two_mode_posterior(tmp_path: Path):
    summary = run(tmp_path, modes=0)
    assert summary["auto"]["trusted"]
    assert abs(abs(summary["posterior"]["x"]["mean"]) - 4) < 0.5  # one mode, called the answer


def test_fits_started_at_the_modes_the_searches_found_disagree_and_are_flagged(tmp_path: Path):
    summary = run(tmp_path, modes=4)
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert "2 distinct modes (Laplace mass 0.50, 0.50)" in said["gaussian"]
    assert not summary["auto"]["trusted"]
    assert any("the fits disagree: several modes" in flag for flag in summary["auto"]["flags"])
    means = [summary_of(fit)["posterior"]["x"]["mean"] for fit in summary["auto"]["fits"]]
    assert sorted(round(mean) for mean in means) == [-4, 4]
    # the fits' mixture weighed against the model has the posterior's moments (0 +- 4.03);
    # 4,000 draws at k-hat < 0.5 leave a Monte Carlo sd near 0.07 on the mean
    mixture = summary["auto"]["rhat"]["mixture"]
    (mean,), (sd,) = mixture["moments"]["x"]
    assert mixture["khat"] < 0.5 and abs(mean) < 0.5 and 3.6 < sd < 4.4


def summary_of(fit: dict) -> dict:
    return json.loads((Path(fit["path"]) / "summary.json").read_text())


def test_a_mode_with_a_negligible_share_of_the_mass_is_left_out(tmp_path: Path):
    """Weights 0.998 and 0.002 move the basins' border to x = 0.19: both modes are found
    unless every antithetic pair starts within 0.19 of 0 (odds below 1e-5); either way no fit
    goes to the light mode, and the answer is trusted."""
    summary = run(tmp_path, modes=8, light=0.002)
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert summary["auto"]["trusted"]
    assert "one mode (1 more below 1% of the Laplace mass left out)" in said["gaussian"]


def test_a_negative_number_of_mode_searches_is_refused(tmp_path: Path):
    from workbench.errors import UsageError

    with pytest.raises(UsageError, match="modes >= 0"):
        run(tmp_path, modes=-1)


def test_the_searches_leave_the_first_fit_s_path_as_it_was(tmp_path: Path):
    """The model's potential draws from torch's stream (the guide's init_loc strategy): the
    searches put it back, so a one-mode posterior's fit takes the same path with them."""
    coin = {"model": {"name": "beta_bernoulli"}, "data": {"flips": [1, 1, 0, 1, 0, 1, 1]},
            "loggers": [], "train": {"plots": False, "eval_every": 0}}
    losses = []
    for modes in (0, 4):
        stages = ["start", {"name": "gaussian", "runs": 1, "min_runs": 1, "max_steps": 40,
                            "modes": modes}, "rhat", "psis"]
        path = tmp_path / f"recipe{modes}.yaml"
        path.write_text(yaml.safe_dump({**coin, "auto": {"stages": stages}}))
        summary = service.start(path, [], tmp_path / f"run{modes}", get_registry()).train()
        losses.append(summary["final_loss"])
    assert losses[0] == losses[1]


def test_a_density_without_a_mode_stops_the_searches_at_the_first(tmp_path: Path):
    """A centred hierarchical model's density grows without bound as tau -> 0: the first
    search runs there, and searching from more starts would only do so again."""
    recipe = {"model": {"name": f"{Path(__file__).resolve().parent / 'test_hard_starts.py'}"
                                 ":centred"},
              "data": {"y": [0.3, -0.2, 0.5, 0.1, -0.4]}, "loggers": [],
              "train": {"plots": False, "eval_every": 0},
              "auto": {"stages": ["start", {"name": "gaussian", "runs": 2, "lr": 0.01,
                                            "max_steps": 20, "modes": 8}, "rhat", "psis"]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = service.start(path, [], tmp_path / "run", get_registry()).train()
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert "mode searches stopped: the first, from the first fit's start, found no mode" \
        in said["gaussian"]
