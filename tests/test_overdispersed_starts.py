"""The gaussian stage's mode searches from overdispersed starts (``modes``, plugins/modes.py):
fits that all begin around one Laplace mode agree on it and the pipeline trusts half the
posterior; fits started at the modes the searches found disagree, the pipeline says so, and
the fits' mixture importance-weighted against the model is its answer, in summary.json,
posterior.nc and ``Fit.sample`` alike, with the posterior's moments; where that mixture's
k-hat is bad, the answer is one fit's, flagged.

The target is symmetric about 0, with a mode on each side and a 32-nat barrier between: the
searches start in antithetic pairs about 0, so each pair searches both sides and both modes
are found whatever the random stream; no fit crosses the barrier."""

from __future__ import annotations

import json
import math
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
    about ``light`` (equal: mean 0, sd 4); x2 = x^2, a deterministic site."""
    x = pyro.sample("x", dist.Normal(torch.tensor(0.0), 3.0))
    pyro.deterministic("x2", x ** 2)
    weights = torch.stack([1 - torch.as_tensor(light), torch.as_tensor(light)]).float()
    likelihood = dist.MixtureSameFamily(dist.Categorical(weights),
                                        dist.Normal(x[..., None] + torch.tensor([4.0, -4.0]), 0.5))
    pyro.sample("y", likelihood, obs=torch.tensor(0.0))


def run(tmp_path: Path, modes: int, light: float | None = 0.5, model: str = "two_modes",
        max_steps: int = 20, lr: float = 0.01, then: tuple = ()) -> dict:
    recipe = {"model": {"name": f"{Path(__file__).resolve()}:{model}"}, "loggers": [],
              "data": {"light": light} if model == "two_modes" else {},
              "train": {"plots": False, "eval_every": 0},
              "auto": {"stages": ["start", {"name": "gaussian", "runs": 2, "lr": lr,
                                            "max_steps": max_steps, "modes": modes}, "rhat",
                                 "psis", *then]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return service.start(path, [], tmp_path / "run", get_registry()).train()


def test_fits_around_one_laplace_mode_trust_half_of_a_two_mode_posterior(tmp_path: Path):
    summary = run(tmp_path, modes=0)
    assert summary["auto"]["trusted"]
    assert abs(abs(summary["posterior"]["x"]["mean"]) - 4) < 0.5  # one mode, called the answer


def exact(light: float) -> tuple[float, float]:
    """The exact posterior mean and sd of ``two_modes``'s x: each component's likelihood
    times the prior is a Normal (precision 1/9 + 1/0.25) about -4 or 4 scaled, and both have
    the same evidence, so the modes' weights are the likelihood's, 1 - light and light."""
    precision = 1 / 9 + 1 / 0.25
    centre, variance = 4 / 0.25 / precision, 1 / precision
    mean = (2 * light - 1) * centre
    return mean, math.sqrt(variance + centre ** 2 - mean ** 2)


@pytest.mark.parametrize("light", [0.5, 0.3])
def test_fits_at_the_modes_the_searches_found_are_answered_by_their_weighed_mixture(
        tmp_path: Path, light: float):
    """The fits disagree (R-hat, said), and their mixture weighed against the model is the
    answer: its mean within 0.15 sd and its sd within 15% of the exact ones (4,000 draws at
    k-hat < 0.5 leave Monte Carlo errors near a tenth of that), trusted. posterior.nc's
    1,000 draws, resampled from the pooled draws of both fits, and ``Fit.sample``'s have the
    same moments within 0.2 sd and 20%. The fits take 60 steps (lr 0.05) to their modes: one
    left 0.7 of an sd off its mode after 20 steps (lr 0.01) gives the mixture a bad k-hat
    (1.3 on seed 4 of 0-9, light 0.3), and the answer is then flagged, as it should be; with
    60, all of seeds 0-9 are answered by the mixture, their errors below a third of these
    bounds."""
    import arviz as az

    from workbench import load

    summary = run(tmp_path, modes=4, light=light, max_steps=60, lr=0.05)
    auto = summary["auto"]
    said = {stage["stage"]: stage["said"] for stage in auto["stages"]}
    shares = f"Laplace mass {max(light, 1 - light):.2f}, {min(light, 1 - light):.2f}"
    assert f"2 distinct modes ({shares})" in said["gaussian"]
    assert "the fits disagree: several modes" in said["rhat"]
    assert "answered by their weighed mixture" in said["rhat"]
    assert auto["trusted"] and auto["answer"] == "weighed mixture"
    assert sorted(auto["used"]) == ["gaussian-1", "gaussian-2"]
    means = [summary_of(fit)["posterior"]["x"]["mean"] for fit in auto["fits"]]
    assert sorted(round(mean) for mean in means) == [-4, 4]
    mean, sd = exact(light)
    entry = summary["posterior"]["x"]
    assert abs(entry["mean"] - mean) < 0.15 * sd and abs(entry["std"] / sd - 1) < 0.15
    assert entry["q05"] < -3 and entry["q95"] > 3  # both modes inside the 90% interval
    # x^2 at either mode N(+-c, v): mean c^2 + v, sd sqrt(4 c^2 v + 2 v^2), whatever light
    centre, variance = 4 / 0.25 / (1 / 9 + 4), 1 / (1 / 9 + 4)
    square = summary["posterior"]["x2"]
    square_sd = math.sqrt(4 * centre ** 2 * variance + 2 * variance ** 2)
    assert abs(square["mean"] - centre ** 2 - variance) < 0.15 * square_sd
    assert abs(square["std"] / square_sd - 1) < 0.15
    assert summary["diagnostics"]["khat"] == auto["rhat"]["mixture"]["khat"] < 0.5
    data = az.from_netcdf(tmp_path / "run" / "posterior.nc")
    drawn = data.posterior["x"].values.ravel()
    stats = data.sample_stats
    assert set(stats["fit"].values.ravel()) == {0, 1} and stats["resampled"].values.all()
    assert "log_weight" in stats
    assert abs(drawn.mean() - mean) < 0.2 * sd and abs(drawn.std() / sd - 1) < 0.2
    sampled = load(tmp_path / "run", trust_code=True).sample(2000, seed=1)["x"].double()
    assert abs(float(sampled.mean()) - mean) < 0.2 * sd
    assert abs(float(sampled.std()) / sd - 1) < 0.2


def heavy_modes():
    """``two_modes``'s x beside 20 Cauchy-distributed nuisance values: the Gaussian fits at
    the two modes, of about their Laplace scales, reach nowhere near the Cauchy tails."""
    pyro.sample("z", dist.Cauchy(torch.zeros(20), 1.0).to_event(1))
    two_modes()


def test_where_the_fits_weighed_mixture_has_a_bad_k_hat_the_answer_stays_flagged(
        tmp_path: Path):
    """The hmc stage does not run either: chains from one fit would stay at its mode, and
    their agreement would call half of the posterior the answer."""
    summary = run(tmp_path, modes=4, model="heavy_modes", then=("hmc",))
    auto = summary["auto"]
    said = {stage["stage"]: stage["said"] for stage in auto["stages"]}
    assert "2 distinct modes" in said["gaussian"]
    assert said["hmc"].startswith("skipped: the mode searches found 2 modes")
    assert auto["rhat"]["mixture"]["khat"] > 0.7
    assert not auto["trusted"] and auto["answer"] == "best" and len(auto["used"]) == 1
    assert any("the fits disagree: several modes" in flag for flag in auto["flags"])


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
                                            "max_steps": 20, "modes": 8, "reparam": "none"},
                                  "rhat", "psis"]}}  # the searches alone, not the funnel lever
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    summary = service.start(path, [], tmp_path / "run", get_registry()).train()
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert "mode searches stopped: the first, from the first fit's start, found no mode" \
        in said["gaussian"]


def three_modes():
    """x's posterior: three modes near -6, 0 and 6 (sd about 0.5), of about equal mass."""
    x = pyro.sample("x", dist.Normal(torch.tensor(0.0), 5.0))
    likelihood = dist.MixtureSameFamily(dist.Categorical(torch.ones(3)),
                                        dist.Normal(x[..., None] + torch.tensor([6.0, 0.0, -6.0]),
                                                    0.5))
    pyro.sample("y", likelihood, obs=torch.tensor(0.0))


