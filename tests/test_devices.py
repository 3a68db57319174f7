"""Every device-dependent path makes its tensors on the run's device by construction. Checked
on the CPU with PyTorch's "meta" device as the run's: a tensor made on the wrong device (the
CPU, where the GPU was meant) shows up as a device mismatch or a wrong ``.device``."""

from __future__ import annotations

import math

import pyro
import torch

from workbench.data.minibatch import Minibatch
from workbench.device import run_context
from workbench.report.posterior import psis
from workbench.train import checkpoint
from workbench.train.callbacks import Averaging

META = torch.device("meta")


def test_the_run_context_sets_device_and_dtype_and_puts_them_back():
    with run_context(META, torch.float64):
        made = torch.zeros(3)
        assert made.device == META and made.dtype == torch.float64
    assert torch.zeros(1).device.type == "cpu" and torch.get_default_dtype() == torch.float32


def test_psis_works_on_its_input_device_whatever_the_default():
    log_w = torch.distributions.Normal(0.0, 1.0).sample((2000,), ).double()
    with torch.device("meta"):  # anything psis made without naming a device lands here
        khat, smoothed = psis(log_w)
    assert smoothed.device.type == "cpu" and math.isfinite(khat)


def test_minibatch_indices_are_drawn_on_the_run_device():
    batch = Minibatch("data", size=1000, batch_size=10, device=META)
    batch.resample()
    assert batch.indices.device == META and batch.indices.shape == (10,)


def test_restored_parameters_stay_the_run_s_tensors_on_its_device():
    pyro.clear_param_store()
    live = pyro.param("w", torch.zeros(2, device=META)).unconstrained()
    checkpoint.restore_params({"w": torch.ones(2)}, {}, guide=None, where="test")
    assert pyro.get_param_store().get_param("w").unconstrained() is live
    assert live.device == META
    pyro.clear_param_store()


def test_averages_come_back_on_the_run_device():
    averaging = Averaging(start=0)
    with torch.device("meta"):
        averaging.load_state_dict({"count": 3, "params": {"w": torch.ones(2)}})
    assert averaging.params["w"].device == META


def test_a_checkpoint_loads_onto_the_cpu_for_restoring(tmp_path):
    pyro.clear_param_store()
    pyro.param("w", torch.ones(2))
    params, buffers = checkpoint.params_state(guide=None)
    checkpoint.save(tmp_path, {"recipe": {}, "data_hash": "",
                               "state": {"step": 0, "skipped": 0, "losses": 0, "wall": 0.0},
                               "params": params,
                               "buffers": buffers, "optim": {}, "rng": checkpoint.rng_state()})
    state = checkpoint.load(tmp_path)
    assert state["params"]["w"].device.type == "cpu"
    checkpoint.set_rng_state(state["rng"], "test")
    pyro.clear_param_store()
