"""Default guides (variational families): the seed's Beta guide and Pyro's autoguides."""

from functools import cache
from typing import Literal

from workbench import hookimpl

# How an autoguide picks its starting point: a Pyro strategy by name, or values per site.
InitLoc = Literal["median", "mean", "sample", "feasible"] | dict
# How a Gaussian autoguide starts: at init_loc with init_scale, at the Laplace approximation
# (the mode, found from init_loc, and the inverse Hessian there; see laplace.py), or at
# Pathfinder's best Gaussian (4 paths, the first from init_loc; see pathfinder.py).
Init = Literal["init_loc", "laplace", "pathfinder"]


@hookimpl
def register_guides(register):
    register("beta", BetaGuide)
    register("auto_normal", auto_normal)
    register("auto_diagonal_normal", auto_diagonal_normal)
    register("auto_multivariate_normal", auto_multivariate_normal)
    register("auto_lowrank_multivariate_normal", auto_lowrank_multivariate_normal)
    register("auto_delta", auto_delta)
    register("auto_laplace_approximation", auto_laplace_approximation)
    register("auto_iaf_normal", auto_iaf_normal)
    register("pathfinder", pathfinder)


class BetaGuide:
    """A Beta for each latent site in (0, 1), parameters in log space (the seed's guide)."""

    def __init__(self, model, init_alpha: float = 15.0, init_beta: float = 15.0):
        if init_alpha <= 0 or init_beta <= 0:
            raise ValueError("init_alpha and init_beta must be > 0")
        self.model = _continuous(model)
        self.init = (init_alpha, init_beta)
        self.sites = None

    def __call__(self, *args, **kwargs):
        import pyro
        import pyro.distributions as dist
        import torch

        if self.sites is None:
            self.sites = self._find_sites(*args, **kwargs)
        for site, (alpha_name, beta_name, shape) in self.sites.items():
            log_alpha = pyro.param(
                alpha_name, lambda shape=shape: torch.full(shape, float(self.init[0])).log())
            log_beta = pyro.param(
                beta_name, lambda shape=shape: torch.full(shape, float(self.init[1])).log())
            fn = dist.Beta(log_alpha.exp(), log_beta.exp())
            pyro.sample(site, fn.to_event(len(shape)))

    def _find_sites(self, *args, **kwargs):
        """The model's latent sites and the names of their parameters: the seed's
        ``log_alpha_q``/``log_beta_q`` for one site, prefixed by the site's name for several."""
        from pyro import poutine
        from pyro.poutine.util import site_is_subsample

        trace = poutine.block(poutine.trace(self.model).get_trace)(*args, **kwargs)
        latent = {
            name: site for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        }
        sites = {}
        for name, site in latent.items():
            support = site["fn"].support
            bounds = getattr(support, "lower_bound", None), getattr(support, "upper_bound", None)
            if bounds != (0, 1):
                raise ValueError(
                    f"site {name!r} has support {support}; a Beta guide needs (0, 1)"
                )
            prefix = "" if len(latent) == 1 else f"{name}."
            sites[name] = (f"{prefix}log_alpha_q", f"{prefix}log_beta_q", site["value"].shape)
        return sites


def auto_normal(model, init_scale: float = 0.1, init_loc: InitLoc = "feasible",
                init: Init = "init_loc"):
    """Pyro's AutoNormal: an independent Normal per latent site, in unconstrained space."""
    from pyro.infer.autoguide import AutoNormal

    return _gaussian(AutoNormal, model, init, init_loc_fn=_init_loc(init_loc),
                     init_scale=_positive(init_scale))


def auto_diagonal_normal(model, init_scale: float = 0.1, init_loc: InitLoc = "median",
                         init: Init = "init_loc"):
    """Pyro's AutoDiagonalNormal: one diagonal Normal over all latents, unconstrained."""
    from pyro.infer.autoguide import AutoDiagonalNormal

    return _gaussian(AutoDiagonalNormal, model, init, init_loc_fn=_init_loc(init_loc),
                     init_scale=_positive(init_scale))


def auto_multivariate_normal(model, init_scale: float = 0.1, init_loc: InitLoc = "median",
                             init: Init = "init_loc"):
    """Pyro's AutoMultivariateNormal: a full-covariance Normal over all latents."""
    from pyro.infer.autoguide import AutoMultivariateNormal

    return _gaussian(AutoMultivariateNormal, model, init, init_loc_fn=_init_loc(init_loc),
                     init_scale=_positive(init_scale))


