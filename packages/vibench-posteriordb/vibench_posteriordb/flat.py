"""Stan's implicit flat prior over a parameter's declared support, as a Pyro distribution.

Kept apart from ``models`` because it imports pyro at the top: the models import it when
they run, not when ``vibench list`` imports the plugin.
"""

from __future__ import annotations

import torch
from pyro.distributions import ImproperUniform
from pyro.distributions.transforms import biject_to


class FlatPrior(ImproperUniform):
    """Pyro's ImproperUniform (a log density of zero over ``support``) that can also give a
    starting point: ``sample`` draws uniformly from (-2, 2) in unconstrained space and maps
    the draw into the support, as Stan's default initialisation does.

    ImproperUniform itself refuses to sample, and more than Pyro's inference needs a value
    from every site before it has one: vibench traces each model once, unconditioned, before
    training (to find its sites, plates and supports), and Pyro's init strategies
    (init_to_median, init_to_feasible, init_to_uniform: autoguides' and NUTS's defaults)
    draw from the site first. The draws are no prior, which is improper, so a "prior"
    plotted from them is only this starting distribution. The density is untouched, and
    both it and the draws take the dtype and device of the tensor given as ``like``.
    """

    radius = 2.0
    _options: dict = {}  # dtype and device of draws; torch's defaults unless made with like

    @classmethod
    def over(cls, support, event_shape=(), like: torch.Tensor | None = None) -> FlatPrior:
        """A flat prior over ``support`` for a site of shape ``event_shape``."""
        flat = cls(support, torch.Size(), torch.Size(event_shape))
        if like is not None:
            flat._options = {"dtype": like.dtype, "device": like.device}
        return flat

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(FlatPrior, _instance)
        new = super().expand(batch_shape, _instance=new)
        new._options = self._options
        return new

    def log_prob(self, value):
        batch_shape = torch.broadcast_shapes(value.shape[:value.dim() - self.event_dim],
                                             self.batch_shape)
        return value.new_zeros(()).expand(batch_shape)

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        transform = biject_to(self.support)
        with torch.no_grad():
            unconstrained = torch.empty(transform.inverse_shape(shape), **self._options)
            return transform(unconstrained.uniform_(-self.radius, self.radius))
