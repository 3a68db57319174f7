"""The Laplace start (plugins/laplace.py) where the density misbehaves: a centred hierarchical
model's density grows without bound as its scale tau -> 0, so the mode search runs to tau's
edge, and in float32 the density there is NaN (tau^2 underflows). The start must survive a
NaN, see a degenerate mode, start the fits elsewhere and say why in the gaussian stage's line."""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import yaml

from tests.helpers import python
from workbench import service
from workbench.plugins.registry import get_registry


def centred(y):
    """Five groups' means, centred: alpha ~ Normal(mu, tau), one noisy observation each."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0)))
    with pyro.plate("groups", 5):
        alpha = pyro.sample("alpha", dist.Normal(mu, tau))
        pyro.sample("y", dist.Normal(alpha, 1.0), obs=y)


def walled():
    """x's posterior is about N(-0.495, 0.0995), but the log density is NaN below x = -0.9
    (a scale whose square underflows, as a funnel's neck in float32), where L-BFGS's first
    trial step lands."""
    x = pyro.sample("x", dist.Normal(torch.tensor(0.0), 1.0))
    pyro.sample("y", dist.Normal(x, 0.1), obs=torch.tensor(-0.5))
    scale = torch.where(x > -0.9, 1.0, 1e-30)
    pyro.sample("pin", dist.Normal(0.0, scale), obs=torch.tensor(0.0))


def run(tmp_path: Path, recipe: dict) -> dict:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"loggers": [], "train": {"plots": False, "eval_every": 0},
                                    **recipe}))
    return service.start(path, [], tmp_path / "run", get_registry()).train()


@pytest.mark.filterwarnings("ignore:Encountered NaN")  # the density is NaN there, by design
def test_a_laplace_start_that_meets_a_nan_density_still_finds_the_mode(tmp_path: Path):
    summary = run(tmp_path, {
        "model": {"name": f"{Path(__file__).resolve()}:walled"},
        "guide": {"name": "auto_gaussian_flow", "init": "laplace", "num_transforms": 0},
        "loss": {"name": "elbo"}, "optimizer": {"name": "adam", "lr": 0.001},
        "train": {"steps": 3, "plots": False, "eval_every": 0}})
    assert abs(summary["posterior"]["x"]["mean"] + 0.495) < 0.05


def test_a_degenerate_laplace_start_is_seen_and_the_fits_start_elsewhere(tmp_path: Path):
    recipe = {
        "model": {"name": f"{Path(__file__).resolve()}:centred"},
        "data": {"y": [0.3, -0.2, 0.5, 0.1, -0.4]},
        "auto": {"stages": ["start", {"name": "gaussian", "runs": 2, "lr": 0.01,
                                      "max_steps": 20, "reparam": "none"}, "rhat", "psis"]}}
    summary = run(tmp_path, recipe)
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert "gaussian-1's Laplace start: no mode" in said["gaussian"]
    assert "tau's support" in said["gaussian"] and "init_loc start" in said["gaussian"]
    assert [fit["ok"] for fit in summary["auto"]["fits"]] == [True, True]
    assert summary["posterior"]["tau"]["mean"] > 0.05  # not the neck the search ran into


def centred_laplace_start():
    """``centred`` on five observations set up with a Laplace start, not yet trained."""
    from tests.helpers import setup

    return setup(source={
        "model": {"name": f"{Path(__file__).resolve()}:centred"},
        "data": {"y": [0.3, -0.2, 0.5, 0.1, -0.4]},
        "guide": {"name": "auto_gaussian_flow", "init": "laplace", "num_transforms": 0},
        "loss": {"name": "elbo"}, "optimizer": {"name": "adam", "lr": 0.01},
        "train": {"steps": 1}})


def test_no_restart_follows_a_descent_into_the_neck(monkeypatch):
    """A descent that ran to tau's edge shows a density without a mode: restarts from random
    points would only run into the neck again (seconds on a larger model), so none is made."""
    from vibench_plugins import laplace

    fits = []

    def descend(*args):
        fits.append(real(*args))
        return fits[-1]

    real = laplace.descend
    monkeypatch.setattr(laplace, "descend", descend)
    run = centred_laplace_start()
    assert "no mode: the search ran to the edge of tau's support" in " ".join(run.notes)
    sites = laplace.layout(run.guide)
    assert laplace.degenerate(fits[-1], sites)
    assert not any(laplace.degenerate(fit, sites) for fit in fits[:-1])


def test_a_descent_whose_line_searches_keep_failing_stops(monkeypatch):
    """Into the neck L-BFGS's line searches fail one after another (up to 25 evaluations
    each); the descent stops once its evaluations far outrun its iterations, at the lowest
    point it evaluated: here the same edge of tau's support, for a quarter of the 626
    evaluations L-BFGS would spend."""
    from vibench_plugins import laplace

    calls = []
    real = laplace.potential_fn

    def counted(*args, **kwargs):
        potential = real(*args, **kwargs)
        return lambda point: calls.append(1) or potential(point)

    monkeypatch.setattr(laplace, "potential_fn", counted)
    run = centred_laplace_start()
    assert "no mode: the search ran to the edge of tau's support" in " ".join(run.notes)
    assert len(calls) < 2 * laplace.STALL_EVALS + laplace.MAX_ITER // 2, len(calls)


class _ScaledSquare(torch.autograd.Function):
    """x^2 * s, whose backward reads a value in Python: vmap cannot batch it."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x ** 2 * 1.5

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * x * (3.0 if float(grad.detach().sum()) == float(grad.detach().sum()) else 0.0)


@pytest.mark.parametrize("batchable", [True, False])
@pytest.mark.parametrize("long", [True, False])
def test_the_laplace_hessian_is_the_one_a_row_at_a_time_gives(batchable: bool, long: bool,
                                                               monkeypatch):
    """Batched (one double backward over the basis vectors) for a long potential where vmap
    can, else a row at a time, the same matrix either way."""
    from vibench_plugins import laplace

    monkeypatch.setattr(laplace, "BATCHED_FROM", 0 if long else 10**9)
    weights = torch.tensor([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2], [0.1, -0.2, 0.5]])

    def potential(z: torch.Tensor) -> torch.Tensor:
        square = z ** 2 * 1.5 if batchable else _ScaledSquare.apply(z)
        return z @ weights @ z / 2 + torch.exp(z).sum() + square.sum() * z[0]

    point = torch.tensor([0.2, -0.4, 0.7])
    want = torch.autograd.functional.hessian(potential, point)
    assert torch.allclose(laplace._hessian(potential, point), (want + want.T) / 2,
                          rtol=1e-6, atol=1e-6)


def test_a_short_potential_s_hessian_leaves_sympy_unimported():
    """A batched Hessian imports sympy (0.25 s); a potential of a few operations, whose rows
    cost less than that, takes them one at a time (a fresh process, whose imports are its
    own)."""
    code = ("import sys, torch\n"
            "from vibench_plugins import laplace\n"
            "hessian = laplace._hessian(lambda z: (z ** 3).sum() + z[0] * z[1], torch.ones(3))\n"
            "assert hessian[0, 1] == 1 and hessian[0, 0] == 6, hessian\n"
            "print('sympy' in sys.modules)\n")
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
