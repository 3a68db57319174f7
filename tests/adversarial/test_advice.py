"""A failed run's advice fits its cause: a full disk is not a step size, nor is a density that
is never finite; and a failed write leaves no temporary file behind."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

from tests.helpers import COIN, REPO, vibench
from workbench.train import checkpoint

MODEL = """\
import pyro
import pyro.distributions as dist


def model(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("rows", len(y)):
        pyro.sample("y", dist.Normal(mu, 1e-300), obs=y)
"""

RECIPE = """\
name: never_finite
dtype: float64
data: {y: [1.0e+308, 2.0]}
model: {name: "model.py:model"}
guide: {name: auto_normal}
loss: {name: elbo}
optimizer: {name: adam, lr: 0.01}
train: {steps: 20, plots: false}
"""


def test_a_density_never_finite_is_not_blamed_on_the_step_size(tmp_path: Path):
    (tmp_path / "model.py").write_text(MODEL)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    failed = vibench("run", str(tmp_path / "recipe.yaml"), "--out", str(tmp_path / "run"))
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    line = next(line for line in failed.stderr.splitlines() if line.startswith("error"))
    assert "no step had a finite loss" in line and "check the data" in line, line
    assert "smaller step size will not help" in line


def _limit_file_size() -> None:
    # Python ignores SIGXFSZ, so a write past the limit is an OSError (EFBIG), as a full disk's
    # ENOSPC is: the losses file (8 bytes a step) hits it mid-training.
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_500, 20_500))  # a checkpoint is ~19,300


def test_no_room_to_write_says_so_and_leaves_no_temporary_file(tmp_path: Path):
    run = tmp_path / "run"
    failed = subprocess.run(
        [sys.executable, "-m", "workbench", "run", str(COIN), "--out", str(run),
         "--steps", "4000", "--set", "train.plots=false", "--set", "loggers=[]",
         "--set", "train.checkpoint_every=100", "--set", "train.eval_every=0",
         "--set", "loss.num_particles=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300, preexec_fn=_limit_file_size)
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    line = next(line for line in failed.stderr.splitlines() if line.startswith("error"))
    assert "cannot write to" in line and "no room left to write" in line, line
    assert "smaller step size" not in line
    assert not [p.name for p in run.iterdir() if p.name.endswith(".tmp")]
    saved = checkpoint.read(run / "checkpoint.pt", "the last checkpoint")
    assert 0 < saved["state"]["step"] < 4000
