"""Shared helpers: run the real ``vibench`` command in a child process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Tests run two at a time (pytest-xdist): one thread each keeps them from fighting over the
# cores, in this process and in every vibench child it starts. Results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The suite trains on the CPU, where the device is not the point, so a GPU machine runs it in
# the same time and with the same random streams; tests/test_gpu.py gives the GPU back to the
# vibench children it starts (``vibench(..., gpu=True)``).
# The machine's own setting is kept for pytest-xdist's workers, which inherit the hidden one.
os.environ.setdefault("VIBENCH_TEST_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
GPU_DEVICES = None if os.environ["VIBENCH_TEST_GPUS"] == "<unset>" else \
    os.environ["VIBENCH_TEST_GPUS"]
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Runs are eager unless a test asks for train.compile (tests/test_compile.py does): a fresh CI
# machine meets a cold compile cache, tens of seconds per graph, which would be most of the
# suite's time. The eager step is the reference every compiled one is tested against.
os.environ["VIBENCH_COMPILE"] = "false"

REPO = Path(__file__).resolve().parent.parent
COIN = REPO / "recipes" / "coin.yaml"


def vibench(*args: str, cwd: Path = REPO, env: dict | None = None, timeout: float = 300,
            gpu: bool = False) -> subprocess.CompletedProcess:
    """Run ``vibench ARGS`` as a user would, in a child process, capturing its output; with
    ``gpu``, the child sees the machine's GPUs."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("VIBENCH_DEBUG", None)
    if gpu:
        full_env.pop("CUDA_VISIBLE_DEVICES")
        if GPU_DEVICES is not None:
            full_env["CUDA_VISIBLE_DEVICES"] = GPU_DEVICES
    return subprocess.run(
        [sys.executable, "-m", "workbench", *args],
        cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


@pytest.fixture
def run_vibench():
    return vibench


def start(recipe: Path, out: Path, *args: str) -> subprocess.Popen:
    """``vibench run RECIPE ARGS --out OUT`` started in a child process, not waited for."""
    return subprocess.Popen([sys.executable, "-m", "workbench", "run", str(recipe), *args,
                             "--out", str(out)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def checkpointed_step(out: Path) -> int:
    """The step of the run directory's checkpoint, read as --resume reads it."""
    import torch

    return torch.load(out / "checkpoint.pt", weights_only=True)["state"]["step"]


def wait_for_checkpoint(out: Path, past: int, child: subprocess.Popen | None = None,
                        timeout: float = 120) -> None:
    """Wait until the run has checkpointed a step after ``past`` (the child still running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if checkpointed_step(out) > past:
                return
        except (FileNotFoundError, EOFError, RuntimeError):
            pass
        assert child is None or child.poll() is None, child.communicate()
        time.sleep(0.01)
    raise AssertionError("no checkpoint appeared")


@pytest.fixture
def float64():
    """torch's default dtype float64 for one test, with an empty Pyro parameter store."""
    import pyro
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    pyro.clear_param_store()
    yield
    torch.set_default_dtype(previous)
    pyro.clear_param_store()
