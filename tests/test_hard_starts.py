"""The automatic pipeline's Laplace start at a degenerate mode (plugins/laplace.py
``degenerate``): a centred hierarchical model's density grows without bound as its scale
tau -> 0, so the mode search runs to tau's edge; the pipeline must see that, start its fits
elsewhere, say why in the gaussian stage's line, and still fit."""

from __future__ import annotations

from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
import yaml

from workbench import service
from workbench.plugins.registry import get_registry


def centred(y):
    """Five groups' means, centred: alpha ~ Normal(mu, tau), one noisy observation each."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
    tau = pyro.sample("tau", dist.HalfNormal(torch.tensor(1.0)))
    with pyro.plate("groups", 5):
        alpha = pyro.sample("alpha", dist.Normal(mu[..., None], tau[..., None]))
        pyro.sample("y", dist.Normal(alpha, 1.0), obs=y)


def test_a_degenerate_laplace_start_is_seen_and_the_fits_start_elsewhere(tmp_path: Path):
    recipe = {
        "model": {"name": f"{Path(__file__).resolve()}:centred"},
        "data": {"y": [0.3, -0.2, 0.5, 0.1, -0.4]},
        "loggers": [], "train": {"plots": False, "eval_every": 0},
        "auto": {"stages": ["start", {"name": "gaussian", "runs": 2, "lr": 0.01,
                                      "max_steps": 20}, "rhat", "psis"]}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    job = service.start(path, [], tmp_path / "run", get_registry())
    summary = job.train()
    said = {stage["stage"]: stage["said"] for stage in summary["auto"]["stages"]}
    assert "gaussian-1's Laplace start: no mode" in said["gaussian"]
    assert "tau's support" in said["gaussian"] and "init_loc start" in said["gaussian"]
    assert [fit["ok"] for fit in summary["auto"]["fits"]] == [True, True]
    assert summary["posterior"]["tau"]["mean"] > 0.05  # not the neck the search ran into
