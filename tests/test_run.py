"""End-to-end runs of the seed's coin experiment through the real ``vibench`` command."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import COIN, EXACT_MEAN, EXACT_STD, FAST, QUICK, fit, vibench

# For runs whose plots and event files no test here reads: the fit is the same without them.
UNSEEN = ("--set", "train.plots=false", "--set", "loggers=[]")


@pytest.fixture(scope="module")
def coin_run(tmp_path_factory) -> tuple[Path, object]:
    """The coin recipe exactly as shipped: 4000 steps, seed 0, its step compiled (the suite's
    default is eager; ``auto`` would train a step no cache holds eagerly): the compiled_coin
    group compiles it once and loads it after."""
    out = tmp_path_factory.mktemp("coin") / "run"
    return out, vibench("run", str(COIN), "--out", str(out), env={"VIBENCH_COMPILE": "true"},
                        child=False)


@pytest.mark.xdist_group("compiled_coin")  # the coin's step, compiled once for the group
def test_coin_reproduces_the_seed(coin_run):
    out, result = coin_run
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    post = summary["posterior"]["latent_fairness"]
    assert abs(post["mean"] - EXACT_MEAN) < 0.01
    assert abs(post["std"] - EXACT_STD) < 0.005
    assert post["exact_mean"] == pytest.approx(EXACT_MEAN, abs=1e-6)
    assert post["exact_std"] == pytest.approx(EXACT_STD, abs=1e-6)
    line = (f"latent_fairness: {post['mean']:.3f} +- {post['std']:.3f} "
            f"(exact {EXACT_MEAN:.3f} +- {EXACT_STD:.3f})")
    assert line in result.stdout.splitlines()


@pytest.mark.xdist_group("compiled_coin")  # the coin's step, compiled once for the group
def test_run_directory_holds_what_the_contract_says(coin_run):
    out, result = coin_run
    assert {"recipe.yaml", "summary.json", "params.pt", "checkpoint.pt"} <= {
        p.name for p in out.iterdir()}
    assert {p.name for p in (out / "plots").iterdir()} == {
        "loss.png", "ppc.png", "site-latent_fairness.png"}
    assert list(out.glob("events.out.tfevents.*"))
    summary = json.loads((out / "summary.json").read_text())
    assert {"recipe", "steps", "wall_seconds", "steps_per_second", "final_loss", "posterior",
            "params"} <= set(summary)
    assert summary["steps"] == 4000
    assert summary["recipe"]["guide"] == {"name": "beta", "init_alpha": 15.0, "init_beta": 15.0}
    assert summary["steps_per_second"] == pytest.approx(4000 / summary["wall_seconds"])
    assert set(summary["params"]) == {"log_alpha_q", "log_beta_q"}
    assert summary["status"] == "completed"
    assert summary["diagnostics"]["reading"] == "good" and summary["diagnostics"]["khat"] < 0.5
    post = summary["posterior"]["latent_fairness"]
    assert post["q05"] < post["q50"] < post["q95"] and post["kl_method"] == "closed_form"
    assert 0 <= post["kl"] < 0.01
    alpha, beta = (math.exp(summary["params"][k]) for k in ("log_alpha_q", "log_beta_q"))
    assert alpha / (alpha + beta) == pytest.approx(summary["posterior"]["latent_fairness"]["mean"])
    assert math.isfinite(summary["final_loss"])
    assert str(out) in result.stdout


@pytest.mark.xdist_group("compiled_coin")  # the coin's step, compiled once for the group
def test_tensorboard_reads_back_loss_eval_and_params(coin_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = coin_run
    events = EventAccumulator(str(out), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags()["scalars"]
    train = events.Scalars("Train/loss")
    assert [e.step for e in train] == list(range(4000))
    assert all(math.isfinite(e.value) for e in train)
    assert [e.step for e in events.Scalars("Eval/loss")] == list(range(99, 4000, 100))
    assert {"Params/log_alpha_q", "Params/log_beta_q"} <= set(tags)
    summary = json.loads((out / "summary.json").read_text())
    last = events.Scalars("Params/log_alpha_q")[-1]
    assert last.value == pytest.approx(summary["params"]["log_alpha_q"], abs=1e-6)


def test_auto_normal_swapped_in_by_set_alone(tmp_path: Path):
    fast = [item for pair in zip(["--set"] * len(FAST), FAST) for item in pair]
    result = vibench("run", str(COIN), "--set", "guide=auto_normal", *UNSEEN, *fast,
                     "--out", str(tmp_path / "r"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["recipe"]["guide"] == {"name": "auto_normal", "init": "init_loc",
                                          "init_scale": 0.1, "init_loc": "feasible"}
    assert abs(summary["posterior"]["latent_fairness"]["mean"] - EXACT_MEAN) < 0.02
    assert summary["posterior"]["latent_fairness"]["method"] == "sampled"


def test_same_recipe_and_seed_give_the_same_numbers(tmp_path: Path):
    """vibench run in a fresh process and the same recipe run again in this one (as
    ``workbench.fit`` runs it, after other runs here) give the same numbers."""
    sets = ["train.steps=200", "train.plots=false", "loggers=[]", "loss.num_particles=3"]
    result = vibench("run", str(COIN), "--seed", "7", *(f"--set={s}" for s in sets),
                     "--out", str(tmp_path / "a"))
    assert result.returncode == 0, result.stderr
    child = json.loads((tmp_path / "a" / "summary.json").read_text())
    here, _ = fit(tmp_path, "seed=7", *sets)
    for key in ("params", "posterior", "final_loss"):
        assert child[key] == here[key], key
    assert child["recipe"] == here["recipe"]
    other, _ = fit(tmp_path, "seed=8", *sets, "train.diagnostics=false")
    assert other["params"] != child["params"]


def test_default_run_directories_never_overwrite(tmp_path: Path, monkeypatch):
    """Without --out, runs go to runs/NAME-TIME in the working directory; two in the same
    second get two directories."""
    from workbench import service
    from workbench.plugins.registry import get_registry

    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        service.start(COIN, ["train.steps=3", *QUICK], None, get_registry()).train()
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(name.startswith("coin-") for name in runs)


def test_out_directory_that_holds_something_is_refused(tmp_path: Path):
    (tmp_path / "keep.txt").write_text("precious")
    result = vibench("run", str(COIN), "--steps", "3", "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --out {tmp_path}: already exists and is not an empty directory"
    ]
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_progress_and_results_go_to_their_streams(tmp_path: Path):
    result = vibench("run", str(COIN), "--steps", "20", *UNSEEN, "--out", str(tmp_path / "r"))
    assert "step 20/20  loss" in result.stderr
    assert not [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert result.stdout.splitlines()[0].startswith("latent_fairness: ")
