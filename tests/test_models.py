"""The default models fitted with auto_normal to the default synthetic data sets recover the
values the data were simulated from; data of the wrong shape are refused, naming the argument.

Tolerances come from fits over data seeds 0-3 with these settings (the tests use seed 0):

- linear_regression (n 200, noise 0.5 known): posterior means within 0.006 of the exact ones
  (whose sd is 0.035) and sds within 5.3% of the exact ones; every mean within 2.9 posterior
  sds of the truth. With the noise learned: noise within 1.6 sds of 0.5, coefficients within
  0.066 of the truth. 100,000 rows in batches of 500: means within 0.0053 of the exact ones.
- logistic_regression (n 2000): every mean within 2.1 posterior sds of the truth (sds 0.06-0.09).
- eight_schools on synthetic_schools (1000 schools, mu 5, tau 2, sigma 1): mu within 0.026 of
  the schools' mean and 0.12 of the truth (sampling sd sqrt(5/1000) = 0.07); tau within 0.01
  of the moment estimate sqrt(var(y) - 1) and 0.074 of the truth (sampling sd about 0.06).
- gaussian_mixture (n 500, locs -3 and 3, scale 1; data seeds 0-7; the recipe's guide starts
  at locs -1, 1 and scale 1): sorted locs within 0.012 of the means of the negative and
  positive draws and 0.115 of the truth (sampling sd 0.06); scale within 0.063 of 1
  (sampling sd 0.03); weights within 0.033 of 0.5. From locs both at 0 (auto_normal's
  default start) 1 seed in 4 settles on one wide component (locs near 0, scale 3.2).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import RECIPES, setup, train, vibench
from workbench.errors import UsageError
from workbench.train.runner import Run

# Adam with a shorter memory of squared gradients than its default (0.999), so that the
# guide's scales, whose early gradients are large, still move late in the run; the rate
# decays to a hundredth by the last step.
FAST = ["optimizer=adam", "optimizer.lr=0.1", "optimizer.betas=[0.9, 0.99]",
        "optimizer.schedule=exponential", "optimizer.schedule.gamma=0.9954",
        "train.steps=1000", "train.eval_every=0", "train.log_params_every=0",
        # nothing here reads the plots, the event files or k-hat: the fit is the same
        "train.plots=false", "train.diagnostics=false", "loggers=[]"]


def prepare(recipe: str, *sets: str) -> Run:
    return setup(*sets, source=RECIPES / recipe)


def fit(tmp_path: Path, recipe: str, *sets: str) -> dict:
    return train(prepare(recipe, *FAST, *sets), tmp_path)["posterior"]


def test_linear_regression_matches_the_exact_posterior_and_the_truth(tmp_path: Path):
    post = fit(tmp_path, "linear_regression.yaml", "loss.num_particles=4")
    truth = {"intercept": [1.0], "coefficients": [1.5, -2.0, 0.5]}
    for site, values in truth.items():
        entry = {key: value if isinstance(value, list) else [value]
                 for key, value in post[site].items() if key != "method"}
        for i, true in enumerate(values):
            mean, std = entry["mean"][i], entry["std"][i]
            exact_mean, exact_std = entry["exact_mean"][i], entry["exact_std"][i]
            assert abs(exact_mean - true) < 4 * exact_std, (site, i, entry)
            assert abs(mean - exact_mean) < 0.015, (site, i, entry)
            assert std == pytest.approx(exact_std, rel=0.12), (site, i, entry)


def test_linear_regression_learns_the_noise_when_it_is_not_given(tmp_path: Path):
    post = fit(tmp_path, "linear_regression.yaml", "model.noise=null", "loss.num_particles=4")
    assert "exact_mean" not in post["intercept"]  # no closed form with the noise unknown
    assert abs(post["noise"]["mean"] - 0.5) < 4 * post["noise"]["std"], post["noise"]
    assert post["coefficients"]["mean"] == pytest.approx([1.5, -2.0, 0.5], abs=0.15)


def test_linear_regression_in_minibatches_of_a_large_data_set(tmp_path: Path):
    """100,000 rows, 500 a step: the plate's indices pick the rows of x and y."""
    post = fit(tmp_path, "linear_regression.yaml", "data.dataset.n=100000",
               "train.batch_size=500")
    for site in ("intercept", "coefficients"):
        assert post[site]["mean"] == pytest.approx(post[site]["exact_mean"], abs=0.015)


def test_logistic_regression_covers_the_truth(tmp_path: Path):
    post = fit(tmp_path, "logistic_regression.yaml", "loss.num_particles=4")
    means = [post["intercept"]["mean"], *post["coefficients"]["mean"]]
    stds = [post["intercept"]["std"], *post["coefficients"]["std"]]
    for mean, std, true in zip(means, stds, [0.5, 2.0, -1.0]):
        assert 0 < std < 0.15 and abs(mean - true) < 4 * std, (means, stds)


@pytest.mark.slow  # a statistical run of 7-9 s: the quick suite keeps CI under 10 min
def test_schools_recover_mu_and_tau_from_many_schools(tmp_path: Path):
    run = prepare("eight_schools.yaml", *FAST, "data.dataset=synthetic_schools",
                  "data.dataset.schools=1000", "loss.num_particles=4")
    y = run.data["y"]
    post = run.train(tmp_path)["posterior"]
    assert abs(post["mu"]["mean"] - y.mean().item()) < 0.1
    assert abs(post["tau"]["mean"] - (y.var() - 1).sqrt().item()) < 0.1
    assert abs(post["mu"]["mean"] - 5.0) < 0.3 and abs(post["tau"]["mean"] - 2.0) < 0.25
    assert len(post["theta_tilde"]["mean"]) == 1000


