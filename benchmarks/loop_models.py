"""Models with Python loops, written as plain Pyro, for benchmarks/loops.py: a predator-prey
ODE solved by RK4, an HMM's forward pass and a GARCH(1, 1) recursion, each a loop over time
steps that tracing unrolls. Each model broadcasts over leading draw dims (``[..., i]``).

The Lotka-Volterra data are synthetic (``lotka_volterra_data``, a fixed seed); the HMM and
GARCH models take the posteriordb development data sets ``pdb_hmm_drive`` and ``pdb_garch11``
(recipes ``loop_recipe``)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch

SUBSTEPS = 10  # RK4 steps between two observation times


def _rk4(deriv, z, dt):
    """One classical Runge-Kutta step of dz/dt = deriv(z)."""
    k1 = deriv(z)
    k2 = deriv(z + dt / 2 * k1)
    k3 = deriv(z + dt / 2 * k2)
    k4 = deriv(z + dt * k3)
    return z + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)


def solve_lotka_volterra(theta, z_init, ts, substeps=SUBSTEPS):
    """Prey and predators at times ``ts`` (``[..., len(ts), 2]``), from ``z_init`` at time 0,
    with rates ``theta`` (alpha, beta, gamma, delta) in the last dim."""
    alpha, beta, gamma, delta = (theta[..., i:i + 1] for i in range(4))

    def deriv(z):
        prey, pred = z[..., 0:1], z[..., 1:2]
        return torch.cat([(alpha - beta * pred) * prey, (delta * prey - gamma) * pred], -1)

    z, last, out = z_init, torch.zeros_like(ts[0]), []
    for k in range(ts.shape[0]):
        dt = (ts[k] - last) / substeps
        for _ in range(substeps):
            z = _rk4(deriv, z, dt)
        out.append(z)
        last = ts[k]
    return torch.stack(out, -2)


def lotka_volterra(ts, y):
    """Hare and lynx counts ``y`` (``[len(ts), 2]``) observed with log-normal noise around
    the Lotka-Volterra solution; log-normal priors on the rates, the start and the noise."""
    like = dict(dtype=y.dtype, device=y.device)
    theta = pyro.sample("theta", dist.LogNormal(
        torch.tensor([0.7, 0.03, 0.7, 0.03], **like).log(), 0.5).to_event(1))
    z_init = pyro.sample("z_init", dist.LogNormal(
        torch.full((2,), math.log(10.0), **like), 1.0).to_event(1))
    sigma = pyro.sample("sigma", dist.LogNormal(torch.full((2,), -1.0, **like), 1.0)
                        .to_event(1))
    z = solve_lotka_volterra(theta, z_init, ts)
    pyro.sample("y", dist.LogNormal(z.clamp(min=1e-6).log(), sigma.unsqueeze(-2))
                .to_event(2), obs=y)


def lotka_volterra_data(times=20, seed=0):
    """Synthetic observations at times 1, 2, ..., ``times`` from known values (a fixed seed):
    ``{"ts": [...], "y": [[...], ...]}`` as lists, for a recipe's inline data."""
    generator = torch.Generator().manual_seed(seed)
    theta = torch.tensor([0.55, 0.028, 0.80, 0.024], dtype=torch.float64)
    z_init = torch.tensor([33.0, 6.2], dtype=torch.float64)
    ts = torch.arange(1, times + 1, dtype=torch.float64)
    z = solve_lotka_volterra(theta, z_init, ts, substeps=100)
    noise = torch.randn(z.shape, generator=generator, dtype=torch.float64) * 0.25
    return {"ts": ts.tolist(), "y": (z * noise.exp()).tolist()}


def hmm_forward(u, v, alpha, N=None, K=None):
    """posteriordb's hmm_drive (two states, exponential emissions) with the forward algorithm
    written as a loop over the N observations."""
    theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))
    theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))
    phi = pyro.sample("phi", dist.LogNormal(torch.zeros(2, dtype=u.dtype), 1.0).to_event(1))
    lam = pyro.sample("lambda", dist.LogNormal(torch.zeros(2, dtype=u.dtype), 1.0).to_event(1))
    emission = (phi.log().unsqueeze(-2) - phi.unsqueeze(-2) * u.unsqueeze(-1)
                + lam.log().unsqueeze(-2) - lam.unsqueeze(-2) * v.unsqueeze(-1))
    log_theta = torch.stack([theta1, theta2], dim=-2).log()
    gamma = emission[..., 0, :]
    for t in range(1, u.shape[0]):
        gamma = torch.logsumexp(gamma.unsqueeze(-1) + log_theta, dim=-2) + emission[..., t, :]
    pyro.factor("forward", torch.logsumexp(gamma, dim=-1))


def garch_loop(y, sigma1, T=None):
    """posteriordb's garch11 with its variance recursion written as a loop over T values."""
    mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0, dtype=y.dtype), 10.0))
    alpha0 = pyro.sample("alpha0", dist.LogNormal(torch.tensor(0.0, dtype=y.dtype), 1.0))
    alpha1 = pyro.sample("alpha1", dist.Beta(torch.tensor(1.0, dtype=y.dtype), 1.0))
    beta1 = pyro.sample("beta1_unit", dist.Beta(torch.tensor(1.0, dtype=y.dtype), 1.0)) \
        * (1 - alpha1)
    variance, out = (sigma1 * sigma1).expand(mu.shape), []
    for t in range(y.shape[0]):
        if t:
            variance = alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * variance
        out.append(variance)
    scale = torch.stack(out, -1).sqrt()
    pyro.sample("y", dist.Normal(mu.unsqueeze(-1), scale).to_event(1), obs=y)


def loop_recipe(name: str, steps: int = 1000) -> dict:
    """A recipe (as a dict) fitting one of the models above with a full-rank Gaussian;
    ``lotka_volterra:N`` observes the first N times only (a shorter loop)."""
    here = __file__
    name, _, times = name.partition(":")
    data = {"lotka_volterra": lotka_volterra_data(int(times or 20)),
            "hmm_forward": {"dataset": {"name": "pdb_hmm_drive"}},
            "garch_loop": {"dataset": {"name": "pdb_garch11"}}}[name]
    return {"name": f"loop-{name}{times}", "seed": 0, "data": data,
            "model": {"name": f"{here}:{name}"}, "guide": {"name": "auto_multivariate_normal"},
            "loss": {"name": "elbo", "num_particles": 4},
            "optimizer": {"name": "adam", "lr": 0.01}, "train": {"steps": steps}}
