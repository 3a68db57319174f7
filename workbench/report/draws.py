"""Stored draws of a posterior (a sampler's chains) as a guide, and the diagnostics of chains.

``DrawsGuide`` is Pyro's ``AutoContinuous`` whose unconstrained latent comes from a fixed set
of points (``Drawn``) instead of a distribution: the report summarises it, draws posterior.nc
from it and replays the model against it as it does any guide. Asked for n draws it gives n
of the stored points, evenly spaced in their order (all of them, in order, when n is their
number); it has no density, so nothing weighs its draws.

``chain_diagnostics`` is the rank-normalised split R-hat and the bulk and tail effective
sample sizes of Vehtari, Gelman, Simpson, Carpenter and Buerkner (2021), "Rank-normalization,
folding, and localization: an improved R-hat", per coordinate of ``(chains, draws, d)``; for
many short chains started in groups at shared points, the nested R-hat of Margossian,
Hoffman, Sountsov, Riou-Durand, Vehtari and Gelman (2024), "Nested R-hat: assessing the
convergence of Markov chain Monte Carlo when running many short chains". R-hat's own noise
grows as each chain's ESS shrinks (about 1 + 1 / (2 ESS per chain)), so 32 chains of a few
hundred draws can hold it above 1.01 at any length a pipeline can afford; the nested R-hat
compares the groups' means instead, whose noise shrinks with the groups' total ESS.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.infer.autoguide import AutoContinuous


class Drawn(TorchDistribution):
    """The stored points ``(n, d)`` as a distribution with no density: ``sample`` hands out
    points evenly spaced in their order, its ``mean`` and ``stddev`` are theirs."""

    arg_constraints: dict = {}
    support = constraints.real_vector

    def __init__(self, points: torch.Tensor):
        self.points = points
        super().__init__(torch.Size(), points.shape[-1:], validate_args=False)

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        shape = torch.Size(sample_shape)
        count, stored = shape.numel(), len(self.points)
        index = (torch.arange(count) * stored // max(count, 1)) if count <= stored \
            else torch.arange(count) % stored
        drawn = self.points[index.to(self.points.device)]
        return drawn.reshape(shape + self.event_shape).to(torch.get_default_dtype())

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("a sampler's draws have no density")

    @property
    def mean(self) -> torch.Tensor:
        return self.points.mean(0)

    @property
    def stddev(self) -> torch.Tensor:
        return self.points.std(0)


class DrawsGuide(AutoContinuous):
    """A guide whose unconstrained latent is one of ``points`` (``Drawn``), laid out over the
    model's latent sites in the order ``gaussians.bijections`` and the fits' Gaussians use."""

    has_density = False  # nothing weighs its draws (inference_data leaves log_weight out)

    def __init__(self, model: Any, points: torch.Tensor):
        super().__init__(model)
        self._drawn = Drawn(points)

    def get_posterior(self, *args: Any, **kwargs: Any) -> Drawn:
        return self._drawn

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple:
        raise NotImplementedError("stored draws have no single location and scale")


def chain_diagnostics(chains: torch.Tensor, groups: int = 0) -> dict[str, torch.Tensor]:
    """Per coordinate of ``chains`` (``(chains, draws, d)``): ``rhat`` (the larger of the
    rank-normalised split R-hat of the draws and of their distances from the median),
    ``ess_bulk`` (of the rank-normalised split chains) and ``ess_tail`` (the smaller of the
    ESS of the 5% and 95% quantiles' indicators); with ``groups`` > 1 (the chains in that many
    equal groups, each started at one point, in order), ``nested_rhat`` as ``rhat`` is, of
    the rank-normalised draws and distances."""
    chains = chains.double()
    count, length = chains.shape[:2]
    half = length // 2
    split = torch.cat([chains[:, :half], chains[:, length - half:]])  # (2 chains, half, d)
    bulk = _rank_normal(split)
    folded = _rank_normal((split - split.flatten(0, 1).median(0).values).abs())
    rhat = torch.maximum(_rhat(bulk), _rhat(folded))
    low, high = torch.quantile(split.flatten(0, 1), torch.tensor([0.05, 0.95],
                                                                 dtype=torch.float64), dim=0)
    tail = torch.minimum(_ess((split <= low).double()), _ess((split >= high).double()))
    found = {"rhat": rhat, "ess_bulk": _ess(bulk), "ess_tail": tail}
    if groups > 1:
        if length % 2 == 0:  # the split chains hold every draw: the same ranks, rejoined
            whole, folded = (torch.cat([ranked[:count], ranked[count:]], 1)
                             for ranked in (bulk, folded))
        else:
            whole = _rank_normal(chains)
            folded = _rank_normal((chains - chains.flatten(0, 1).median(0).values).abs())
        found["nested_rhat"] = torch.maximum(_nested_rhat(whole, groups),
                                             _nested_rhat(folded, groups))
    return found


def _nested_rhat(chains: torch.Tensor, groups: int) -> torch.Tensor:
    """Margossian et al.'s nested R-hat of ``(chains, draws, d)`` in ``groups`` equal groups:
    sqrt(1 + B / W), B the variance of the groups' means, W the mean over the groups of the
    variance of their chains' means plus their chains' mean variance."""
    count, length, dimension = chains.shape
    grouped = chains.reshape(groups, count // groups, length, dimension)
    means = grouped.mean(2)  # (groups, chains in each, d)
    between = means.mean(1).var(0)
    inside = means.var(1) if grouped.shape[1] > 1 else torch.zeros_like(means[:, 0])
    within = (inside + grouped.var(2).mean(1)).mean(0)
    found = (1 + between / within).sqrt()
    return torch.where(within > 0, found, torch.where(between > 0, torch.inf, 1.0))


def _rank_normal(draws: torch.Tensor) -> torch.Tensor:
    """Each coordinate's draws replaced by the normal scores of their pooled ranks (ties
    averaged)."""
    flat = draws.flatten(0, 1)
    size = len(flat)
    ordered, order = flat.sort(0)
    ranks = torch.empty_like(flat)
    ranks.scatter_(0, order, torch.arange(1, size + 1, dtype=flat.dtype)[:, None]
                   .expand_as(flat).contiguous())
    tied = (ordered[1:] == ordered[:-1]).any(0).nonzero().flatten().tolist()
    for column in tied:  # ties (a chain that stayed put) share their mean rank
        _, inverse = flat[:, column].unique(return_inverse=True)
        total = torch.zeros(int(inverse.max()) + 1, dtype=flat.dtype)
        counts = torch.zeros_like(total)
        total.index_add_(0, inverse, ranks[:, column])
        counts.index_add_(0, inverse, torch.ones(size, dtype=flat.dtype))
        ranks[:, column] = (total / counts)[inverse]
    scores = torch.special.ndtri((ranks - 0.375) / (size + 0.25))
    return scores.reshape(draws.shape)


def _rhat(chains: torch.Tensor) -> torch.Tensor:
    """Gelman and Rubin's R-hat of ``(chains, draws, d)``: sqrt(var+ / W)."""
    length = chains.shape[1]
    within = chains.var(1).mean(0)
    between = chains.mean(1).var(0) * length
    pooled = (length - 1) / length * within + between / length
    found = (pooled / within).sqrt()
    return torch.where(within > 0, found, torch.where(between > 0, torch.inf, 1.0))


