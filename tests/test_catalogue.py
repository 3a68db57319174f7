"""The default catalogue on the coin, swapped in through ``--set`` alone: every guide with
every loss it is valid for, every optimizer, the schedules and the optim_args rules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tests.helpers import (
    EXACT_MEAN,
    EXACT_STD,
    FAST,
    MODE,
    QUICK,
    TOLERANCE,
    coin_fit,
    defaults,
    refused,
    setup,
)
from workbench.errors import UsageError
from workbench.seams import torch_optimizer
from workbench.train.runner import Run

REFUSED = refused()


# Guides shaped as another (a diagonal as auto_normal, a low rank factor as a full one) or
# a flow as auto_iaf_normal fit with elbo in the slow suite only.
ALIKE = {"auto_diagonal_normal", "auto_lowrank_multivariate_normal", "auto_gaussian_flow"}


def _pairs() -> list:
    """Every guide with every loss; each loss with auto_normal and each guide but the ALIKE
    with elbo run in the quick suite, the other pairs are marked slow (``pytest -m slow``)."""
    # pathfinder is an auto_multivariate_normal with another start: tests/test_pathfinder.py
    guides = [g for g in defaults("guide") if g != "pathfinder"]
    return [pytest.param(g, loss, marks=() if g == "auto_normal" or (
                loss == "elbo" and g not in ALIKE) else pytest.mark.slow)
            for g in guides for loss in defaults("loss")]


@pytest.mark.parametrize("guide,loss", _pairs())
def test_every_guide_with_every_loss(tmp_path: Path, guide: str, loss: str):
    sets = [f"guide={guide}", f"loss={loss}", *FAST]
    if (guide, loss) in REFUSED:
        with pytest.raises(UsageError, match="no closed-form KL|no KL"):
            setup(*sets)
        return
    _, summary = coin_fit(tmp_path, *sets)
    post = summary["posterior"]["latent_fairness"]
    if guide == "auto_delta":  # MAP: the posterior's mode, no spread
        assert post["mean"] == pytest.approx(MODE, abs=0.002) and post["std"] < 1e-5
    else:
        assert abs(post["mean"] - EXACT_MEAN) < TOLERANCE, post
        assert abs(post["std"] - EXACT_STD) < TOLERANCE, post


def test_refusal_is_one_line_before_any_training(tmp_path: Path):
    from tests.helpers import COIN, vibench

    result = vibench("run", str(COIN), "--set", "guide=auto_normal", "--set",
                     "loss=analytic_kl_elbo", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: model 'beta_bernoulli', guide 'auto_normal' and loss 'analytic_kl_elbo' do not "
        "work together: the guide's auxiliary site 'latent_fairness_unconstrained' has no "
        "closed-form KL term; use loss 'elbo'"]
    assert list(tmp_path.iterdir()) == []


def test_analytic_kl_loss_agrees_with_elbo_on_the_coin(tmp_path: Path):
    """The same fit by two routes: Monte Carlo KL and closed-form KL (both Beta)."""
    fits = {loss: coin_fit(tmp_path, f"loss={loss}", *FAST)[1]["posterior"]["latent_fairness"]
            for loss in ("elbo", "analytic_kl_elbo")}
    for key in ("mean", "std"):  # each route's own noise is a tenth of an sd or less
        assert fits["elbo"][key] == pytest.approx(fits["analytic_kl_elbo"][key], abs=TOLERANCE)


@pytest.mark.parametrize("loss", ["elbo", "graph_elbo", "enum_elbo"])
def test_jit_variants_run(tmp_path: Path, loss: str):
    _, summary = coin_fit(tmp_path, f"loss={loss}", "loss.jit=true", *FAST)
    assert abs(summary["posterior"]["latent_fairness"]["mean"] - EXACT_MEAN) < TOLERANCE


OPTIMIZERS = {
    "adam": ["optimizer.lr=0.05"],
    "clipped_adam": ["optimizer.lr=0.05", "optimizer.clip_norm=5.0"],
    "adamw": ["optimizer.lr=0.05"],
    "sgd": ["optimizer.lr=0.01", "optimizer.momentum=0.9"],
    "rmsprop": ["optimizer.lr=0.01"],
    "adagrad": ["optimizer.lr=0.3"],
}


def test_every_default_optimizer_is_covered():
    assert sorted(OPTIMIZERS) == defaults("optimizer")


# adam, sgd and adagrad fit the coin in the quick suite; Adam's variants (adamw,
# clipped_adam) and rmsprop, which scales steps as Adam does, in the slow suite.
QUICK_OPTIMIZERS = {"adam", "sgd", "adagrad"}


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=() if name in QUICK_OPTIMIZERS else pytest.mark.slow)
    for name in sorted(OPTIMIZERS)])
def test_every_optimizer_fits_the_coin(tmp_path: Path, name: str):
    _, summary = coin_fit(tmp_path, f"optimizer={name}", *OPTIMIZERS[name],
                          "optimizer.schedule=exponential", "optimizer.schedule.gamma=0.997",
                          "train.steps=1000", *QUICK)
    post = summary["posterior"]["latent_fairness"]
    assert abs(post["mean"] - EXACT_MEAN) < TOLERANCE and abs(post["std"] - EXACT_STD) < TOLERANCE


def learning_rate(run: Run, param: str = "log_alpha_q") -> float:
    import pyro

    for tensor, optimizer in run.svi.optim.optim_objs.items():
        if pyro.get_param_store().param_name(tensor) == param:
            return torch_optimizer(optimizer).param_groups[0]["lr"]
    raise KeyError(param)


@pytest.mark.parametrize("schedule, sets, expected", [
    ("exponential", ["optimizer.schedule.gamma=0.99"], 0.01 * 0.99**200),
    ("step", ["optimizer.schedule.step_size=60", "optimizer.schedule.gamma=0.5"], 0.01 / 8),
    ("cosine", [], 0.0),
    ("cosine", ["optimizer.schedule.period=400", "optimizer.schedule.eta_min=0.001"],
     0.001 + 0.009 * (1 + math.cos(math.pi * 200 / 400)) / 2),
])
def test_schedules_are_stepped_once_per_svi_step(tmp_path: Path, schedule, sets, expected):
    run, _ = coin_fit(tmp_path, "optimizer.lr=0.01", f"optimizer.schedule={schedule}", *sets,
                      "train.steps=200")
    assert learning_rate(run) == pytest.approx(expected, rel=1e-6, abs=1e-12)


def test_reduce_on_plateau_gets_the_loss_and_cuts_the_rate(tmp_path: Path):
    run, _ = coin_fit(tmp_path, "optimizer.lr=0.01", "optimizer.schedule=reduce_on_plateau",
                      "optimizer.schedule.patience=20", "optimizer.schedule.factor=0.5",
                      "train.steps=300")
    assert learning_rate(run) < 0.01
    assert math.log2(0.01 / learning_rate(run)) == pytest.approx(
        round(math.log2(0.01 / learning_rate(run))))  # whole halvings


def test_schedule_keeps_per_param_rules(tmp_path: Path):
    run, _ = coin_fit(tmp_path, "optimizer.lr=0.01", "optimizer.schedule=exponential",
                      "optimizer.schedule.gamma=0.99", "optimizer.optim_args=per_param",
                      "optimizer.optim_args.rules.log_beta_q.lr=0.001", "train.steps=100")
    assert learning_rate(run, "log_alpha_q") == pytest.approx(0.01 * 0.99**100)
    assert learning_rate(run, "log_beta_q") == pytest.approx(0.001 * 0.99**100)


def test_lr_by_size_scales_each_parameter(tmp_path: Path):
    run, _ = coin_fit(tmp_path, "optimizer.lr=0.01", "optimizer.optim_args=lr_by_size",
                      "optimizer.optim_args.reference=4", "optimizer.optim_args.power=1.0",
                      "train.steps=5")
    assert learning_rate(run, "log_alpha_q") == pytest.approx(0.04)  # 0.01 * (4 / 1) ** 1


def test_init_loc_by_name_and_by_value(tmp_path: Path):
    import pyro

    for init_loc, expected in [("mean", 0.5), ("{latent_fairness: 0.8}", 0.8)]:
        run = setup("guide=auto_delta", f"guide.init_loc={init_loc}")
        assert pyro.param("AutoDelta.latent_fairness").item() == pytest.approx(expected, abs=1e-6)
        del run


def test_bad_catalogue_options_are_recipe_errors():
    for sets, expected in [
        (["guide=auto_normal", "guide.init_loc=medain"], "guide.init_loc: expected one of"),
        (["guide=auto_lowrank_multivariate_normal", "guide.rank=0"], "rank must be >= 1"),
        (["loss=renyi_elbo", "loss.alpha=1"], "alpha 1 is the ordinary ELBO"),
        (["optimizer.schedule=exponential", "optimizer.schedule.gamma=2"], "gamma must be in"),
        (["optimizer.schedule=cosin"], "unknown schedule 'cosin'; did you mean 'cosine'?"),
        (["optimizer.lr=-1"], "optimizer 'adam': Invalid learning rate: -1"),
        (["optimizer=sgd", "optimizer.nesterov=true"], "optimizer 'sgd': Nesterov momentum"),
    ]:
        with pytest.raises(UsageError, match=expected.replace("(", r"\(").replace("?", r"\?")):
            setup(*sets)