def test_eight_schools_recipe_reads_the_real_data():
    run = prepare("eight_schools.yaml", "train.steps=1")
    assert run.data["y"].tolist() == [28, 8, -3, 7, -1, 1, 18, 12]
    assert run.data["sigma"].tolist() == [15, 10, 16, 11, 9, 11, 10, 18]


@pytest.mark.slow  # a statistical run of 7-9 s: the quick suite keeps CI under 10 min
def test_gaussian_mixture_finds_both_components(tmp_path: Path):
    run = prepare("gaussian_mixture.yaml", *FAST, "loss.num_particles=1")
    y = run.data["y"]
    post = run.train(tmp_path)["posterior"]
    assert "assignment" not in post  # summed out by the loss, never sampled
    locs = sorted(post["locs"]["mean"])
    assert locs[0] == pytest.approx(y[y < 0].mean().item(), abs=0.05)
    assert locs[1] == pytest.approx(y[y > 0].mean().item(), abs=0.05)
    assert locs == pytest.approx([-3.0, 3.0], abs=0.25)
    assert post["scale"]["mean"] == pytest.approx(1.0, abs=0.15)
    assert post["weights"]["mean"] == pytest.approx([0.5, 0.5], abs=0.1)


@pytest.mark.parametrize("recipe, sets, message", [
    ("linear_regression.yaml", ["data.x=[[1, 2], [3, 4], [5, 6]]", "data.y=[1, 2]"],
     "model 'linear_regression': x has 3 rows but y has 2 values"),
    ("linear_regression.yaml", ["data.x=[[[1], [2]]]", "data.y=[1]"],
     "model 'linear_regression': x must be 2-D"),
    ("linear_regression.yaml", ["data.x=[[1], [2]]", "data.y=[[1], [2]]"],
     "model 'linear_regression': y must be 1-D"),
    ("logistic_regression.yaml", ["data.x=[[1], [2]]", "data.y=[1, 0, 1]"],
     "model 'logistic_regression': x has 2 rows but y has 3 values"),
    ("logistic_regression.yaml", ["data.x=[[1], [2]]", "data.y=[1, 2]"],
     "data.y: 2.0 at index [1] is outside the support of the Bernoulli"),
    ("eight_schools.yaml", ["data.y=[1, 2, 3]", "data.sigma=[1, 2]"],
     "model 'eight_schools': y has 3 schools but sigma has 2"),
    ("eight_schools.yaml", ["data.y=[1, 2]", "data.sigma=[1, 0]"],
     "model 'eight_schools': sigma[1] is 0.0; each school's standard error must be > 0"),
    ("gaussian_mixture.yaml", ["data.y=[[1, 2], [3, 4]]"],
     "model 'gaussian_mixture': y must be 1-D"),
    ("gaussian_mixture.yaml", ["data.y=[]"], "model 'gaussian_mixture': y is empty"),
])
def test_data_of_the_wrong_shape_are_refused_naming_the_argument(recipe, sets, message):
    with pytest.raises(UsageError) as caught:
        prepare(recipe, "data=null", *sets)
    assert message in str(caught.value)


def test_one_regressor_may_be_a_plain_list():
    run = prepare("linear_regression.yaml", "data=null", "data.x=[1, 2, 3]", "data.y=[2, 4, 6]")
    assert run.sites["coefficients"] == (1,)


@pytest.mark.parametrize("sets, message", [
    (["data.dataset.n=0"], "dataset 'synthetic_regression': n must be >= 1, got 0"),
    (["data.dataset.noise=-1"], "dataset 'synthetic_regression': noise must be >= 0"),
    (["data.dataset.coefficients=[]"], "coefficients must list at least one value"),
    (["data.dataset=synthetic_coin", "data.dataset.p=1.5", "model=beta_bernoulli"],
     "dataset 'synthetic_coin': p must be in [0, 1], got 1.5"),
    (["data.dataset=synthetic_mixture", "data.dataset.weights=[1]", "model=gaussian_mixture"],
     "weights has 1 values but locs has 2"),
    (["data.dataset=synthetic_schools", "data.dataset.sigma=0", "model=eight_schools"],
     "dataset 'synthetic_schools': sigma must be > 0"),
])
def test_bad_data_set_options_are_refused(sets, message):
    with pytest.raises(UsageError) as caught:
        prepare("linear_regression.yaml", *sets)
    assert message in str(caught.value)


def test_synthetic_data_do_not_change_with_the_run_seed():
    first = prepare("gaussian_mixture.yaml", "seed=1", "train.steps=1").data["y"]
    second = prepare("gaussian_mixture.yaml", "seed=2", "train.steps=1").data["y"]
    other = prepare("gaussian_mixture.yaml", "data.dataset.seed=1", "train.steps=1").data["y"]
    assert first.tolist() == second.tolist() and first.tolist() != other.tolist()


def test_shape_error_exits_2_with_one_line_and_writes_nothing(tmp_path: Path):
    result = vibench("run", str(RECIPES / "linear_regression.yaml"), "--set", "data=null",
                     "--set", "data.x=[[1], [2], [3]]", "--set", "data.y=[1, 2]", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: model 'linear_regression': x has 3 rows but y has 2 values; give one row of x "
        "per value of y"]
    assert list(tmp_path.iterdir()) == []
