"""Heavier-tailed proposals for importance sampling, built from Gaussian fits.

A Gaussian guide has lighter tails than a Student-t, banana or latent-GP posterior, so its
importance weights p/q grow without bound in the tails (k-hat > 0.7) and the weighted sd comes
out too small. Two classic remedies, each built from the fits' Gaussians (loc_k, Sigma_k) in
the unconstrained space (``gaussians.bijections``), with no new training:

- ``defensive``: (1 - EPS) q_mix + EPS t_mix (Hesterberg 1995, defensive importance sampling),
  q_mix the fits' equal Gaussian mixture and t_mix the equal mixture of multivariate
  t_NU(loc_k, SCALE^2 Sigma_k): the weights are at most p / ((1 - EPS) q_mix) in the bulk and
  p / (EPS t_mix) in the tails, which a t's polynomial tails keep bounded for any posterior
  whose tails are no heavier;
- ``t``: the equal mixture of t_NU(loc_k, Sigma_k), q's location and scale with t tails.

``proposal_guide`` makes either a guide (Pyro's ``AutoContinuous`` with that distribution as
its latent's), which the report weighs as any guide (``posterior.diagnostics``: PSIS in
float64, the importance-weighted moments and their Monte Carlo error) and ``inference_data``
draws from."""

from __future__ import annotations

from typing import Any

import torch
from pyro.distributions import MultivariateStudentT, TorchDistribution, constraints
from pyro.infer.autoguide import AutoContinuous
from torch.distributions import MultivariateNormal

NU, SCALE, EPS = 4.0, 1.5, 0.3  # the t's degrees of freedom, its widening, the t's share
PROPOSALS = ("defensive", "t")


class Mixture(TorchDistribution):
    """An equal-weight-per-group mixture of D-variate components (Gaussians and t's) with
    the given shares, evaluated in float64; draws in the default dtype."""

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, components: list, shares: list[float]):
        self.components = components
        self.shares = torch.tensor(shares, dtype=torch.float64)
        dim = components[0].event_shape
        super().__init__(torch.Size(), dim, validate_args=False)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        count = shape.numel()
        which = torch.multinomial(self.shares, count, replacement=True)
        picked = torch.empty((count, *self.event_shape), dtype=torch.float64)
        for k, component in enumerate(self.components):  # each draws only its own points
            rows = (which == k).nonzero().squeeze(-1)
            if rows.numel():
                picked[rows] = component.sample((rows.numel(),)).double()
        return picked.reshape(shape + self.event_shape).to(torch.get_default_dtype())

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        value = value.double()
        each = torch.stack([c.log_prob(value) for c in self.components])
        shares = self.shares.log().reshape(-1, *([1] * (each.dim() - 1)))
        return torch.logsumexp(each + shares, 0).to(torch.get_default_dtype())


def proposal(name: str, gaussians: list[tuple[torch.Tensor, torch.Tensor]]) -> Mixture:
    """The ``defensive`` or ``t`` proposal (see the module) of the fits' (loc, scale_tril)."""
    gaussians = [(loc.double(), tril.double()) for loc, tril in gaussians]
    k, nu = len(gaussians), torch.tensor(NU, dtype=torch.float64)
    normals = [MultivariateNormal(loc, scale_tril=tril) for loc, tril in gaussians]
    if name == "t":
        return Mixture([MultivariateStudentT(nu, loc, tril) for loc, tril in gaussians],
                       [1 / k] * k)
    if name != "defensive":
        raise ValueError(f"no proposal {name!r}: {', '.join(PROPOSALS)}")
    wide = [MultivariateStudentT(nu, loc, SCALE * tril) for loc, tril in gaussians]
    return Mixture(normals + wide, [(1 - EPS) / k] * k + [EPS / k] * k)


def described(name: str, count: int) -> str:
    """The proposal in words, for the pipeline's estimates line."""
    if name == "t":
        return f"the equal mixture of {count} fits' Gaussians with t_{NU:g} tails"
    return (f"a defensive mixture of {count} fits' Gaussians ({1 - EPS:.0%}) and t_{NU:g} "
            f"widened {SCALE:g} times ({EPS:.0%})")


class ProposalGuide(AutoContinuous):
    """A guide whose unconstrained latent is drawn from a fixed ``Mixture``: Pyro's
    ``AutoContinuous`` lays it out over the model's latent sites with their Jacobians, in
    the order ``gaussians.bijections`` and the fits' Gaussians use."""

    def __init__(self, model: Any, mixture: Mixture):
        super().__init__(model)
        self._mixture = mixture

    def get_posterior(self, *args: Any, **kwargs: Any) -> Mixture:
        return self._mixture

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple:
        raise NotImplementedError("a proposal has no single location and scale")


def proposal_guide(model: Any, name: str, gaussians: list[tuple]) -> ProposalGuide:
    """The guide of proposal ``name`` built from the fits' Gaussians, over ``model``."""
    return ProposalGuide(model, proposal(name, gaussians))
