"""The private corners of torch and Pyro that workbench/seams.py holds, each checked against
the versions installed: checked on torch 2.13.0 (CPU) with Pyro 1.9.2."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading

import pyro.optim
import pytest
import torch

from tests.helpers import python
from workbench.seams import torch_optimizer


def test_torch_optimizer_unwraps_a_schedule():
    param = torch.zeros(2, requires_grad=True)
    plain = torch.optim.Adam([param])
    assert torch_optimizer(plain) is plain
    schedule = pyro.optim.ExponentialLR({"optimizer": torch.optim.Adam,
                                        "optim_args": {"lr": 0.1}, "gamma": 0.9})
    schedule([param])
    (wrapped,) = schedule.optim_objs.values()
    assert isinstance(torch_optimizer(wrapped), torch.optim.Adam)


def test_optimizers_are_made_and_saved_without_importing_dynamo():
    probe = ("import sys, torch\n"
             "from workbench.seams import no_dynamo_import\n"
             "p = torch.zeros(2, requires_grad=True)\n"
             "with no_dynamo_import():\n"
             "    o = torch.optim.Adam([p]); o.load_state_dict(o.state_dict())\n"
             "print('torch._dynamo' in sys.modules)")
    done = python(probe)
    assert done.stdout.strip() == "False", done.stderr



def test_shapes_broadcast_without_sympy_as_torch_broadcasts_them():
    """A transform's ``inverse_shape`` (``torch.broadcast_shapes``) imports sympy where torch's
    own function runs, and not once the seam is in; the seam's shapes are torch's, and a
    mismatch is torch's own error."""
    probe = ("import sys, torch\n"
             "from torch.distributions import AffineTransform\n"
             "from workbench import seams\n"
             "if sys.argv[1] == 'seam':\n"
             "    seams.broadcast_shapes_without_sympy()\n"
             "AffineTransform(torch.zeros(1), torch.ones(1)).inverse_shape(torch.Size([3]))\n"
             "print('sympy' in sys.modules)")
    for how, imported in (("torch", "True"), ("seam", "False")):
        done = subprocess.run([sys.executable, "-c", probe, how], capture_output=True,
                              text=True, timeout=120)
        assert done.stdout.strip() == imported, (how, done.stderr)
    from workbench import seams

    original = torch.broadcast_shapes
    cases = [((2,), (3, 1), (1, 1, 1)), ((), (4,)), (5, (2, 1)), ([3, 1], torch.Size([1, 4])),
             (torch.Size([]),), ((0, 1), (1, 3))]
    expected = [original(*shapes) for shapes in cases]
    try:
        seams.broadcast_shapes_without_sympy()
        assert [torch.broadcast_shapes(*shapes) for shapes in cases] == expected
        with pytest.raises(RuntimeError) as mismatch:
            torch.broadcast_shapes((2, 3), (4, 3))
        with pytest.raises(RuntimeError) as theirs:
            original((2, 3), (4, 3))
        assert str(mismatch.value) == str(theirs.value)
    finally:
        torch.broadcast_shapes = original


def test_an_eager_step_leaves_dynamo_unimported_and_equals_pyros_own():
    """``step_optimizers`` steps beneath torch's graph-break guard: bit for bit Pyro's step,
    for plain, momentum, scheduled and clipped optimizers, and with no schedule warning."""
    probe = """
import sys, warnings, torch, pyro.optim
from workbench.train.optim import step_optimizers
warnings.simplefilter("error")

def run(step):
    found = []
    for optim in [pyro.optim.Adam({"lr": 0.1}), pyro.optim.SGD({"lr": 0.1, "momentum": 0.9}),
                  pyro.optim.ExponentialLR({"optimizer": torch.optim.AdamW,
                                            "optim_args": {"lr": 0.1}, "gamma": 0.9}),
                  pyro.optim.ClippedAdam({"lr": 0.1, "clip_norm": 0.5})]:
        param = torch.linspace(-1, 1, 4).requires_grad_()
        for k in range(3):
            param.grad = 3 * torch.sin(param.detach() * (k + 1))
            step(optim, [param])
            if isinstance(optim, pyro.optim.PyroLRScheduler):
                optim.step()
        found.append(param.detach())
    return found

mine = run(step_optimizers)
print("dynamo", "torch._dynamo" in sys.modules)
theirs = run(lambda optim, params: optim(params))
print("equal", all(torch.equal(a, b) for a, b in zip(mine, theirs)), len(mine))
"""
    done = python(probe)
    assert done.stdout.splitlines() == ["dynamo False", "equal True 4"], done.stderr


def test_the_vector_isa_probe_runs_in_a_thread_and_every_pick_waits_for_it(monkeypatch):
    from torch._inductor import cpu_vec_isa

    from workbench.seams import vector_isa_probed_beside

    started, release, callers = threading.Event(), threading.Event(), []
    avx2 = cpu_vec_isa.VecAVX2()

    def probe() -> list:  # inductor's probe, held until released
        callers.append(threading.current_thread().name)
        started.set()
        release.wait(30)
        return [avx2]

    monkeypatch.setattr(cpu_vec_isa, "valid_vec_isa_list", functools.cache(probe))
    with vector_isa_probed_beside():
        assert started.wait(30)  # it began before anyone asked
        threading.Timer(0.2, release.set).start()
        assert cpu_vec_isa.pick_vec_isa() is avx2  # inductor's pick waits for the thread's list
    assert callers == ["vibench-vector-isa-probe"]
    assert cpu_vec_isa.valid_vec_isa_list.__wrapped__ is probe  # put back as it was
