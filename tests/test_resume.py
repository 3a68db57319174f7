"""Runs that survive: checkpoints, exact resume after SIGKILL, Ctrl-C, bad steps."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch

from tests.helpers import (
    COIN,
    FLAKY,
    checkpointed_step,
    fit,
    flaky_registry,
    setup,
    vibench,
    wait_for_checkpoint,
)
from tests.helpers import start as start_run
from workbench.errors import RunError
from workbench.train.runner import Run

SETS = ["train.steps=400", "train.checkpoint_every=25", "loss.num_particles=3"]
ARGS = [arg for item in SETS for arg in ("--set", item)]


def start(out: Path, *args: str) -> subprocess.Popen:
    return start_run(COIN, out, *ARGS, *args)


def test_sigkill_then_resume_ends_bitwise_equal_to_an_uninterrupted_run(tmp_path: Path):
    _, whole = fit(tmp_path, *SETS)  # in this process: the same numbers as vibench run

    killed = tmp_path / "killed"
    child = start(killed)
    wait_for_checkpoint(killed, past=50)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    stopped_at = checkpointed_step(killed)
    assert 50 < stopped_at < 400

    resumed = vibench("run", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(whole / "params.pt", weights_only=False)["params"]
    b = torch.load(killed / "params.pt", weights_only=False)["params"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (whole, killed))
    for key in ("params", "posterior", "final_loss", "steps", "recipe", "status"):
        assert sa[key] == sb[key], key

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(killed), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("Train/loss")] == list(range(400))


def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume(tmp_path: Path):
    out = tmp_path / "r"
    child = start(out, "--steps", "100000")
    wait_for_checkpoint(out, past=25)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert f"vibench run --resume {out}" in stderr and "Traceback" not in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert checkpointed_step(out) == summary["steps"]  # saved at the step it stopped
    resumed = vibench("run", "--resume", str(out), "--steps", str(summary["steps"] + 10))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["steps"] == summary["steps"] + 10


def test_resume_refuses_what_it_cannot_do(tmp_path: Path):
    """The command line's own refusals, as the user sees them (one line, exit 2); what the
    service refuses, as the UsageError the CLI prints as that line."""
    from workbench import service
    from workbench.errors import UsageError
    from workbench.plugins.registry import get_registry

    _, done = fit(tmp_path, "train.steps=5", "train.plots=false")
    for args, expected in [
        (["--resume", str(done), "--seed", "3"], "only --steps and --set optimizer.* may change"),
        ([str(COIN), "--resume", str(done)], "give a RECIPE to run, or --resume"),
    ]:
        result = vibench("run", *args)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    for run_dir, expected in [(done, "the run already took all its 5 steps"),
                              (tmp_path, "no checkpoint.pt there")]:
        with pytest.raises(UsageError, match=expected) as refused:
            service.resume(run_dir, [], get_registry())
        assert "\n" not in str(refused.value)


def flaky_run(*sets: str) -> Run:
    registry = flaky_registry()
    for seed in range(50):  # a seed whose dry run draws a good step
        try:
            return setup(*sets, source=FLAKY, registry=registry, seed=seed)
        except Exception:
            continue
    raise AssertionError("no seed gave a good first step")


def test_bad_steps_are_skipped_up_to_the_limit(tmp_path: Path):
    summary = flaky_run("train.skip_bad_steps=1000").train(tmp_path)
    assert summary["status"] == "completed"
    assert 20 < summary["skipped_steps"] < 120
    assert all(torch.isfinite(torch.tensor(v)).all() for v in summary["params"].values())


def test_a_bad_step_stops_the_run_naming_it_and_keeps_a_good_checkpoint(tmp_path: Path):
    with pytest.raises(RunError, match=r"step \d+: the loss is inf; saved in .*--resume"):
        flaky_run().train(tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert all(torch.isfinite(p).all() for p in state["params"].values())
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "failed"


def test_resume_keeps_the_threads_the_run_was_given_and_says_so(tmp_path: Path):
    """--threads is recorded in the checkpoint: the "go on with" line repeats it, and a
    resume without it trains on as many threads as the run had (the suite's default is 1)."""
    out = tmp_path / "r"
    child = start_run(COIN, out, "--steps", "200000", "--threads", "2",
                      "--set", "train.checkpoint_every=50")
    wait_for_checkpoint(out, 50, child)
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert f"go on with: vibench run --resume {out} --threads 2" in stderr
    step = checkpointed_step(out)
    resumed = vibench("run", "--resume", str(out), "--steps", str(step + 20))
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "summary.json").read_text())["threads"] == 2
