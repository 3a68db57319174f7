"""A full-rank Gaussian guide, optionally with normalizing flows, fitted in whitened
coordinates: z = m + C (a + S f(eps)), with (m, C) a fixed start (the Laplace approximation
with ``init: laplace``, Pathfinder's with ``init: pathfinder``, or a fitted Gaussian given to
``start_at``), a and S (lower triangular) learnt, and f inverse autoregressive flows (Kingma et
al. 2016) whose last layers start at zero, so that f starts as the identity and the guide as
N(m, C C'). Learning a and S instead of the Gaussian's own location and Cholesky factor makes
one step size fit every coordinate: a step of 0.01 is 0.01 posterior sds in each direction,
whether a coefficient's sd is 30 or 0.007 (kilpisjarvi's). Pyro's AutoIAFNormal starts at
N(0, I) instead.
"""

from __future__ import annotations

from typing import Literal

from workbench import hookimpl


@hookimpl
def register_guides(register):
    register("auto_gaussian_flow", auto_gaussian_flow)


def auto_gaussian_flow(model, num_transforms: int = 2, hidden_factor: int = 4,
                       init_scale: float = 0.1, init_loc: str = "median",
                       init: Literal["init_loc", "laplace", "pathfinder"] = "init_loc"):
    """A whitened full-rank Gaussian with inverse autoregressive flows, started as a Gaussian."""
    import torch
    from pyro.distributions.torch_transform import ComposeTransformModule
    from pyro.infer.autoguide import AutoNormalizingFlow

    from vibench_plugins.flow_transforms import (
        CholeskyAffine,
        FixedAffine,
        iaf_stack,
        laplace_start,
        pathfinder_start,
    )
    from vibench_plugins.guides import _continuous, _init_loc, _positive

    if num_transforms < 0 or hidden_factor < 1:
        raise ValueError("num_transforms must be >= 0 and hidden_factor >= 1")
    scale = _positive(init_scale)

    class AutoGaussianFlow(AutoNormalizingFlow):
        flows = num_transforms  # beyond the Gaussian: the guide is no Gaussian when > 0

        def __init__(self, model):
            super().__init__(model, self._make)
            self.init_loc_fn = _init_loc(init_loc)

        def _make(self, dim: int) -> ComposeTransformModule:
            start = FixedAffine(self._init_loc().detach(), torch.eye(dim) * scale)
            return ComposeTransformModule([*iaf_stack(dim, num_transforms, hidden_factor),
                                           CholeskyAffine(dim, 1.0), start])

        def start_at(self, loc: torch.Tensor, scale_tril: torch.Tensor,
                     shift: torch.Tensor | None = None) -> None:
            """Become the Gaussian N(loc, scale_tril scale_tril'), whitened by it (the flows
            stay the identity); ``shift`` moves the learnt location off 0 (in its sds)."""
            self.transform[-1].set(loc, scale_tril)
            self.transform[-2].reset(shift)

        def gaussian(self) -> tuple[torch.Tensor, torch.Tensor]:
            """The Gaussian part, (loc, scale_tril) in the unconstrained space: the whole
            guide when it has no flows."""
            fixed, learnt = self.transform[-1], self.transform[-2]
            with torch.no_grad():
                return fixed.loc + fixed.tril @ learnt.loc, fixed.tril @ learnt.tril()

        def initialise(self, *args, **kwargs) -> list[str]:
            """Start at the Laplace approximation (init laplace) or at Pathfinder's Gaussian
            (init pathfinder)."""
            starts = {"laplace": laplace_start, "pathfinder": pathfinder_start}
            return starts[init](self, args, kwargs) if init in starts else []

    guide = AutoGaussianFlow(_continuous(model))
    guide.source_model = (model,)
    return guide