def test_where_a_mode_found_has_no_fit_at_it_the_answer_stays_flagged(tmp_path: Path):
    """Two fits for three modes: their mixture, however well weighed, has no draws at the
    third. 32 searches (16 antithetic pairs) all miss the middle basin, |start| < 3 under the
    prior's Normal(0, 5), or all start in it, with odds below 1e-4."""
    summary = run(tmp_path, modes=32, model="three_modes")
    auto = summary["auto"]
    said = {stage["stage"]: stage["said"] for stage in auto["stages"]}
    assert "3 distinct modes" in said["gaussian"]
    assert not auto["trusted"] and auto["answer"] == "best"
    assert any("1 of the modes found has no fit at it" in flag for flag in auto["flags"])


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_hard_two_mode_posterior_is_answered_by_the_weighed_mixture(tmp_path: Path,
                                                                         seed: int):
    """hard_mixture2 (packages/vibench-hardcases): modes 8 sds apart with weights 0.70 and
    0.30; its reference is exact. The answer, its draws and plots are the weighed mixture's,
    good against the reference (every z <= 0.2, 0.8 <= r <= 1.2) and trusted."""
    pytest.importorskip("vibench_hardcases")
    from tests.helpers import REPO

    recipe = REPO / "packages" / "vibench-hardcases" / "recipes" / "hard_mixture2.yaml"
    summary = service.start(recipe, [f"seed={seed}"], tmp_path / "run", get_registry()).train()
    assert summary["auto"]["answer"] == "weighed mixture" and summary["auto"]["trusted"]
    assert summary["reference"]["good"]
    assert (tmp_path / "run" / "posterior.nc").is_file()
    assert (tmp_path / "run" / "plots" / "site-theta.png").is_file()


