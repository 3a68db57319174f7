"""Lower-variance gradient estimators for the losses in ``losses.py``: "sticking the landing"
for the ELBO (Roeder, Wu and Duvenaud 2017) and doubly reparameterised gradients for the
importance-weighted bound (Tucker, Lawson, Gu and Maddison 2018).

Both drop the score term of log q, the part of its gradient that comes from the variational
parameters at a fixed draw: its expectation is zero, but it is noisy, and where q is the
posterior it is all the noise there is. The draw keeps its reparameterised path. The score term
is cancelled by subtracting the guide's log density at the same draw held fixed (a second guide
run, conditioned on the detached draw) and adding it back detached. That reaches every
parameter a guide uses however it registers it: a ``PyroParam``, a plain ``nn.Parameter`` (the
low-rank guide's ``cov_factor``), or a ``pyro.module`` (an IAF's networks), where substituting
detached values for the parameter store's would miss the last two.
"""

from __future__ import annotations

import math

import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.distributions.score_parts import ScoreParts
from pyro.infer import RenyiELBO, Trace_ELBO
from pyro.infer.util import get_dependent_plate_dims, torch_sum
from pyro.poutine.util import site_is_subsample

SCORE_FREE = "score_free_log_prob"  # a guide site's log q with the score term cancelled


def check_reparameterised(guide_trace: poutine.Trace, estimator: str) -> None:
    """Refuse a guide the estimator does not apply to: it needs every draw reparameterised."""
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if site["infer"].get("enumerate"):
            raise ValueError(f"estimator {estimator!r} cannot sum out the guide's enumerated "
                             f"site {name!r}; use estimator 'reparam'")
        if not site["fn"].has_rsample:
            raise ValueError(f"estimator {estimator!r} needs reparameterised guide sites; "
                             f"{name!r} ({type(site['fn']).__name__}) is not")


def _is_point_mass(fn) -> bool:
    """Whether a site's distribution is a Delta, under any wrappers (Independent, masks)."""
    while not isinstance(fn, Delta) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, Delta)


def cancel_score(guide, guide_trace: poutine.Trace, args: tuple, kwargs: dict) -> None:
    """Give each guide site ``SCORE_FREE``: its log q, the same value, with the gradient of the
    draw's path only (Roeder et al. 2017). Point masses are left out: their log density at
    their own value has no score term (an autoguide's Delta carries only a log-Jacobian)."""
    sites = {name: site for name, site in guide_trace.nodes.items()
             if site["type"] == "sample" and not site_is_subsample(site)
             and not _is_point_mass(site["fn"])}
    fixed = {name: site["value"].detach() for name, site in sites.items()}
    held = poutine.trace(poutine.condition(guide, data=fixed)).get_trace(*args, **kwargs)
    held.compute_log_prob(site_filter=lambda name, site: name in sites)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if name in sites:
            score = held.nodes[name]["log_prob"]
            site[SCORE_FREE] = site["log_prob"] - score + score.detach()
        else:
            site[SCORE_FREE] = site["log_prob"]


class STLTrace_ELBO(Trace_ELBO):
    """Trace_ELBO with the "sticking the landing" gradient (Roeder, Wu and Duvenaud 2017):
    unbiased, and of zero variance where the guide is the exact posterior."""

    def _get_trace(self, model, guide, args, kwargs):
        """A particle's traces, with the guide's log q replaced by its score-free version."""
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        check_reparameterised(guide_trace, "stl")
        cancel_score(guide, guide_trace, args, kwargs)
        for site in guide_trace.nodes.values():
            if SCORE_FREE in site:
                log_q = site[SCORE_FREE]
                site["score_parts"] = ScoreParts(log_prob=log_q, score_function=0,
                                                 entropy_term=log_q)
                site["log_prob"], site["log_prob_sum"] = log_q, log_q.sum()
        return model_trace, guide_trace


class DReGRenyiELBO(RenyiELBO):
    """The importance-weighted bound (IWAE, RenyiELBO at alpha 0) with doubly reparameterised
    gradients for the guide (Tucker et al. 2018): the guide's gradient is
    sum_k w_k^2 d log w_k / dz_k dz_k / dphi with normalised weights w, whose signal-to-noise
    ratio does not fall as the number of particles K grows (plain IWAE's does, Rainforth et al.
    2018). The model's own parameters get the usual IWAE gradient, sum_k w_k d log w_k."""

    def __init__(self, **kwargs):
        super().__init__(alpha=0.0, **kwargs)

    def _get_trace(self, model, guide, args, kwargs):
        """A particle's traces, with each guide site's score-free log q beside its log q."""
        model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
        check_reparameterised(guide_trace, "dreg")
        cancel_score(guide, guide_trace, args, kwargs)
        return model_trace, guide_trace

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """-IWAE bound; backpropagates the DReG surrogate into the guide's parameters and the
        IWAE surrogate into the model's."""
        log_w, log_w_free, guide_params, model_params = [], [], set(), set()
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_p = _sum_sites(model_trace, "log_prob", dims)
            log_w.append(log_p - _sum_sites(guide_trace, "log_prob", dims))
            log_w_free.append(log_p - _sum_sites(guide_trace, SCORE_FREE, dims))
            guide_params |= _params(guide_trace)
            model_params |= _params(model_trace)
        model_params -= guide_params
        vectorised = self.vectorize_particles and self.num_particles > 1
        log_w, log_w_free = ((log_w[0], log_w_free[0]) if vectorised else
                             (torch.stack(log_w), torch.stack(log_w_free)))
        weights = torch.softmax(log_w.detach(), dim=0)
        loss = -(torch.logsumexp(log_w.detach(), dim=0) - math.log(self.num_particles)).sum()
        surrogates = [(-(weights.pow(2) * log_w_free).sum(), guide_params),
                      (-(weights * log_w).sum(), model_params)]
        surrogates = [(s, p) for s, p in surrogates if p and s.requires_grad]
        for i, (surrogate, params) in enumerate(surrogates):
            surrogate.backward(inputs=list(params), retain_graph=i + 1 < len(surrogates))
        return loss.item()


def _sum_sites(trace: poutine.Trace, key: str, dims: list[int]) -> torch.Tensor:
    """A trace's per-particle sum of ``key`` over its sample sites (plates summed out)."""
    total = 0.0
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            total = total + torch_sum(site[key], dims)
    return torch.as_tensor(total)


def _params(trace: poutine.Trace) -> set[torch.Tensor]:
    """The unconstrained leaf tensors of a trace's parameters, which the optimiser steps."""
    return {site["value"].unconstrained() for site in trace.nodes.values()
            if site["type"] == "param"}