def _ess(chains: torch.Tensor) -> torch.Tensor:
    """The effective sample size of ``(chains, draws, d)`` (Geyer's initial monotone
    sequence over the chains' combined autocorrelations, as Stan computes it)."""
    count, length, _ = chains.shape
    centred = chains - chains.mean(1, keepdim=True)
    size = 2 * length
    spectrum = torch.fft.rfft(centred, n=size, dim=1)
    autocov = torch.fft.irfft(spectrum * spectrum.conj(), n=size, dim=1)[:, :length] / length
    within = chains.var(1).mean(0)
    pooled = (length - 1) / length * within + chains.mean(1).var(0)
    rho = 1 - (within - autocov.mean(0)) / pooled  # (lags, d)
    rho[0] = 1.0
    pairs = rho[: length - length % 2].reshape(-1, 2, rho.shape[1]).sum(1)  # (lags / 2, d)
    positive = (pairs > 0).long().cumprod(0).bool()  # the initial positive sequence
    monotone = torch.cummin(pairs, 0).values  # within it, the initial monotone sequence
    tau = -1 + 2 * torch.where(positive, monotone, 0.0).sum(0)
    ess = count * length / tau.clamp(min=1.0 / math.log10(count * length))
    return torch.where(pooled > 0, ess, torch.nan)
