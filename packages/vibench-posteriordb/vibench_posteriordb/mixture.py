"""Stan's ``log_mix`` of Normals as a Pyro distribution, quick over many draws.

Kept apart from ``models`` because it imports pyro at the top: the models import it when
they run, not when ``vibench list`` imports the plugin.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Categorical, MixtureSameFamily, Normal, TorchDistribution
from torch.distributions import constraints


class NormalMixture(TorchDistribution):
    """A mixture of K Normals over one real value: ``probs``, ``loc`` and ``scale`` each end
    in a dim of K components. The same distribution as Pyro's ``MixtureSameFamily(
    Categorical(probs), Normal(loc, scale))``, which draws its samples, but a plate's
    ``expand`` keeps the parameters as they are, and the log density is one Normal term per
    component added with logaddexp: over a report's draws x rows the mixture's log density
    costs a few passes over draws x rows instead of several over draws x rows x K."""

    arg_constraints = {"probs": constraints.simplex, "loc": constraints.real,
                       "scale": constraints.positive}
    support = constraints.real

    def __init__(self, probs, loc, scale, validate_args=None):
        self.probs, self.loc, self.scale = probs, loc, scale
        batch_shape = torch.broadcast_shapes(probs.shape[:-1], loc.shape[:-1],
                                             scale.shape[:-1])
        super().__init__(batch_shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(NormalMixture, _instance)
        new.probs, new.loc, new.scale = self.probs, self.loc, self.scale
        super(NormalMixture, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        log_weight = self.probs.log() - self.scale.log() - 0.5 * math.log(2 * math.pi)
        precision = self.scale.reciprocal()
        total = None
        for k in range(self.loc.shape[-1]):
            z = (value - self.loc[..., k]) * precision[..., k]
            term = torch.addcmul(log_weight[..., k], z, z, value=-0.5)
            total = term if total is None else torch.logaddexp(total, term)
        return total.expand(torch.broadcast_shapes(total.shape, self.batch_shape))

    def _mixture(self):
        return MixtureSameFamily(Categorical(probs=self.probs), Normal(self.loc, self.scale)
                                 ).expand(self.batch_shape)

    def sample(self, sample_shape=torch.Size()):
        return self._mixture().sample(sample_shape)

    @property
    def mean(self):
        return self._mixture().mean

    @property
    def variance(self):
        return self._mixture().variance
