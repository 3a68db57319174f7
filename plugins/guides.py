"""Default guides (variational families)."""

from workbench import hookimpl


@hookimpl
def register_guides(register):
    register("beta", BetaGuide)
    register("auto_normal", auto_normal)


class BetaGuide:
    """A Beta for each latent site in (0, 1), parameters in log space (the seed's guide)."""

    def __init__(self, model, init_alpha: float = 15.0, init_beta: float = 15.0):
        if init_alpha <= 0 or init_beta <= 0:
            raise ValueError("init_alpha and init_beta must be > 0")
        self.model = model
        self.init = (init_alpha, init_beta)
        self.sites = None

    def __call__(self, *args, **kwargs):
        import pyro
        import pyro.distributions as dist
        import torch

        if self.sites is None:
            self.sites = self._find_sites(*args, **kwargs)
        for site, (alpha_name, beta_name, shape) in self.sites.items():
            log_alpha = pyro.param(alpha_name, lambda: torch.full(shape, float(self.init[0])).log())
            log_beta = pyro.param(beta_name, lambda: torch.full(shape, float(self.init[1])).log())
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


def auto_normal(model, init_scale: float = 0.1):
    """Pyro's AutoNormal: an independent Normal per latent site, in unconstrained space."""
    from pyro.infer.autoguide import AutoNormal

    return AutoNormal(model, init_scale=init_scale)
