"""train.compile's bound on a step's size: a model whose Python loop unrolls into a long step
is not compiled whole under ``auto``. Where its eager steps cost more than tracing it, its
repeated blocks are rolled (tests/test_rolling.py); else it stays eager, with one line,
decided before anything is traced. ``true`` compiles it anyway and says it may take long.
The bound is lowered here (VIBENCH_COMPILE_MAX_OPS) so that a short loop stands for a long
one."""

from __future__ import annotations

import re

import pyro
import pyro.distributions as dist
import pytest
import torch

from tests.helpers import fitted, setup
from workbench.compile import compiled_step
from workbench.errors import UsageError

BOUND = "VIBENCH_COMPILE_MAX_OPS"


def walk(y):
    """A random walk with drift, its recursion a Python loop over the observations."""
    drift = pyro.sample("drift", dist.Normal(torch.tensor(0.0), 1.0))
    level, levels = torch.zeros_like(drift), []
    for _ in range(y.shape[0]):
        level = level + drift
        levels.append(level)
    pyro.sample("y", dist.Normal(torch.stack(levels, -1), 1.0).to_event(1), obs=y)


def walk_recipe(length: int, steps: int = 100000) -> dict:
    return {"name": "walk", "data": {"y": [0.5 * (t + 1) for t in range(length)]},
            "model": {"name": f"{__name__}:walk"}, "guide": {"name": "auto_normal"},
            "loss": {"name": "elbo"}, "optimizer": {"name": "adam", "lr": 0.01},
            "train": {"steps": steps, "eval_every": 0}}


class Traced(Exception):
    """Raised where the step would be traced."""


@pytest.fixture
def no_tracing(monkeypatch):
    """Tracing a step raises Traced, so a note says whether set-up got that far."""
    def refuse(*args, **kwargs):
        raise Traced("traced")

    monkeypatch.setattr(compiled_step, "_make_fx", refuse)


def compile_notes(run) -> list[str]:
    return [note for note in run.notes if "compiled" in note]


def operations(note: str) -> int:
    return int(re.search(r"one step runs (\d+) torch operations", note)[1])


def test_auto_leaves_a_long_loop_eager_in_one_line_before_tracing(monkeypatch, no_tracing):
    monkeypatch.setenv(BOUND, "0")
    short, long = (compile_notes(setup("train.compile=auto", source=walk_recipe(n, 10000)))
                   for n in (3, 30))
    assert len(short) == len(long) == 1
    ops = operations(long[0])
    assert long[0] == (
        f"training eagerly, not compiled: one step runs {ops} torch operations (a loop "
        f"unrolled?), above the 0 that train.compile: auto compiles ({BOUND} sets it; "
        "train.compile: true compiles anyway)")
    assert ops > operations(short[0]) + 27  # each turn of the loop is an operation or more
    # at the bound auto goes on to trace the step; above it, so it does where the eager
    # steps cost more than tracing the step and compiling its repeated blocks
    for bound, steps in ((ops, 10000), (0, 10**6)):
        monkeypatch.setenv(BOUND, str(bound))
        assert compile_notes(setup("train.compile=auto", source=walk_recipe(30, steps))) == [
            "training eagerly, not compiled: tracing failed: traced"]


def test_true_compiles_above_the_bound_saying_it_may_take_long(monkeypatch, no_tracing,
                                                              capsys):
    monkeypatch.setenv(BOUND, "0")
    with pytest.raises(UsageError, match="cannot be compiled: tracing failed: traced"):
        setup("train.compile=true", source=walk_recipe(30))
    said = [line for line in capsys.readouterr().err.splitlines()
            if line.startswith("compiling the step")]
    assert len(said) == 1 and "above the 0 auto compiles, it may take many minutes" in said[0]


def test_a_run_the_bound_leaves_eager_is_bitwise_the_eager_run(monkeypatch):
    monkeypatch.setenv(BOUND, "0")
    fits = []
    for setting in ("auto", "false"):
        run = setup(f"train.compile={setting}", source=walk_recipe(10, 10000))
        assert run.compiled is None
        for _ in range(3):
            run.step()
        fits.append(fitted())
    assert fits[0].keys() == fits[1].keys()
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])


@pytest.mark.parametrize("value", ["many", "-1", "1.5"])
def test_a_bound_that_is_not_a_count_is_one_line(monkeypatch, value: str):
    monkeypatch.setenv(BOUND, value)
    with pytest.raises(UsageError) as caught:
        setup("train.compile=auto")
    assert str(caught.value) == (f"{BOUND}={value!r}: expected a whole number of operations "
                                 f"(default {compiled_step.MAX_OPS})")
