"""Automatic non-centring for the gaussian stage (``reparam: auto``): a lever for funnels and
curved ridges.

A centred hierarchical model (``x ~ Normal(mu, tau)`` with ``tau`` itself a latent) has a
funnel-shaped posterior: no Gaussian fits its neck and its mouth at once, and its density
often has no mode. A site whose location bends with another latent (``x2 ~ Normal(-b x1^2,
1)``) lies along a curved ridge no Gaussian follows. The same model with those sites
non-centred (``x = mu + tau * z``, ``z ~ Normal(0, 1)``: Pyro's ``LocScaleReparam(centered=0)``
under ``poutine.reparam``) is the same posterior in coordinates where the funnel or the bend
is gone. A multivariate normal site whose covariance changes with another latent (a latent
Gaussian process ``f ~ MultivariateNormal(0, K(amplitude, lengthscale))``) is the same funnel in
many dimensions; it is non-centred as ``f = loc + L z``, ``z ~ Normal(0, 1)``, ``L`` its
covariance's Cholesky factor (``ScaleTrilReparam``). ``noncentred`` is that model as a
registered model component wrapping the user's.
The answer is the model as the user wrote it:
its trace keeps each reparameterised site under the user's name as a ``pyro.deterministic``
site marked as a latent site as written, which the report summarises, writes to posterior.nc
and plots as a latent site (``workbench.report.posterior.AS_WRITTEN``), and marks the
auxiliary ``<site>_decentered`` that the guide samples as a coordinate of the fit alone
(``AUXILIARY``): its density counts in the diagnostics, but no output shows it.
"""

from __future__ import annotations

import inspect
from typing import Any

from workbench import hookimpl

NAME = "noncentred"


@hookimpl
def register_models(register):
    register(NAME, noncentred)


def noncentred(of: dict, sites: list[str], device=None):
    """The model ``of`` (a recipe's model section) with ``sites`` non-centred
    (LocScaleReparam(centered=0)): the same posterior, without the funnel between a site and
    the latent scale it is drawn with."""
    from workbench.plugins.build import build
    from workbench.plugins.registry import get_registry

    if not sites or not all(isinstance(site, str) for site in sites):
        raise ValueError(f"sites must be a non-empty list of site names, got {sites!r}")
    inner = build(get_registry(), "model", of, device=device)
    return NonCentred(inner, list(sites))


class NonCentred:
    """The user's model under ``poutine.reparam``: called as the model is (its signature is
    the model's, so the data are checked against it), and offering what the model offers
    besides (its reference and exact posteriors, which speak of the user's sites)."""

    def __init__(self, model: Any, sites: list[str]):
        from pyro import poutine
        from pyro.infer.reparam import LocScaleReparam

        self.model, self.sites = model, sites

        def config(msg):  # each site's reparameteriser by its family
            if msg["name"] not in sites:
                return None
            if isinstance(_unwrapped(msg["fn"]), multivariate_families()):
                return ScaleTrilReparam()
            return LocScaleReparam(centered=0.0)

        self._reparameterised = _Deterministic(sites)(poutine.reparam(model, config=config))
        self.__signature__ = inspect.signature(model)

    def __call__(self, *args, **kwargs):
        return self._reparameterised(*args, **kwargs)

    def __getattr__(self, name: str):
        if name.startswith("__") or name in ("model", "sites", "_reparameterised"):
            raise AttributeError(name)
        return getattr(self.model, name)


def multivariate_families() -> tuple[type, ...]:
    """The multivariate distributions ``ScaleTrilReparam`` non-centres."""
    import torch

    return (torch.distributions.MultivariateNormal,)


def ScaleTrilReparam():
    """A reparameteriser of a MultivariateNormal site (inside any Independent wrappers):
    ``x = loc + scale_tril @ z``, ``z ~ Normal(0, 1)`` under ``<site>_decentered``, as
    LocScaleReparam(centered=0) does for a location-scale site (Pyro has none for it)."""
    import pyro
    import pyro.distributions as dist
    import torch
    from pyro.infer.reparam.reparam import Reparam

    class _ScaleTrilReparam(Reparam):
        def apply(self, msg):
            fn, event_dim = self._unwrap(msg["fn"])
            value, shape = msg["value"], fn.batch_shape + fn.event_shape
            standard = dist.Normal(fn.loc.new_zeros(()).expand(shape), 1.0).to_event(1)
            decentered = None
            if value is not None:  # differentiably inverted, as LocScaleReparam does
                decentered = torch.linalg.solve_triangular(
                    fn.scale_tril, (value - fn.loc).unsqueeze(-1), upper=False).squeeze(-1)
            decentered = pyro.sample(f"{msg['name']}_decentered",
                                     self._wrap(standard, event_dim), obs=decentered,
                                     infer={"is_observed": msg["is_observed"]})
            if value is None:
                value = fn.loc + (fn.scale_tril @ decentered.unsqueeze(-1)).squeeze(-1)
            return {"fn": dist.Delta(value, event_dim=event_dim).mask(False), "value": value,
                    "is_observed": True}

    return _ScaleTrilReparam()


