"""The Gaussian a guide stands for, the unconstrained space it lives in, and the symmetric
KL divergence between two Gaussians: what ``train.stop: converged`` compares iterate averages
by (Welandawe et al. 2022) and what the automatic pipeline starts its fits from. The space is
each latent site's values taken through the bijection from its support to the real line,
laid side by side in the guide's order: where the Laplace start (plugins/laplace.py) seeks
its mode and where the pipeline's weighed mixture (workbench/auto/answer.py) weighs draws."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.distributions import Transform, biject_to

# With ``diagonal``, guides of more dimensions are compared by their marginals: a full
# comparison is a D x D matrix and a Cholesky factorisation (O(D^3)) at every check.
FULL_UP_TO = 1000


def fitted_gaussian(guide: Any, whole: bool = False, diagonal: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(loc, scale_tril) of a Gaussian guide's distribution in the unconstrained space, at the
    param store's values; None for a guide that is no Gaussian. A Gaussian with flows on top
    (plugins/flows.py) gives its Gaussian part, or None with ``whole``. With ``diagonal`` a
    mean-field guide's scale is its vector of sds, not a D x D matrix (``symmetric_kl`` takes
    either): a model with 10^5 latent values has a mean-field guide, not 80 GB of zeros; so is
    any Gaussian's beyond FULL_UP_TO dimensions (its marginals)."""
    if hasattr(guide, "gaussian"):  # a Gaussian of its own making (plugins/flows.py)
        if whole and getattr(guide, "flows", 0):
            return None
        loc, tril = guide.gaussian()
        return loc.detach().clone(), tril.detach().clone()
    if hasattr(guide, "_get_loc_and_scale") and hasattr(guide, "prototype_trace"):
        loc, sd = _mean_field(guide)  # Pyro's AutoNormal: a loc and a scale per site
        return loc, sd if diagonal else torch.diag(sd)
    get = getattr(guide, "get_posterior", None)
    if get is None or not hasattr(guide, "latent_dim"):
        return None
    with torch.no_grad():
        try:
            posterior = get()
            loc = posterior.mean.detach().clone()
            covariance = getattr(posterior, "covariance_matrix", None)
            if diagonal and loc.numel() > FULL_UP_TO:  # the marginals: O(D) per comparison
                return loc, posterior.variance.detach().sqrt()
            if covariance is None:
                sd = posterior.variance.detach().sqrt()
                return loc, sd if diagonal else torch.diag_embed(sd)
            return loc, torch.linalg.cholesky(covariance.detach())
        except Exception:  # a guide whose posterior is no Gaussian (a flow)
            return None


def bijections(trace: Any) -> list[tuple[str, dict, Transform]]:
    """Each latent site of ``trace`` (a guide's ``prototype_trace``: the order of its flat
    latent vector) with the bijection from the real numbers onto the site's support."""
    return [(name, site, biject_to(site["fn"].support))
            for name, site in trace.iter_stochastic_nodes()]


def unconstrained_draws(trace: Any, draws: Mapping[str, Any]) -> torch.Tensor:
    """``draws`` of each latent site of ``trace`` (draws first) taken back through its
    bijection and flattened side by side in ``bijections``' order: (draws, D), in float64 on
    the CPU."""
    columns = []
    for name, _, transform in bijections(trace):
        values = torch.as_tensor(draws[name]).to(device="cpu", dtype=torch.float64)
        columns.append(transform.inv(values).reshape(len(values), -1))
    return torch.cat(columns, 1)


DRAWS = 1000  # a flow's draws for its moments


def sampled_gaussian(guide: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The marginal means and sds of DRAWS draws from a guide's distribution in the
    unconstrained space (a normalizing flow's), or None for a guide without one. The draws
    come from the same base noise at every call (a fixed seed, on a forked random stream the
    run never sees), so two parameter settings' moments differ by what changed in the guide,
    not by Monte Carlo noise."""
    get = getattr(guide, "get_posterior", None)
    if get is None or not hasattr(guide, "latent_dim"):
        return None
    device = torch.get_default_device()
    with torch.no_grad(), torch.random.fork_rng(
            devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(0)
        try:
            draws = get().rsample((DRAWS,)).reshape(DRAWS, -1)
        except Exception:  # no distribution to draw from
            return None
    return draws.mean(0), draws.std(0)


def _mean_field(guide: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """An AutoNormal's sites' locs and sds, in its sites' order, as one diagonal Gaussian."""
    locs, scales = [], []
    with torch.no_grad():
        for name, _ in guide.prototype_trace.iter_stochastic_nodes():
            loc, scale = guide._get_loc_and_scale(name)
            locs.append(loc.detach().reshape(-1))
            scales.append(scale.detach().expand_as(loc).reshape(-1))
    return torch.cat(locs).clone(), torch.cat(scales)


def symmetric_kl(first: tuple[torch.Tensor, torch.Tensor],
                 second: tuple[torch.Tensor, torch.Tensor]) -> float:
    """KL(p || q) + KL(q || p) for two Gaussians given as (loc, scale_tril), in float64; a
    1-D scale on both sides is a diagonal Gaussian's sds (O(D), not O(D^3))."""
    (m1, l1), (m2, l2) = ((m.double(), t.double()) for m, t in (first, second))
    dimension = m1.shape[-1]
    if l1.dim() == 1 and l2.dim() == 1:
        ratio = (l1 / l2).pow(2)
        delta = (m2 - m1).pow(2)
        value = 0.5 * (ratio + 1 / ratio + delta / l1.pow(2) + delta / l2.pow(2)).sum() \
            - dimension
        return max(float(value), 0.0)
    l1, l2 = (torch.diag(t) if t.dim() == 1 else t for t in (l1, l2))

    def trace_term(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # tr(S_b^-1 S_a)
        return torch.linalg.solve_triangular(b, a, upper=False).pow(2).sum()

    delta = (m2 - m1).unsqueeze(-1)
    mahalanobis = (torch.linalg.solve_triangular(l1, delta, upper=False).pow(2).sum()
                   + torch.linalg.solve_triangular(l2, delta, upper=False).pow(2).sum())
    value = 0.5 * (trace_term(l1, l2) + trace_term(l2, l1) + mahalanobis) - dimension
    return max(float(value), 0.0)


def mixture_log_prob(gaussians: list[tuple[torch.Tensor, torch.Tensor]], points: torch.Tensor,
                     counts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each Gaussian's (loc, scale_tril) log density at each of ``points`` (K x N) and their
    mixture's (N), each weighed by its share of ``counts`` (equal shares where None); in
    float64: what importance weights against a mixture of fits divide by."""
    import math

    points = points.double()
    log_q = torch.stack([torch.distributions.MultivariateNormal(
        loc.double(), scale_tril=tril.double()).log_prob(points) for loc, tril in gaussians])
    if counts is None:
        counts = torch.ones(len(gaussians), dtype=torch.float64)
    shares = counts.double().log() - math.log(float(counts.sum()))
    return log_q, torch.logsumexp(log_q + shares[:, None], 0)
