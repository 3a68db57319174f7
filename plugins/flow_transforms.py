"""The pieces of ``auto_gaussian_flow`` (flows.py) that need torch, imported when a run builds
one, so that ``vibench list`` never imports torch for it."""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import TransformModule
from torch import nn


def laplace_start(guide, args: tuple, kwargs: dict) -> list[str]:
    """Put the guide's fixed affine map at the Laplace approximation: the mode by L-BFGS and
    the inverse Hessian there (or its diagonal's inverse where that is all there is)."""
    from pyro.infer.autoguide.initialization import InitMessenger

    from vibench_plugins import laplace
    from workbench.report.marginal import init_to_feasible

    sites = laplace.layout(guide)
    with InitMessenger(init_to_feasible):  # a draw from an improper prior may be no number
        laplace.check_continuous(guide, args, kwargs)
    potential = laplace.potential_fn(laplace.model_of(guide), sites, args, kwargs)
    fit = laplace.find_mode(potential, guide.transform[-1].loc.detach().clone(), True, sites)
    if fit is None:
        return ["init laplace: no start gave a finite log density; the guide keeps its "
                "default start"]
    why = laplace.degenerate(fit, sites)
    if why:
        return [f"init laplace: {why}; the guide keeps its init_loc start"]
    covariance, precision_diag, note = laplace.curvature(fit.hessian)
    notes = [note] if note else []
    if not fit.converged:
        notes.append("init laplace: L-BFGS did not converge to a mode; starting from the best "
                     "point it found")
    if covariance is not None:
        tril = torch.linalg.cholesky(covariance)
    elif precision_diag is not None:
        tril = torch.diag_embed(precision_diag.rsqrt())
    else:
        tril = guide.transform[-1].tril.clone()
    guide.start_at(fit.point, tril)
    return notes


def pathfinder_start(guide, args: tuple, kwargs: dict) -> list[str]:
    """Put the guide's fixed affine map at multi-path Pathfinder's Gaussian (plugins/
    pathfinder.py), from the guide's start and uniform ones."""
    from vibench_plugins import laplace, pathfinder

    sites = laplace.layout(guide)
    answer, notes = pathfinder.approximate(guide, sites, args, kwargs,
                                           first=guide.transform[-1].loc.detach().clone())
    if answer is not None:
        mean, covariance, precision_diag = answer
        tril = (torch.linalg.cholesky(covariance) if covariance is not None
                else torch.diag_embed(precision_diag.rsqrt()))
        guide.start_at(mean, tril)
    return notes


def iaf_stack(dim: int, count: int, hidden_factor: int) -> list[TransformModule]:
    """``count`` affine autoregressive flows (alternating variable order), each the identity
    at first; none in one dimension, where an autoregressive network has nothing to condition
    on."""
    from pyro.distributions.transforms import AffineAutoregressive, Permute
    from pyro.nn import AutoRegressiveNN

    if dim < 2:
        return []
    found: list[TransformModule] = []
    for i in range(count):
        network = AutoRegressiveNN(dim, [hidden_factor * dim] * 2)
        with torch.no_grad():
            network.layers[-1].weight.zero_()
            network.layers[-1].bias.zero_()
        found.append(AffineAutoregressive(network, stable=False))
        if i + 1 < count:
            found.append(Permute(torch.arange(dim - 1, -1, -1)))
    return found


class FixedAffine(TransformModule):
    """x -> loc + tril x with fixed loc and lower-triangular tril, kept as buffers (so
    checkpoints keep them and no optimizer steps them)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, loc: torch.Tensor, tril: torch.Tensor):
        super().__init__(cache_size=1)
        self.register_buffer("loc", loc.clone())
        self.register_buffer("tril", tril.clone())

    def set(self, loc: torch.Tensor, tril: torch.Tensor) -> None:
        with torch.no_grad():
            self.loc.copy_(loc)
            self.tril.copy_(tril)
        self._cached_x_y = None, None

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + (self.tril @ x.unsqueeze(-1)).squeeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        centred = (y - self.loc).unsqueeze(-1)
        tril = self.tril.expand(*centred.shape[:-2], *self.tril.shape)
        return torch.linalg.solve_triangular(tril, centred, upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.tril.diagonal().abs().log().sum().expand(x.shape[:-1])


class CholeskyAffine(TransformModule):
    """x -> loc + L x with L lower triangular and a positive diagonal (kept as its log)."""

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True

    def __init__(self, dim: int, scale: float):
        super().__init__(cache_size=1)
        self.loc = nn.Parameter(torch.zeros(dim))
        self.lower = nn.Parameter(torch.zeros(dim, dim))
        self.log_diag = nn.Parameter(torch.full((dim,), float(scale)).log())

    def tril(self) -> torch.Tensor:
        return self.lower.tril(-1) + torch.diag_embed(self.log_diag.exp())

    def _call(self, x: torch.Tensor) -> torch.Tensor:
        return self.loc + (self.tril() @ x.unsqueeze(-1)).squeeze(-1)

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        centred = (y - self.loc).unsqueeze(-1)
        tril = self.tril().expand(*centred.shape[:-2], *self.lower.shape)
        return torch.linalg.solve_triangular(tril, centred, upper=False).squeeze(-1)

    def log_abs_det_jacobian(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.log_diag.sum().expand(x.shape[:-1])

    def reset(self, shift: torch.Tensor | None = None) -> None:
        """The identity map, or a shift by ``shift``."""
        with torch.no_grad():
            self.loc.copy_(shift if shift is not None else torch.zeros_like(self.loc))
            self.lower.zero_()
            self.log_diag.zero_()
