"""Models whose posterior is a Gaussian known in closed form, with their data: what the
estimator, Laplace and Pathfinder tests measure a guide against."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

GAUSSIAN = ["auto_normal", "auto_diagonal_normal", "auto_multivariate_normal",
            "auto_lowrank_multivariate_normal"]
DESIGN = [[1.0, 0.9], [0.8, 1.0], [1.0, 1.1], [0.9, 0.7], [1.2, 1.0]]


def independent(y):
    """Two Normal means with unit-variance observations: the posterior is a diagonal Gaussian."""
    mu = pyro.sample("mu", dist.Normal(torch.zeros(2), 1.0).to_event(1))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(mu, 1.0).to_event(1), obs=y)


def regression(y):
    """A regression on two correlated columns: the posterior is a correlated Gaussian."""
    design = torch.tensor(DESIGN)
    first = pyro.sample("first", dist.Normal(0.0, 1.0))
    second = pyro.sample("second", dist.Normal(0.0, 1.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(first * design[:, 0] + second * design[:, 1], 0.5), obs=y)


def regression_posterior(y) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact posterior of ``regression`` given ``y``: its mean and covariance."""
    design = torch.tensor(DESIGN)
    covariance = torch.linalg.inv(torch.eye(2) + design.T @ design / 0.25)
    return covariance @ design.T @ y / 0.25, covariance


def data_for(model) -> dict:
    """The data the tests give ``model``, the same each time."""
    torch.manual_seed(0)
    if model is independent:
        return {"y": torch.randn(6, 2) + torch.tensor([1.0, -1.0])}
    return {"y": torch.tensor(DESIGN) @ torch.tensor([0.5, -0.3]) + 0.5 * torch.randn(5)}