def _searches():
    """A two-mode potential of 3 coordinates (modes at x0 = -4 and 4), batched as
    pathfinder.batch_potential's, counting its runs; and 8 starts on both sides."""
    runs = []

    def potentials(x):
        runs.append(len(x))
        near = torch.stack([(x[:, 0] + 4) ** 2, (x[:, 0] - 4) ** 2], -1) / 0.5
        return -torch.logsumexp(-near, -1) + 0.5 * (x[:, 1:] ** 2 * torch.tensor([1.0, 9.0])
                                                    ).sum(-1)

    potentials.rowwise = False
    generator = torch.Generator().manual_seed(0)
    starts = [3 * torch.randn(3, generator=generator) for _ in range(8)]
    return potentials, (lambda point: potentials(point[None])[0]), starts, runs


def test_the_searches_run_side_by_side_with_one_model_run_a_round():
    """``descend_together`` ends where each search run alone ends (the same L-BFGS, only the
    model's runs batched), and runs the model once a round for all searches still going:
    far fewer runs than the searches' evaluations."""
    from vibench_plugins import laplace

    potentials, potential, starts, runs = _searches()
    alone = [laplace.descend(potential, start, True) for start in starts]
    evaluations = len(runs)
    runs.clear()
    together = laplace.descend_together(potentials, potential, starts, True)
    for one, other in zip(alone, together):
        assert one.converged and other.converged
        assert torch.allclose(one.point, other.point, atol=1e-3)
    assert {round(float(fit.point[0])) for fit in together} == {-4, 4}
    batched = [count for count in runs if count > 2]
    assert len(batched) < evaluations / 4 and max(batched) == len(starts)


def test_a_stop_during_the_searches_ends_them_all():
    """A stop signal arrives in the thread that runs the model (Python's signal handlers
    run there): it propagates, and every search's thread ends at its next evaluation."""
    import threading

    from vibench_plugins import laplace

    potentials, potential, starts, runs = _searches()

    def stopped(x):
        if len(runs) == 5:
            raise KeyboardInterrupt
        return potentials(x)

    stopped.rowwise = False
    before = set(threading.enumerate())
    with pytest.raises(KeyboardInterrupt):
        laplace.descend_together(stopped, potential, starts, True)
    searches = set(threading.enumerate()) - before
    for thread in searches:  # each ends at its next evaluation, handed the stop
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in searches)


def test_a_point_the_model_refuses_with_an_error_is_that_search_s_answer_alone():
    """A model that raises at some points (beyond x0 = 2 here) fails the whole batched
    round: each point is then run alone, the refused one's error is its search's answer
    (which ends that search, as it ends a search run alone: ``laplace._lbfgs``), and the
    others get their values and gradients."""
    from vibench_plugins import laplace

    potentials, _, starts, runs = _searches()

    def walled(x):
        if bool((x[:, 0] > 2.0).any()):
            raise IndexError("a point the model refuses")
        return potentials(x)

    asked = {0: torch.tensor([-1.0, 0.5, 0.2]), 3: torch.tensor([3.0, 0.0, 0.0]),
             5: torch.tensor([-4.5, -0.1, 0.3])}
    answers = laplace._Lockstep(walled)._answers(asked)
    assert isinstance(answers[3], IndexError)
    for i in (0, 5):
        value, gradient = laplace.value_and_gradient(potentials, asked[i][None])
        assert torch.allclose(answers[i][0], value[0]) and torch.allclose(answers[i][1],
                                                                         gradient[0])
    # the search handed the error ends where it was, as a search run alone does
    end = laplace._lbfgs(lambda x: (_ for _ in ()).throw(IndexError("refused")),
                         asked[3])
    assert torch.equal(end, asked[3])
