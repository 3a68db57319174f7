"""The suite's environment (one thread, no GPU, eager steps) and its fixtures; the functions
tests share are in tests/helpers.py."""

from __future__ import annotations

import os

import pytest

# Tests run two at a time (pytest-xdist): one thread each keeps them from fighting over the
# cores, in this process and in every vibench child it starts. Results do not depend on it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The suite trains on the CPU, where the device is not the point, so a GPU machine runs it in
# the same time and with the same random streams; tests/test_gpu.py gives the GPU back to the
# vibench children it starts (``vibench(..., gpu=True)``).
# The machine's own setting is kept for pytest-xdist's workers, which inherit the hidden one.
os.environ.setdefault("VIBENCH_TEST_GPUS", os.environ.get("CUDA_VISIBLE_DEVICES", "<unset>"))
os.environ["CUDA_VISIBLE_DEVICES"] = ""

# Runs are eager unless a test asks for train.compile (tests/test_compile.py does): a fresh CI
# machine meets a cold compile cache, tens of seconds per graph, which would be most of the
# suite's time. The eager step is the reference every compiled one is tested against.
os.environ["VIBENCH_COMPILE"] = "false"

from tests.helpers import (  # noqa: E402,F401  (also importable from here)
    COIN,
    GPU_DEVICES,
    REPO,
    checkpointed_step,
    start,
    vibench,
    wait_for_checkpoint,
)


@pytest.fixture
def run_vibench():
    return vibench


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
