"""A Normal model with an unknown mean, which has an exact posterior, and a Normal guide for
real-valued latent sites.

Only ``hookimpl`` comes from vibench; torch and pyro are imported inside the functions that
use them, so ``vibench list`` does not pay for importing them.
"""

import math

from workbench import hookimpl


@hookimpl
def register_models(register):
    register("normal_mean", normal_mean)


@hookimpl
def register_guides(register):
    register("normal", normal)


def normal_mean(sd: float = 1.0, prior_loc: float = 0.0, prior_scale: float = 10.0):
    """Data x ~ Normal(mu, sd) with sd known and a Normal(prior_loc, prior_scale) prior on mu."""
    if sd <= 0 or prior_scale <= 0:
        raise ValueError("sd and prior_scale must be > 0")
    return NormalMean(sd, prior_loc, prior_scale)


class NormalMean:
    """The model: a callable whose argument ``x`` is the recipe's ``data.x``."""

    def __init__(self, sd: float, prior_loc: float, prior_scale: float):
        self.sd, self.prior_loc, self.prior_scale = sd, prior_loc, prior_scale

    def __call__(self, x):
        import pyro
        import pyro.distributions as dist
        import torch

        if x.dim() != 1:
            raise ValueError(f"x: expected a list of numbers, got shape {tuple(x.shape)}")
        # torch.tensor lands on the run's device: vibench sets the default device.
        mu = pyro.sample("mu", dist.Normal(torch.tensor(self.prior_loc), self.prior_scale))
        with pyro.plate("data", x.shape[-1]):  # the observations are independent given mu
            pyro.sample("obs", dist.Normal(mu, self.sd), obs=x)

    def exact_posterior(self, x):
        """The Normal prior is conjugate: precisions add, and the mean is precision-weighted."""
        import pyro.distributions as dist

        precision = self.prior_scale**-2 + x.shape[-1] * self.sd**-2
        loc = (self.prior_loc * self.prior_scale**-2 + x.sum() * self.sd**-2) / precision
        return {"mu": dist.Normal(loc, precision**-0.5)}


def normal(model, init_loc: float = 0.0, init_scale: float = 1.0):
    """A Normal per real-valued latent site, with learned loc and log-scale (mean field)."""
    if init_scale <= 0:
        raise ValueError("init_scale must be > 0")
    return NormalGuide(model, init_loc, init_scale)


class NormalGuide:
    """The guide: takes the model's arguments, samples each latent site from its own Normal."""

    def __init__(self, model, init_loc: float, init_scale: float):
        self.model = model
        self.init_loc, self.init_scale = init_loc, init_scale
        self.sites = None  # site name -> (shape, event dims, plates), found at the first call

    def __call__(self, *args, **kwargs):
        import contextlib

        import pyro
        import pyro.distributions as dist
        import torch

        if self.sites is None:
            self.sites = self._find_sites(*args, **kwargs)
        for name, (shape, event_dim, plates) in self.sites.items():
            loc = pyro.param(f"{name}.loc",
                             lambda shape=shape: torch.full(shape, float(self.init_loc)))
            log_scale = pyro.param(f"{name}.log_scale",
                                   lambda shape=shape: torch.full(shape,
                                                                  math.log(self.init_scale)))
            with contextlib.ExitStack() as stack:  # the model's plates, so batch shapes match
                for frame in plates:
                    stack.enter_context(pyro.plate(frame.name, frame.size, dim=frame.dim))
                pyro.sample(name, dist.Normal(loc, log_scale.exp()).to_event(event_dim))

    def _find_sites(self, *args, **kwargs):
        """The model's latent sites, each of which must be real-valued (no Beta, no Gamma)."""
        from pyro import poutine
        from pyro.distributions import constraints
        from pyro.poutine.util import site_is_subsample

        trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        sites = {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
                continue
            support = site["fn"].support
            while isinstance(support, constraints.independent):
                support = support.base_constraint
            if support is not constraints.real:
                raise ValueError(f"site {name!r} has support {site['fn'].support}; a Normal "
                                 "guide needs real values (auto_normal transforms them)")
            plates = [f for f in site["cond_indep_stack"] if f.vectorized]
            if any(f.full_size not in (None, f.size) for f in plates):
                raise ValueError(f"site {name!r} is in a subsampled plate, which this guide "
                                 "does not support")
            sites[name] = (site["value"].shape, site["fn"].event_dim, plates)
        return sites
