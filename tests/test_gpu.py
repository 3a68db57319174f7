"""The GPU path, where a GPU is at hand (skipped elsewhere): the coin with its PSIS report, a
checkpointed run killed and resumed, a minibatch run and float64, all on CUDA, in real child
processes that see the GPU (the rest of the suite hides it). Tolerances come from the
posterior's sd, since CUDA's random stream is not the CPU's."""

from __future__ import annotations

import functools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import COIN, GPU_DEVICES, REPO, vibench

EXACT_MEAN, EXACT_STD = 16 / 30, math.sqrt(16 * 14 / (30**2 * 31))


@functools.cache
def cuda_here() -> bool:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if GPU_DEVICES is not None:
        env["CUDA_VISIBLE_DEVICES"] = GPU_DEVICES
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           env=env, capture_output=True, text=True)
    return probe.stdout.strip() == "True"


pytestmark = pytest.mark.skipif("not cuda_here()", reason="no CUDA here")


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def test_the_coin_and_its_psis_report_on_cuda(tmp_path: Path):
    out = tmp_path / "r"
    result = vibench("run", str(COIN), "--device", "cuda", "--steps", "1500",
                     "--set", "optimizer.lr=0.01", "--out", str(out), gpu=True)
    assert result.returncode == 0, result.stderr
    done = summary(out)
    assert done["device"] == "cuda:0" and done["steps"] == 1500
    assert done["diagnostics"]["khat"] is not None, done["diagnostics"]
    post = done["posterior"]["latent_fairness"]
    assert abs(post["mean"] - EXACT_MEAN) < 0.25 * EXACT_STD
    assert abs(post["std"] - EXACT_STD) < 0.25 * EXACT_STD
    assert (out / "plots" / "site-latent_fairness.png").is_file()


def test_a_checkpointed_run_killed_and_resumed_on_cuda(tmp_path: Path):
    args = ["--device", "cuda", "--steps", "400", "--set", "guide=auto_multivariate_normal",
            "--set", "train.checkpoint_every=10", "--set", "optimizer.lr=0.01"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert vibench("run", str(COIN), *args, "--out", str(whole), gpu=True).returncode == 0
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    if GPU_DEVICES is not None:
        env["CUDA_VISIBLE_DEVICES"] = GPU_DEVICES
    child = subprocess.Popen([sys.executable, "-m", "workbench", "run", str(COIN), *args,
                              "--out", str(killed)], cwd=REPO, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if torch.load(killed / "checkpoint.pt", weights_only=True,
                          map_location="cpu")["state"]["step"] > 20:
                break
        except (FileNotFoundError, EOFError, RuntimeError):
            time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    resumed = vibench("run", "--resume", str(killed), gpu=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = summary(whole), summary(killed)
    assert a["steps"] == b["steps"] == 400 and b["device"] == "cuda:0"
    for name, value in a["params"].items():
        assert torch.allclose(torch.tensor(value), torch.tensor(b["params"][name]),
                              rtol=1e-5, atol=1e-6), name


def test_minibatch_and_float64_on_cuda(tmp_path: Path):
    recipe = REPO / "recipes" / "logistic_regression.yaml"
    for extra in (["--set", "train.batch_size=64"], ["--set", "dtype=float64"]):
        out = tmp_path / extra[-1].replace("=", "-")
        result = vibench("run", str(recipe), "--device", "cuda", "--steps", "300", *extra,
                         "--out", str(out), gpu=True)
        assert result.returncode == 0, result.stderr
        assert summary(out)["status"] == "completed"


def test_the_compiled_coin_on_cuda_reaches_the_exact_posterior_and_resumes(tmp_path: Path):
    """The whole step compiled and captured as a CUDA graph: the exact posterior within a
    quarter of its sd, and a compiled run of 700 steps resumed compiled to 1500 ends where the
    uninterrupted one does (the graph's random draws follow the generator's saved state)."""
    args = ["--device", "cuda", "--set", "train.compile=true", "--set", "optimizer.lr=0.01",
            "--set", "train.checkpoint_every=100"]
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    result = vibench("run", str(COIN), *args, "--steps", "1500", "--out", str(whole),
                     gpu=True)
    assert result.returncode == 0, result.stderr
    done = summary(whole)
    assert done["compiled"] is True and done["device"] == "cuda:0", result.stdout
    post = done["posterior"]["latent_fairness"]
    assert abs(post["mean"] - EXACT_MEAN) < 0.25 * EXACT_STD
    assert abs(post["std"] - EXACT_STD) < 0.25 * EXACT_STD
    first = vibench("run", str(COIN), *args, "--steps", "700", "--out", str(halves), gpu=True)
    assert first.returncode == 0, first.stderr
    resumed = vibench("run", "--resume", str(halves), "--steps", "1500", gpu=True)
    assert resumed.returncode == 0, resumed.stderr
    again = summary(halves)
    assert again["compiled"] is True and again["steps"] == 1500
    for name, value in done["params"].items():
        assert torch.allclose(torch.tensor(value), torch.tensor(again["params"][name]),
                              rtol=1e-4, atol=1e-5), name


def test_a_large_full_batch_regression_compiles_to_the_eager_posterior_on_cuda(tmp_path: Path):
    """200,000 rows: the compiled step reads the rows without gathering them and sums the
    gradient over them in two stages (a GPU-only rewrite); its posterior is the eager run's
    within a fraction of the posterior's sd, and the report's PSIS is sized to the data."""
    recipe = REPO / "recipes" / "logistic_regression.yaml"
    summaries = {}
    for mode in ("false", "true"):
        out = tmp_path / mode
        result = vibench("run", str(recipe), "--device", "cuda", "--steps", "500",
                         "--set", "data.dataset.n=200000", "--set", f"train.compile={mode}",
                         "--out", str(out), gpu=True)
        assert result.returncode == 0, result.stderr
        summaries[mode] = summary(out)
    assert summaries["true"]["compiled"] is True and summaries["false"]["compiled"] is False
    for name in ("intercept", "coefficients"):
        eager, fast = (torch.tensor(summaries[m]["posterior"][name]["mean"])
                       for m in ("false", "true"))
        sd = torch.tensor(summaries["false"]["posterior"][name]["std"])
        assert ((eager - fast).abs() < 0.5 * sd).all(), (name, eager, fast, sd)
    for done in summaries.values():
        assert done["diagnostics"]["khat"] is not None, done["diagnostics"]
        assert done["diagnostics"]["rows"] < 200000, done["diagnostics"]
