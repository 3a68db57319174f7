"""The private corners of torch and Pyro that workbench/seams.py holds, each checked against
the versions installed: checked on torch 2.13.0 (CPU) with Pyro 1.9.2."""

from __future__ import annotations

import pyro.optim
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
