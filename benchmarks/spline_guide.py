"""A spline coupling flow guide for benchmarks/peers_advi.py's ``vb_spline`` rows (issue 21's
"spline or coupling flows from Pyro's transforms" lever). vibench registers no spline flow (its
``auto_gaussian_flow`` uses affine autoregressive flows), so a recipe names this file:

    vibench run RECIPE --set guide=benchmarks/spline_guide.py:SplineFlow

The guide is Pyro's AutoNormalizingFlow over N(0, I) with ``num_transforms`` rational-quadratic
spline coupling layers (Durkan et al. 2019, ``pyro.distributions.transforms.spline_coupling``),
their halves swapped between layers, then a learnt full-rank affine map and a fixed one at the
model's median with ``init_scale``, as ``auto_gaussian_flow`` is built, so that one step size
suits every coordinate. The splines act on (-bound, bound) and are the identity outside it.
"""

from __future__ import annotations

import torch
from pyro.distributions.torch_transform import ComposeTransformModule
from pyro.distributions.transforms import Permute, spline_coupling
from pyro.infer.autoguide import AutoNormalizingFlow
from pyro.infer.autoguide.initialization import init_to_median

from vibench_plugins.flow_transforms import CholeskyAffine, FixedAffine


class SplineFlow(AutoNormalizingFlow):
    """AutoNormalizingFlow: spline coupling layers, then a learnt and a fixed affine map (a
    class, so that a recipe can give it options)."""

    def __init__(self, model, num_transforms: int = 2, count_bins: int = 8, bound: float = 3.0,
                 init_scale: float = 0.1):
        self.options = (num_transforms, count_bins, bound, init_scale)
        super().__init__(model, self._make)
        self.init_loc_fn = init_to_median

    def _make(self, dim: int) -> ComposeTransformModule:
        num_transforms, count_bins, bound, init_scale = self.options
        layers = []
        for i in range(num_transforms if dim > 1 else 0):
            layers.append(spline_coupling(dim, count_bins=count_bins, bound=bound))
            if i + 1 < num_transforms:
                layers.append(Permute(torch.arange(dim - 1, -1, -1)))
        start = FixedAffine(self._init_loc().detach(), torch.eye(dim) * init_scale)
        return ComposeTransformModule([*layers, CholeskyAffine(dim, 1.0), start])
