"""A normalizing-flow guide that starts as a Gaussian: inverse autoregressive flows (Kingma et
al. 2016) under a learnable full-rank affine map, z = loc + L f(eps). With the flows' last
layers at zero, f is the identity, so the guide starts exactly as the Gaussian N(loc, L L')
(its own init_loc and init_scale, or a fitted Gaussian given to ``start_at``), and the flows
learn what the Gaussian misses; Pyro's AutoIAFNormal starts at N(0, I) instead.
"""

from __future__ import annotations

import torch
from pyro.distributions import constraints
from pyro.distributions.torch_transform import ComposeTransformModule, TransformModule
from torch import nn

from workbench import hookimpl


@hookimpl
def register_guides(register):
    register("auto_gaussian_flow", auto_gaussian_flow)


def auto_gaussian_flow(model, num_transforms: int = 2, hidden_factor: int = 4,
                       init_scale: float = 0.1, init_loc: str = "median"):
    """Inverse autoregressive flows under a full-rank Gaussian, started as that Gaussian."""
    from pyro.infer.autoguide import AutoNormalizingFlow

    from vibench_plugins.guides import _continuous, _init_loc, _positive

    if num_transforms < 0 or hidden_factor < 1:
        raise ValueError("num_transforms must be >= 0 and hidden_factor >= 1")
    scale = _positive(init_scale)

    class AutoGaussianFlow(AutoNormalizingFlow):
        def __init__(self, model):
            super().__init__(model, self._make)
            self.init_loc_fn = _init_loc(init_loc)

        def _make(self, dim: int) -> ComposeTransformModule:
            affine = CholeskyAffine(dim, scale)
            with torch.no_grad():
                affine.loc.copy_(self._init_loc().detach())
            return ComposeTransformModule([*iaf_stack(dim, num_transforms, hidden_factor),
                                           affine])

        def start_at(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
            """Become the Gaussian N(loc, scale_tril scale_tril') (the flows stay identity)."""
            self.transform[-1].start_at(loc, scale_tril)

    return AutoGaussianFlow(_continuous(model))


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

    def start_at(self, loc: torch.Tensor, scale_tril: torch.Tensor) -> None:
        with torch.no_grad():
            self.loc.copy_(loc)
            self.lower.copy_(scale_tril.tril(-1))
            self.log_diag.copy_(scale_tril.diagonal().log())
