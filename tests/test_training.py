"""Training behaviour through the runner: accuracy across seeds, per-parameter optimizer
settings, and a loss that goes non-finite."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import COIN, EXACT_MEAN, EXACT_STD, python, setup, train, vibench
from workbench.errors import RunError
from workbench.train.runner import Run


def fit(tmp_path: Path, *sets: str) -> dict:
    return train(setup(*sets), tmp_path)


@pytest.mark.xdist_group("compiled_coin")  # the coin's step, compiled once for the group
@pytest.mark.parametrize("seed", [1, 2])
def test_seed_numbers_hold_for_other_seeds(tmp_path: Path, seed: int):
    # The seed's settings; evaluation, plots, the diagnostic and loggers never change the fit,
    # nor does compiling (eager's random numbers, a tenth of the time; seed 0 runs eagerly).
    post = fit(tmp_path, f"seed={seed}", "train.eval_every=0", "train.plots=false",
               "train.diagnostics=false", "loggers=[]", "train.compile=true"
               )["posterior"]["latent_fairness"]
    assert abs(post["mean"] - EXACT_MEAN) < 0.01
    assert abs(post["std"] - EXACT_STD) < 0.005
    assert post["method"] == "analytic"


def test_per_param_rule_really_changes_the_named_parameter(tmp_path: Path):
    start = math.log(15.0)
    plain = fit(tmp_path, "train.steps=300")["params"]
    frozen = fit(tmp_path, "train.steps=300", "optimizer.optim_args=per_param",
                 "optimizer.optim_args.rules.log_alpha_q.lr=0")["params"]
    assert frozen["log_alpha_q"] == pytest.approx(start, abs=1e-7)  # lr 0: never moves
    assert plain["log_alpha_q"] != pytest.approx(start, abs=1e-3)
    assert frozen["log_beta_q"] != pytest.approx(start, abs=1e-3)  # the other still learns

    run = setup("optimizer.optim_args=per_param", "optimizer.optim_args.rules.log_beta_q.lr=0.01")
    assert learning_rate(run, "log_beta_q") == 0.01
    assert learning_rate(run, "log_alpha_q") == 0.0005


def learning_rate(run: Run, param: str) -> float:
    """The learning rate of the torch optimizer that steps one parameter."""
    import pyro

    for tensor, optimizer in run.svi.optim.optim_objs.items():
        if pyro.get_param_store().param_name(tensor) == param:
            return optimizer.param_groups[0]["lr"]
    raise KeyError(param)


def test_glob_rules_match_several_parameters(tmp_path: Path):
    params = fit(tmp_path, "train.steps=50", "optimizer.optim_args=per_param",
                 "optimizer.optim_args.rules={'log_*_q': {lr: 0}}")["params"]
    assert params == {"log_alpha_q": pytest.approx(math.log(15.0)),
                      "log_beta_q": pytest.approx(math.log(15.0))}


def test_a_non_finite_loss_stops_the_run_with_exit_1_and_keeps_the_results(tmp_path: Path):
    out = tmp_path / "r"
    result = vibench("run", str(COIN), "--set", "optimizer.lr=1e30", "--steps", "200",
                     "--out", str(out))
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: step ")
    assert "Traceback" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["steps"] < 200


def test_run_error_is_raised_in_process(tmp_path: Path):
    with pytest.raises(RunError, match="step 2 failed: .* the last good checkpoint is in"):
        fit(tmp_path, "optimizer.lr=1e30", "train.steps=200")


@pytest.mark.slow
def test_iterate_averaging_brings_the_seed_within_a_thousandth(tmp_path: Path):
    """Polyak-Ruppert averaging over the last half: with the seed's settings, 8 seeds land on
    average within 0.001 of 16/30 (plain Adam: about 0.0022 here). Compiled, as the compiled
    step draws eager's random numbers (tests/test_compile.py) at a tenth of the time."""
    errors = []
    for seed in range(8):
        summary = fit(tmp_path, f"seed={seed}", "train.average_last=0.5", "train.eval_every=0",
                      "train.compile=true",
                      "train.plots=false", "train.diagnostics=false", "loggers=[]",
                      "train.log_params_every=0", "train.checkpoint_every=0")
        assert summary["averaged_steps"] == 2000
        errors.append(abs(summary["posterior"]["latent_fairness"]["mean"] - EXACT_MEAN))
    assert sum(errors) / len(errors) < 0.001, errors


def test_early_stopping_when_the_smoothed_loss_stops_improving(tmp_path: Path):
    summary = fit(tmp_path, "optimizer.lr=0.05", "train.steps=20000",
                  "train.early_stop_patience=300", "train.early_stop_window=100",
                  "train.early_stop_min_delta=0.01")
    assert summary["stopped_early"] == summary["steps"] < 20000
    assert summary["status"] == "completed"
    assert abs(summary["posterior"]["latent_fairness"]["mean"] - EXACT_MEAN) < 0.03
    never = fit(tmp_path, "train.steps=50")
    assert never["stopped_early"] is None


def test_optimizers_are_made_saved_and_loaded_without_importing_dynamo():
    """``make_optimizers`` and ``optimizer_state`` leave torch._dynamo unimported (a second
    of every compiled run) and torch's guard as it was; the state is torch's own, and it loads
    back into optimizers made afresh."""
    probe = """
import sys, torch, pyro
from pyro.optim import Adam
from workbench.train.optim import make_optimizers, optimizer_state
param = pyro.param("w", torch.zeros(3)).unconstrained()
optim = Adam({"lr": 0.1})
make_optimizers(optim, [param])
print("made", sorted(optimizer_state(optim)["w"]), "torch._dynamo" in sys.modules, any(
    hasattr(getattr(torch.optim.Optimizer, name).__wrapped__, "__dynamo_disable")
    for name in ("add_param_group", "state_dict", "load_state_dict")))
param.grad = torch.ones(3)
optim([param])
fresh = Adam({"lr": 0.1})
fresh.set_state(optimizer_state(optim))
make_optimizers(fresh, [param])
print("loaded", float(fresh.optim_objs[param].state[param]["step"]))
"""
    done = python(probe)
    assert done.stdout.splitlines() == ["made ['param_groups', 'state'] False False",
                                        "loaded 1.0"], done.stderr


def test_callback_states_are_kept_apart_by_their_state_keys():
    from workbench.train.callbacks import Callback, restore, states

    class Counter(Callback):
        def __init__(self, key: str):
            self.key, self.count = key, 0

        @property
        def state_key(self) -> str:
            return f"Counter[{self.key}]"

        def state_dict(self) -> dict:
            return {"count": self.count}

        def load_state_dict(self, state: dict | None) -> None:
            self.count = (state or {}).get("count", 0)

    first, second = Counter("a"), Counter("b")
    first.count, second.count = 3, 5
    saved = states([first, second])
    again = [Counter("a"), Counter("b")]
    restore(again, saved)
    assert [c.count for c in again] == [3, 5]
    with pytest.raises(ValueError, match="share the state key"):
        states([Counter("a"), Counter("a")])