def _Deterministic(sites: list[str]):
    """A handler that marks the reparameterised sites (which poutine.reparam records as
    observed Delta sites) as ``pyro.deterministic`` marks its sites, so that the report reads
    them as derived values, not as a likelihood, and as the latent sites of the model as
    written; and their ``<site>_decentered`` (LocScaleReparam's name) as auxiliary."""
    from pyro.poutine.messenger import Messenger

    from workbench.report.posterior import AS_WRITTEN, AUXILIARY

    auxiliary = {f"{site}_decentered" for site in sites}

    class Deterministic(Messenger):
        def _pyro_sample(self, msg):
            if msg["name"] in sites and msg["is_observed"]:
                msg["infer"] = {**msg["infer"], "_deterministic": True, AS_WRITTEN: True}
            elif msg["name"] in auxiliary and not msg["is_observed"]:
                msg["infer"] = {**msg["infer"], AUXILIARY: True}

    return Deterministic()


def section(model_section: dict, sites: list[str]) -> dict:
    """The recipe's model section of the user's model with ``sites`` non-centred."""
    return {"name": NAME, "of": dict(model_section), "sites": list(sites)}


def centred_sites(model: Any, data: dict) -> list[str]:
    """The model's latent location-scale sites over the real line whose scale depends on
    another latent site (the necks of its funnels) or whose location bends with one (a curved
    ridge), and its multivariate normal sites whose covariance depends on another. A location
    that moves linearly with other latents is a shear, which a Gaussian fits as it is: left
    centred."""
    import torch
    from pyro import poutine
    from pyro.infer.autoguide.initialization import InitMessenger

    from workbench.report.marginal import init_to_feasible  # a site it enumerates: a draw

    # a subsampling plate draws: torch's stream is put back, so the fits' paths stay as they were
    with torch.random.fork_rng(devices=[]):
        with torch.no_grad(), InitMessenger(init_to_feasible):
            first = poutine.trace(model).get_trace(**data)
        return _dependent(model, data, first)


def _dependent(model: Any, data: dict, first: Any) -> list[str]:
    """``centred_sites`` of the trace ``first`` (autograd through the model conditioned on the
    trace's latent values)."""
    import torch
    from pyro import poutine
    from pyro.poutine.util import site_is_subsample

    latent = {name: site["value"].detach().clone().requires_grad_(True)
              for name, site in first.nodes.items()
              if site["type"] == "sample" and not site["is_observed"]
              and not site_is_subsample(site) and torch.is_floating_point(site["value"])}
    if len(latent) < 2:
        return []
    found = []
    with torch.enable_grad():
        again = poutine.trace(poutine.condition(model, data=latent)).get_trace(**data)
        for name in latent:
            fn = _unwrapped(again.nodes[name]["fn"])
            if isinstance(fn, loc_scale_families()):
                scale = fn.scale
            elif isinstance(fn, multivariate_families()):
                scale = fn.scale_tril
            else:
                continue
            others = [value for other, value in latent.items() if other != name]
            if _depends_on(scale, others) or _bends_with(fn.loc, others):
                found.append(name)
    return found


def _depends_on(value: Any, others: list) -> bool:
    """Whether the tensor ``value`` is a function of any of the tensors ``others``."""
    import torch

    if not torch.is_tensor(value) or not value.requires_grad:
        return False
    grads = torch.autograd.grad(value.sum(), others, allow_unused=True, retain_graph=True)
    return any(grad is not None for grad in grads)


def _bends_with(value: Any, others: list) -> bool:
    """Whether ``value`` is a function of ``others`` that is not linear: its gradient is
    itself a function of them."""
    import torch

    if not torch.is_tensor(value) or not value.requires_grad:
        return False
    grads = torch.autograd.grad(value.sum(), others, allow_unused=True, retain_graph=True,
                                create_graph=True)
    return any(grad is not None and _depends_on(grad, others) for grad in grads)


def loc_scale_families() -> tuple[type, ...]:
    """The distributions LocScaleReparam non-centres: location-scale families over the real
    line (``x = loc + scale * z``, z from the family at loc 0 and scale 1, its other
    parameters such as StudentT's df kept), the ones Pyro's ``AutoReparam`` hands it (``loc``
    and ``scale`` among its parameters, real support), subclasses included. Not LogNormal or
    LogisticNormal (their support is not the real line), nor Stable (Pyro's StableReparam
    is its lever, and a copy of its parameters would drop its ``coords``)."""
    import pyro.distributions as dist
    import torch.distributions as torch_dist

    return (torch_dist.Normal, torch_dist.StudentT, torch_dist.Cauchy, torch_dist.Laplace,
            torch_dist.Gumbel, dist.Logistic, dist.SkewLogistic, dist.SoftLaplace,
            dist.AsymmetricLaplace, dist.SoftAsymmetricLaplace)


def _unwrapped(fn: Any) -> Any:
    """The distribution inside Independent wrappers (the ones LocScaleReparam sees through)."""
    import torch

    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return fn