def auto_lowrank_multivariate_normal(model, rank: int | None = None, init_scale: float = 0.1,
                                     init_loc: InitLoc = "median", init: Init = "init_loc"):
    """Pyro's AutoLowRankMultivariateNormal: a Normal with low-rank plus diagonal covariance."""
    from pyro.infer.autoguide import AutoLowRankMultivariateNormal

    if rank is not None and rank < 1:
        raise ValueError("rank must be >= 1 (or null for about the square root of the size)")
    return _gaussian(AutoLowRankMultivariateNormal, model, init, rank=rank,
                     init_loc_fn=_init_loc(init_loc), init_scale=_positive(init_scale))


def pathfinder(model, num_paths: int = 4, max_iter: int = 1000, history: int = 20,
               draws: int = 10, init_loc: InitLoc = "median"):
    """Pathfinder (Zhang et al. 2022): a full-rank Gaussian set at set-up by ``num_paths``
    Pathfinder paths (L-BFGS iterations at most ``max_iter``, inverse Hessian from
    ``history`` pairs, ELBO from ``draws`` draws per iterate), to their importance-weighted
    draws' moments where k-hat < 0.7, else the best path's Gaussian; train.steps 0 keeps it
    as Pathfinder left it, more steps go on with SVI from there."""
    from pyro.infer.autoguide import AutoMultivariateNormal

    from vibench_plugins.pathfinder import check_options

    check_options(num_paths, max_iter, history, draws)
    guide = _gaussian(AutoMultivariateNormal, model, "pathfinder",
                      init_loc_fn=_init_loc(init_loc))
    guide.pathfinder_options = {"num_paths": num_paths, "max_iter": max_iter,
                                "history": history, "draws": draws}
    return guide


def auto_delta(model, init_loc: InitLoc = "median"):
    """Pyro's AutoDelta: a point mass per latent site, i.e. MAP estimation."""
    from pyro.infer.autoguide import AutoDelta

    return AutoDelta(_continuous(model), init_loc_fn=_init_loc(init_loc))


def auto_laplace_approximation(model, init_loc: InitLoc = "median"):
    """Pyro's AutoLaplaceApproximation: MAP, then a Normal from the Hessian at the mode."""
    from pyro.infer.autoguide import AutoLaplaceApproximation

    class Laplace(AutoLaplaceApproximation):
        def posterior_guide(self, *args, **kwargs):
            """The Gaussian at the mode: what this guide says the posterior is."""
            return self.laplace_approximation(*args, **kwargs)

    return Laplace(_continuous(model), init_loc_fn=_init_loc(init_loc))


def auto_iaf_normal(model, num_transforms: int = 1, hidden_dim: list[int] | None = None,
                    init_loc: InitLoc = "median"):
    """Pyro's AutoIAFNormal: a Normal pushed through inverse autoregressive flows."""
    from pyro.infer.autoguide import AutoIAFNormal

    if num_transforms < 1:
        raise ValueError("num_transforms must be >= 1")
    return AutoIAFNormal(_continuous(model), hidden_dim=hidden_dim, num_transforms=num_transforms,
                         init_loc_fn=_init_loc(init_loc))


def _gaussian(cls, model, init: str, **options):
    """A Gaussian autoguide of class ``cls``; with init laplace or pathfinder, one that
    vibench's ``initialise`` call moves to that start before training."""
    guide = (cls if init == "init_loc" else _start_class(cls, init))(_continuous(model),
                                                                     **options)
    guide.source_model = (model,)  # a tuple, so that a PyroModule model is no submodule
    return guide


@cache
def _start_class(cls, init: str):
    """``cls`` with the start ``init`` names, under the same name: its parameters keep their
    names."""
    if init == "laplace":
        from vibench_plugins.laplace import LaplaceStart as start
    else:
        from vibench_plugins.pathfinder import PathfinderStart as start

    return type(cls.__name__, (start, cls), {"__module__": __name__})


def _continuous(model):
    """The model as a guide sees it: discrete sites marked for enumeration are summed out by
    the loss (enum_elbo), so the guide must not sample them."""
    from pyro import poutine

    return poutine.block(model, hide_fn=lambda msg: bool(msg.get("infer", {}).get("enumerate")))


def _init_loc(init_loc):
    """Pyro's init strategy for a name, or init_to_value for per-site values."""
    import torch
    from pyro.infer import autoguide

    strategies = {"median": autoguide.init_to_median, "mean": autoguide.init_to_mean,
                  "sample": autoguide.init_to_sample, "feasible": autoguide.init_to_feasible}
    if isinstance(init_loc, dict):
        values = {site: torch.as_tensor(value, dtype=torch.get_default_dtype())
                  for site, value in init_loc.items()}
        return autoguide.init_to_value(values=values, fallback=autoguide.init_to_median)
    return strategies[init_loc]


def _positive(init_scale: float) -> float:
    if init_scale <= 0:
        raise ValueError("init_scale must be > 0")
    return init_scale
