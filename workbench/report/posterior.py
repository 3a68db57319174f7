"""What a fitted guide says about each latent site, beside the exact posterior where known,
and whether to trust it (Pareto-smoothed importance sampling, Yao et al. 2018).

Three entry points, each called inside the run's device context and after training:

- ``summarize(guide, data, sites, nesting, exact, model=model)``: per site mean, sd, 5/50/95%
  quantiles and, where the model knows its posterior, the errors of mean and sd and
  KL(guide || exact); with the model, its ``pyro.deterministic`` sites too.
- ``diagnostics(model, guide, data, nesting)``: the PSIS k-hat of the guide as an importance
  proposal for the posterior, the effective sample size, and (when k-hat < 0.7) importance-
  weighted posterior means and sds per site.
- ``plot_sources(model, guide, data, sites, nesting, exact)``: per site, the prior, the guide
  and the exact posterior as distributions or draws, for ``workbench.report.plots``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np  # its broadcast_shapes: torch's imports sympy (0.4 s) at its first call
import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample

from workbench.errors import one_line
from workbench.report import broadcast, iw_error, marginal, sized_psis, thresholds

NUM_DRAWS = 10_000  # guide draws behind sampled moments, quantiles and Monte Carlo KL
NUM_IS_DRAWS = 10_000  # importance-sampling draws behind diagnostics()
MORE_DRAWS = 10  # times as many draws where an sd's tail is unbounded and drawing is cheap
MORE_DRAWS_WORK = 2**22  # at most this many numbers in MORE_DRAWS times the draws
NUM_PLOT_DRAWS = 4_000  # draws behind a density estimated from samples in a plot
QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}
DRAWS_PLATE = "_vibench_draws"
MAX_ELEMENTS = 2**24  # numbers in one vectorised trace: diagnostics() chunks its draws to fit


def latent_sites(trace: poutine.Trace) -> dict[str, torch.Size]:
    """The model's latent sample sites and their shapes, in the order the model samples them;
    not the discrete ones a loss sums out by enumeration, which no guide samples."""
    return {
        name: site["value"].shape
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        and not site["infer"].get("enumerate")
    }


def deterministic_sites(trace: poutine.Trace) -> dict[str, torch.Size]:
    """The model's ``pyro.deterministic`` sites and their shapes, in the order the model
    records them: functions of the latent sites, summarised over the same draws."""
    return {name: site["value"].shape for name, site in trace.nodes.items()
            if site["type"] == "sample" and site["infer"].get("_deterministic")}


# Marks (keys of a site's ``infer``) by which a model that wraps the user's says which of its
# sites are the model as the user wrote it (plugins/reparam.py's non-centred model sets
# them). AUXILIARY: a latent site that is only a coordinate the fit is done in (a
# ``<site>_decentered``): the guide samples it and the fit's density (k-hat, ELBO) counts it,
# but the report shows it nowhere. AS_WRITTEN: a ``pyro.deterministic`` site that is a latent
# site of the model as written: reported, written to posterior.nc and plotted as one.
AUXILIARY = "_vibench_auxiliary"
AS_WRITTEN = "_vibench_as_written"


def auxiliary_sites(trace: poutine.Trace) -> set[str]:
    """The latent sites of ``trace`` marked AUXILIARY: the fit's coordinates, not the
    model's parameters."""
    return {name for name, site in trace.nodes.items()
            if site["type"] == "sample" and site["infer"].get(AUXILIARY)}


def as_written_sites(trace: poutine.Trace) -> dict[str, torch.Size]:
    """The deterministic sites of ``trace`` marked AS_WRITTEN (latent sites of the model as
    written) and their shapes."""
    return {name: shape for name, shape in deterministic_sites(trace).items()
            if trace.nodes[name]["infer"].get(AS_WRITTEN)}


def shown(values: dict, trace: poutine.Trace) -> dict:
    """``values`` (keyed by site) without the auxiliary sites of ``trace``."""
    hidden = auxiliary_sites(trace)
    return {name: value for name, value in values.items() if name not in hidden}


def observed_sites(trace: poutine.Trace) -> dict[str, torch.Size]:
    """The model's observed sample sites (its likelihood, not its deterministic sites) and
    their shapes."""
    return {name: site["value"].shape for name, site in trace.nodes.items()
            if site["type"] == "sample" and site["is_observed"]
            and not site["infer"].get("_deterministic") and not site_is_subsample(site)}


@contextlib.contextmanager
def whole_data(minibatch: Any) -> Iterator[None]:
    """A minibatch run's subsampled plate (the model's and the guide's) made whole while the
    posterior is drawn: the batch is every index, so local sites come out at full size."""
    if minibatch.plate is None:
        yield
        return
    saved = minibatch.indices
    minibatch.indices = torch.arange(minibatch.size, device=minibatch.device)
    try:
        yield
    finally:
        minibatch.indices = saved


def plate_nesting(trace: poutine.Trace) -> int:
    """How many batch dimensions the model's plates use."""
    dims = [
        -frame.dim
        for site in trace.nodes.values()
        if site["type"] == "sample"
        for frame in site["cond_indep_stack"]
        if frame.vectorized and frame.dim is not None
    ]
    return max(dims, default=0)


# --------------------------------------------------------------------------------------------
# summarize


def summarize(
    guide: Callable,
    data: dict[str, Any],
    sites: dict[str, torch.Size],
    nesting: int,
    exact: dict[str, torch.distributions.Distribution] | None = None,
    num_draws: int = NUM_DRAWS,
    model: Callable | None = None,
) -> dict[str, dict[str, Any]]:
    """Per latent site, what the guide says and how far that is from the exact posterior;
    given the ``model``, per ``pyro.deterministic`` site too.

    Each entry has ``mean``, ``std``, ``method`` ("analytic": read off the guide's
    distribution; "sampled": over ``num_draws`` guide draws), ``q05``, ``q50``, ``q95``
    (the guide's quantiles: by the distribution's inverse CDF where it has one, else over the
    draws). Where ``exact`` gives the site's posterior it also has ``exact_mean``,
    ``exact_std``, ``mean_error`` (guide mean - exact mean), ``std_error`` (guide sd - exact
    sd), ``kl_method`` and, unless ``kl_method`` starts with "unavailable", ``kl``: KL(guide ||
    exact) over the whole site (summed over its elements: one number, in nats), in closed form
    ("closed_form") or as the mean of log q(z) - log p(z) over the guide draws ("monte_carlo",
    then with ``kl_se``, its standard error). KL needs the guide's own density of the site
    alone: a guide that samples the site from a distribution that does not depend on other
    draws, Pyro's AutoNormal, a Gaussian AutoContinuous guide (its marginal for the site), or
    any autoguide on a one-site model; otherwise, and for a point mass, it is unavailable.
    Each site's KL compares the guide's marginal for that site with the exact marginal: with
    several sites the numbers do not add up to the joint KL (correlations are not counted).

    A deterministic site's entry has ``mean``, ``std`` and the quantiles over the model
    replayed against guide draws (``method`` "sampled"), as ``deterministic_summary`` gives.
    The model's auxiliary sites (``AUXILIARY``) are left out.

    Values are floats for a scalar site, nested lists (the site's shape) otherwise. The draws
    are fewer than ``num_draws`` where draws x the sites' numbers would pass ``MAX_ELEMENTS``.
    """
    total = sum(math.prod(shape) for shape in sites.values()) or 1
    num_draws = max(min(num_draws, MAX_ELEMENTS // total), min(num_draws, 100))
    with torch.no_grad():
        fixed = _fixed_fns(guide, data, sites)
        moments = _analytic(guide, data, sites)
        draws, log_q = _guide_draws(guide, data, sites, nesting, num_draws, set(fixed))
        if moments is None:
            moments = {name: (_real(d).mean(0), _real(d).std(0), "sampled")
                       for name, d in draws.items()}
        summary = {}
        for name, (mean, std, method) in moments.items():
            entry: dict[str, Any] = {"mean": to_plain(mean), "std": to_plain(std),
                                     "method": method}
            for key, value in _quantiles(fixed.get(name), draws[name], sites[name]).items():
                entry[key] = to_plain(value)
            if exact and name in exact:
                target = exact[name]
                exact_mean, exact_std = target.mean, target.stddev
                entry["exact_mean"] = to_plain(exact_mean)
                entry["exact_std"] = to_plain(exact_std)
                entry["mean_error"] = to_plain(mean - exact_mean)
                entry["std_error"] = to_plain(std - exact_std)
                entry.update(_kl(fixed.get(name), draws[name], log_q[name], target))
            summary[name] = entry
        if model is not None:
            trace = site_trace(model, **data)
            summary.update(deterministic_summary(model, guide, data, nesting, num_draws,
                                                 trace, exact))
            summary = shown(summary, trace)
    return summary


def site_trace(model: Callable, *args: Any, **kwargs: Any) -> poutine.Trace:
    """The model run once, to learn its sites: at a draw from the prior, or, where the model
    cannot compute at that draw (an ARMA model's |theta| > 1 overflows its recursion), at the
    centre of each latent site's support (0 unconstrained: where fits start by default).
    Raises the first failure when both fail."""
    from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible

    try:
        return poutine.trace(model).get_trace(*args, **kwargs)
    except Exception as exc:
        try:
            with InitMessenger(init_to_feasible):
                return poutine.trace(model).get_trace(*args, **kwargs)
        except Exception:
            raise exc from None


def deterministic_summary(model: Callable, guide: Callable, data: dict, nesting: int,
                          num_draws: int = NUM_DRAWS, trace: poutine.Trace | None = None,
                          exact: dict | None = None) -> dict[str, dict[str, Any]]:
    """Per ``pyro.deterministic`` site of the model: ``mean``, ``std``, ``method``
    ("sampled") and the quantiles, over the model replayed against guide draws (fewer than
    ``num_draws`` where draws x the model's numbers would pass ``MAX_ELEMENTS``); where
    ``exact`` gives the site's posterior (a latent site of the model as written, say), its
    moments and the errors as ``summarize`` has them. ``trace``: the model run once."""
    trace = site_trace(model, **data) if trace is None else trace
    sites = deterministic_sites(trace)
    if not sites:
        return {}
    per_draw = trace_numbers(trace)
    num_draws = max(min(num_draws, MAX_ELEMENTS // per_draw), min(num_draws, 100))
    parts: dict[str, list] = {name: [] for name in sites}
    for n, _, model_trace in replayed(model, guide, data, nesting, num_draws, per_draw,
                                      predictive=False):
        for name, shape in sites.items():
            parts[name].append(draws_of(model_trace.nodes[name]["value"], n, shape))
    summary = {}
    for name, chunks in parts.items():
        draws = torch.cat(chunks)
        entry: dict[str, Any] = {"mean": to_plain(draws.double().mean(0).to(draws.dtype)),
                                 "std": to_plain(draws.double().std(0).to(draws.dtype)),
                                 "method": "sampled"}
        for key, value in zip(QUANTILES, quantiles(draws, list(QUANTILES.values()))):
            entry[key] = to_plain(value)
        if exact and name in exact:
            mean, std = _real(draws).mean(0), _real(draws).std(0)
            entry.update(exact_mean=to_plain(exact[name].mean),
                         exact_std=to_plain(exact[name].stddev),
                         mean_error=to_plain(mean - exact[name].mean),
                         std_error=to_plain(std - exact[name].stddev))
        summary[name] = entry
    return summary


def trace_numbers(trace: poutine.Trace) -> int:
    """How many numbers one trace's sample sites hold: what one more draw of it costs."""
    return max(1, sum(site["value"].numel() for site in trace.nodes.values()
                      if site["type"] == "sample" and torch.is_tensor(site["value"])))


def replayed(model: Callable | None, guide: Callable, data: dict, nesting: int,
             num_draws: int, per_draw: int, predictive: bool = True
             ) -> Iterator[tuple[int, poutine.Trace, poutine.Trace | None]]:
    """``num_draws`` guide draws, each with the model replayed against it, as ``(n, guide
    trace, model trace)``: vectorised under a plate of n draws, in chunks of at most
    ``MAX_ELEMENTS`` numbers (``per_draw`` a draw); one trace per draw (a tenth as many, n = 1)
    where the guide cannot be vectorised. No model trace without a ``model``. A model that
    does not broadcast over draws (``workbench.report.broadcast``) is replayed draw by draw
    against the vectorised guide trace (on fewer draws where that is a loop); its trace has
    each observed site's replicates and pointwise density only where ``predictive``."""
    way = None if model is None else broadcast.verdict(model, data, nesting)
    if way is not None and not way.broadcasts:
        num_draws = way.draws(num_draws)
    chunk = max(1, min(num_draws, MAX_ELEMENTS // max(per_draw, 1)))
    try:
        first = _replay(model, guide, data, min(chunk, num_draws), nesting, way, predictive)
    except (RuntimeError, ValueError, NotImplementedError, IndexError):
        for _ in range(max(1, num_draws // 10)):
            yield (1, *_replay(model, guide, data))
        return
    yield first
    for start in range(chunk, num_draws, chunk):
        yield _replay(model, guide, data, min(chunk, num_draws - start), nesting, way,
                      predictive)


def _replay(model: Callable | None, guide: Callable, data: dict, n: int | None = None,
            nesting: int = 0, way: broadcast.Verdict | None = None,
            predictive: bool = True) -> tuple:
    """One guide trace (under a plate of ``n`` draws, unless n is None) and the model replayed
    against it (draw by draw where ``way`` says the model does not broadcast)."""
    plate = (pyro.plate(DRAWS_PLATE, n, dim=-(nesting + 1)) if n is not None
             else contextlib.nullcontext())
    with plate:
        guide_trace = poutine.trace(guide).get_trace(**data)
        if model is None or (n is not None and way is not None and not way.broadcasts):
            model_trace = None
        else:
            model_trace = poutine.trace(
                poutine.replay(model, trace=guide_trace)).get_trace(**data)
    if model is not None and model_trace is None:
        model_trace = broadcast.replay(model, guide_trace, data, n, nesting, way,
                                       site_trace(model, **data), predictive)
    return (guide_trace, model_trace) if n is None else (n, guide_trace, model_trace)


def draws_of(value: torch.Tensor, n: int, shape: torch.Size) -> torch.Tensor:
    """A vectorised site's value as ``(n, *shape)``; a value that is the same for every draw
    (it depends on no draw) is repeated."""
    if value.numel() == n * math.prod(shape):
        return value.reshape(n, *shape)
    return value.reshape(1, *shape).expand(n, *shape)


def _real(draws: torch.Tensor) -> torch.Tensor:
    """Draws as floating point, keeping a float64 run's precision."""
    return draws if draws.is_floating_point() else draws.float()


def _analytic(guide: Callable, data: dict, sites: dict) -> dict | None:
    """Each site's mean and sd read off the guide's distributions, when every site has them
    and they do not change between two runs of the guide (no site depends on another's draw)."""
    first, second = (poutine.trace(guide).get_trace(**data) for _ in range(2))
    moments = {}
    for name in sites:
        if name not in first.nodes or name not in second.nodes:
            return None
        fns = first.nodes[name]["fn"], second.nodes[name]["fn"]
        if any(isinstance(fn, Delta) for fn in fns):
            return None
        try:
            means = [fn.mean for fn in fns]
            stds = [fn.stddev for fn in fns]
        except NotImplementedError:
            return None
        if not (torch.equal(*means) and torch.equal(*stds)):
            return None
        moments[name] = (means[0], stds[0], "analytic")
    return moments


def _fixed_fns(fn_owner: Callable, data: dict, sites: dict) -> dict:
    """The sites that ``fn_owner`` (a guide or a model) samples from one fixed distribution
    (not a point mass, not depending on any other draw), each with that distribution: two
    runs give the same density at the same value."""
    first, second = (poutine.trace(fn_owner).get_trace(**data) for _ in range(2))
    fixed = {}
    for name in sites:
        if name not in first.nodes or name not in second.nodes:
            continue
        one, two = first.nodes[name]["fn"], second.nodes[name]["fn"]
        if isinstance(one, Delta) or isinstance(two, Delta):
            continue
        value = first.nodes[name]["value"]
        try:
            same = torch.equal(one.log_prob(value), two.log_prob(value))
        except (NotImplementedError, ValueError, RuntimeError):
            continue
        if same:
            fixed[name] = one
    return fixed


class _NoDensity(Exception):
    """The guide's density of one site alone is not available; the message says why."""


def _guide_draws(guide: Callable, data: dict, sites: dict, nesting: int, num_draws: int,
                 fixed: set[str] = frozenset()) -> tuple[dict, dict]:
    """Draws of each site from the guide, shaped ``(num_draws, *site shape)``, and each draw's
    log density under the guide's marginal for that site (a ``(num_draws,)`` tensor, or the
    reason it is unavailable; ``fixed``: the sites the guide samples from a distribution that
    does not depend on other draws). One guide trace under a plate of draws where the guide
    allows, else one trace per draw (a tenth as many)."""
    try:
        with pyro.plate(DRAWS_PLATE, num_draws, dim=-(nesting + 1)):
            trace = poutine.trace(guide).get_trace(**data)
        draws = {name: trace.nodes[name]["value"].reshape(num_draws, *shape)
                 for name, shape in sites.items()}
        log_q = {name: _log_q_or_reason(trace, name, guide, sites, num_draws, nesting, fixed)
                 for name in sites}
    except (RuntimeError, ValueError, NotImplementedError):
        traces = [poutine.trace(guide).get_trace(**data) for _ in range(max(1, num_draws // 10))]
        draws = {name: torch.stack([t.nodes[name]["value"] for t in traces]) for name in sites}
        log_q = {}
        for name in sites:
            parts = [_log_q_or_reason(t, name, guide, sites, 1, nesting, fixed)
                     for t in traces]
            bad = next((p for p in parts if isinstance(p, str)), None)
            log_q[name] = bad if bad is not None else torch.cat(parts)
    return draws, log_q


def _log_q_or_reason(trace, name, guide, sites, n, nesting, fixed) -> torch.Tensor | str:
    try:
        return _site_log_q(trace, name, guide, sites, n, nesting, fixed)
    except _NoDensity as exc:
        return one_line(exc)
    except (NotImplementedError, ValueError, RuntimeError) as exc:
        return f"the guide's density of the site failed: {one_line(exc)}"


def _site_log_q(trace: poutine.Trace, name: str, guide: Callable, sites: dict, n: int,
                nesting: int, fixed: set[str]) -> torch.Tensor:
    """Log density of each draw of one site under the guide's marginal for that site.

    A site the guide samples from a distribution that does not depend on other draws (one of
    ``fixed``): that distribution's log_prob; from one that does, the marginal is unknown (its
    log_prob is a conditional density). An autoguide's site is a Delta whose
    log_prob is the log |Jacobian| of the map from its unconstrained auxiliary draw; add the
    auxiliary's density: AutoNormal's ``<site>_unconstrained``, the whole auxiliary latent for
    a one-site model, or the site's slice of a Gaussian AutoContinuous's latent (its
    marginal). Raises ``_NoDensity`` otherwise."""
    site = trace.nodes[name]
    fn, value = site["fn"], site["value"]
    if not isinstance(fn, Delta):
        if name in fixed:
            return _per_draw(fn.log_prob(value), n, nesting)
        raise _NoDensity("the guide's distribution for this site depends on other draws, so "
                         "its marginal density is not known")
    auxiliaries = {k: s for k, s in trace.nodes.items()
                   if s["type"] == "sample" and s["infer"].get("is_auxiliary")}
    if not auxiliaries:
        raise _NoDensity("the guide is a point mass at this site: it has no density")
    jacobian = _per_draw(fn.log_prob(value), n, nesting)
    own = auxiliaries.get(f"{name}_unconstrained")
    if own is not None:
        return jacobian + _per_draw(own["fn"].log_prob(own["value"]), n, nesting)
    from pyro.infer.autoguide import AutoContinuous

    if isinstance(guide, AutoContinuous) and len(auxiliaries) == 1:
        (aux,) = auxiliaries.values()
        if len(sites) == 1:
            return jacobian + _per_draw(aux["fn"].log_prob(aux["value"]), n, nesting)
        return jacobian + _gaussian_slice_log_prob(guide, name, aux["value"], n)
    raise _NoDensity("the guide's density of this site alone is not known (its auxiliary "
                     "draw is shared with other sites)")


def _latent_slice(guide: Any, name: str) -> slice | None:
    """Where a site's unconstrained values sit in an AutoContinuous guide's flat latent."""
    start = 0
    for other, _ in guide.prototype_trace.iter_stochastic_nodes():
        size = math.prod(guide._unconstrained_shapes[other])
        if other == name:
            return slice(start, start + size)
        start += size
    return None


class _Marginal(torch.distributions.TransformedDistribution):
    """A Normal pushed through a site's bijection, keeping the site's own support (the
    composed transform's codomain can read as the whole real line)."""

    def __init__(self, base: Any, transform: Any, support: Any):
        super().__init__(base, [transform], validate_args=False)
        self._support = support

    @property
    def support(self) -> Any:
        return self._support


def guide_marginal(guide: Any, name: str) -> torch.distributions.Distribution | None:
    """A Gaussian autoguide's exact marginal for one site, in the site's own (constrained)
    space: its unconstrained Normal, per element, pushed through the site's elementwise
    bijection (exp for a positive site, ...). None for other guides and for sites whose
    bijection mixes elements (a simplex, an ordered vector): those get draws."""
    from pyro.infer.autoguide import AutoContinuous, AutoNormal
    from torch.distributions import Normal, biject_to
    from torch.distributions.transforms import IndependentTransform

    try:
        site = guide.prototype_trace.nodes[name]
        transform = biject_to(site["fn"].support)
        while isinstance(transform, IndependentTransform):
            transform = transform.base_transform
        if transform.domain.event_dim or transform.codomain.event_dim:
            return None
        shape = site["value"].shape
        if isinstance(guide, AutoNormal):
            loc, scale = guide._get_loc_and_scale(name)
        elif isinstance(guide, AutoContinuous):
            posterior, part = guide.get_posterior(), _latent_slice(guide, name)
            if part is None or not hasattr(posterior, "variance"):
                return None
            loc, scale = posterior.mean[part], posterior.variance[part].sqrt()
        else:
            return None
        if loc.numel() != math.prod(shape):
            return None
        base = Normal(loc.detach().reshape(shape), scale.detach().reshape(shape))
        support = site["fn"].support
        while hasattr(support, "base_constraint"):
            support = support.base_constraint
        return _Marginal(base, transform, support)
    except (AttributeError, KeyError, NotImplementedError, RuntimeError, ValueError):
        return None


def _gaussian_slice_log_prob(guide: Any, name: str, latent: torch.Tensor, n: int
                             ) -> torch.Tensor:
    """The log density of a site's slice of a Gaussian AutoContinuous latent under the
    Gaussian's marginal for that slice."""
    posterior = guide.get_posterior()
    part = _latent_slice(guide, name)
    if part is None:
        raise _NoDensity(f"site {name!r} is not in the guide's latent")
    draws = latent.reshape(n, -1)[:, part]
    base = posterior.base_dist if isinstance(posterior, torch.distributions.Independent) \
        else posterior
    if isinstance(base, torch.distributions.Normal) and base.batch_shape[-1:] == latent.shape[-1:]:
        return torch.distributions.Normal(base.loc[part], base.scale[part]).log_prob(draws).sum(-1)
    if isinstance(posterior, (torch.distributions.MultivariateNormal,
                              torch.distributions.LowRankMultivariateNormal)):
        covariance = posterior.covariance_matrix[part, part]
        return torch.distributions.MultivariateNormal(
            posterior.loc[part], covariance_matrix=covariance).log_prob(draws)
    raise _NoDensity(f"the guide's joint ({type(posterior).__name__}) has no known marginal "
                     "for one site of several")


def _per_draw(log_prob: torch.Tensor | float, n: int, nesting: int) -> torch.Tensor:
    """A vectorised site's log-density summed over everything but the draws dimension (at
    ``-(nesting + 1)``), as a ``(n,)`` tensor."""
    log_prob = torch.as_tensor(log_prob)
    dims = nesting + 1
    if log_prob.dim() > dims:
        raise ValueError(f"log-density of shape {tuple(log_prob.shape)} has more than "
                         f"{dims} batch dims")
    log_prob = log_prob.reshape((1,) * (dims - log_prob.dim()) + log_prob.shape)
    return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(n)


def _quantiles(fn: Any, draws: torch.Tensor, shape: torch.Size) -> dict[str, torch.Tensor]:
    """The guide's quantiles: its distribution's inverse CDF where it has one and does not
    depend on other draws, else over the draws."""
    if fn is not None:
        base = fn
        while isinstance(base, torch.distributions.Independent):
            base = base.base_dist
        try:
            return {key: base.icdf(torch.tensor(q, dtype=draws.dtype, device=draws.device)
                                   ).expand(shape).clone()
                    for key, q in QUANTILES.items()}
        except (NotImplementedError, AttributeError, RuntimeError, ValueError):
            pass
    return dict(zip(QUANTILES, quantiles(draws, list(QUANTILES.values()))))


def quantiles(draws: torch.Tensor, qs: list[float]) -> list[torch.Tensor]:
    """Quantiles over the first dimension of ``draws`` (linear interpolation, as
    ``torch.quantile``, without its limit on the tensor's size)."""
    ordered = draws.double().sort(0).values
    last = ordered.shape[0] - 1
    out = []
    for q in qs:
        position = q * last
        low = int(math.floor(position))
        high = min(low + 1, last)
        frac = position - low
        out.append((ordered[low] * (1 - frac) + ordered[high] * frac).to(draws.dtype))
    return out


def _kl(fn: Any, draws: torch.Tensor, log_q: torch.Tensor | str,
        target: torch.distributions.Distribution) -> dict[str, Any]:
    """KL(guide || exact) for one site: closed form where both are plain distributions with a
    registered KL, else Monte Carlo over the guide draws."""
    if fn is not None:
        try:
            kl = torch.distributions.kl_divergence(fn, target).sum()
            if torch.isfinite(kl):  # >= 0: below it is rounding (float32 lgammas cancelling)
                return {"kl": max(kl.item(), 0.0), "kl_method": "closed_form"}
        except (NotImplementedError, ValueError, RuntimeError):
            pass
    if isinstance(log_q, str):
        return {"kl_method": f"unavailable: {log_q}"}
    try:
        log_p = target.log_prob(draws)
    except (ValueError, RuntimeError) as exc:
        return {"kl_method": f"unavailable: the exact posterior's density failed: "
                                  f"{one_line(exc)}"}
    log_p = log_p.reshape(draws.shape[0], -1).sum(-1)
    diff = (log_q.double() - log_p.double())
    if not torch.isfinite(diff).all():
        return {"kl_method": "unavailable: a guide draw has zero exact density (or the guide "
                             "zero density), so the estimate is not finite"}
    kl = diff.mean().item()
    se = (diff.std() / math.sqrt(diff.numel())).item() if diff.numel() > 1 else float("nan")
    return {"kl": kl, "kl_se": se, "kl_method": "monte_carlo"}


# --------------------------------------------------------------------------------------------
# diagnostics


def diagnostics(model: Callable, guide: Callable, data: dict[str, Any], nesting: int,
                num_draws: int = NUM_IS_DRAWS) -> dict[str, Any]:
    """Did it work? The guide as an importance sampler for the posterior (Yao, Vehtari,
    Simpson and Gelman 2018, "Yes, but did it work?: Evaluating variational inference").

    With ``num_draws`` guide draws z and log weights log p(x, z) - log q(z) (the model replayed
    against one vectorised guide trace), returns::

        {"khat": float,           # Pareto k-hat of the weights' tail
         "reading": str,          # "good" (< 0.5), "ok" (0.5-0.7) or "bad: do not trust" (> 0.7)
         "ess": float,            # effective sample size of the normalised weights, 1/sum w^2
         "ess_fraction": float,   # ess / num_draws
         "num_draws": int,
         "elbo": float,           # mean log weight: an estimate of the ELBO, and its
         "elbo_se": float,        #   Monte Carlo standard error
         "log_evidence": float,   # log mean exp of the log weights: log p(x) by importance
         "log_evidence_se": float,  # sampling, and its standard error (delta method)
         "sites": {SITE: {"iw_mean": ..., "iw_std": ..., "iw_mean_mcse": ...,
                          "iw_std_mcse": ..., "iw_std_khat": ...}}}   # only when khat < 0.7

    ``elbo`` and ``log_evidence`` are one yardstick for every fit, whatever loss trained it:
    the same draws, the same estimators. The log evidence estimate is below log p(x) in
    expectation, and its standard error means something only while the weights' variance is
    finite, which a k-hat over 0.7 says it is not.

    ``iw_mean`` and ``iw_std`` are self-normalised importance-weighted estimates of the
    posterior's mean and sd, with Pareto-smoothed weights (PSIS); floats for a scalar site,
    nested lists otherwise; beside them their Monte Carlo standard errors and the k-hat of
    the sd's tail (workbench/report/iw_error.py). When the diagnostic cannot be computed the
    result is ``{"khat": None, "reason": str}``: a model with sites enumerated sequentially, a
    guide that cannot be vectorised, a point-mass guide (no density), a guide that leaves
    latent sites to the model, or non-finite weights.

    Pass the model itself (not wrapped for minibatches) and the guide that ``summarize`` got.
    """
    with torch.no_grad():
        single = _weighable_trace(model, data)
        if isinstance(single, str):
            return {"khat": None, "reason": single}
        way = broadcast.verdict(model, data, nesting, single)
        if marginal.enumerated_sites(single) and way.method == broadcast.VMAP:
            way = dataclasses.replace(way, method=broadcast.LOOP, why_not_vmap=(
                "the sum over its enumerated sites is one run of the model a draw"))
        plan = _draw_plan(model, guide, data, nesting, single, way, num_draws)
        if isinstance(plan, dict):  # a subsampled likelihood's answer, or why there is none
            return _shown_sites(plan, single)
        draws, sized = plan
        result, log_w = _psis_draws(model, guide, data, nesting, single, way, draws, num_draws)
        why = _more_pay(result, single, draws) if not sized and way.broadcasts else ""
        if why:
            result, log_w = _psis_draws(model, guide, data, nesting, single, way,
                                        draws * MORE_DRAWS, num_draws)
            result["more_draws"] = (f"PSIS on {draws * MORE_DRAWS} draws, {MORE_DRAWS} times "
                                    f"{draws}: on those {why}")
        result = _shown_sites(result, single)
    if sized and log_w is not None and result.get("khat") is not None:
        result["khat_se"] = sized_psis.draws_khat_se(log_w.detach().double().cpu())
        result["sized"] = sized
    return result


def _more_pay(result: dict[str, Any], single: poutine.Trace, draws: int) -> str:
    """Why ``MORE_DRAWS`` times the ``draws`` are worth taking, or "": the draws are a good
    importance sampler but the tail of some site's squared deviations has a k-hat over
    ``thresholds.KHAT_TRUSTED`` (a funnel's x, a Student-t's), so that sd is not pinned down
    and more draws narrow it (a funnel's sds: within +-20% on 72% of 40,000 exact draws, 93%
    of 400,000); and the model is small enough that they cost a fraction of a second
    (``MORE_DRAWS_WORK``: by its size, not a clock, so that a seed gives one answer)."""
    khat = result.get("khat")
    if not thresholds.sd_caution_only(khat) or "sites" not in result or \
            draws * MORE_DRAWS * sized_psis.draw_numbers(single) > MORE_DRAWS_WORK:
        return ""
    worst, label = thresholds.KHAT_TRUSTED, ""
    for site, entry in result["sites"].items():
        for i, k in enumerate(iw_error.flat(entry.get("iw_std_khat"))):
            if k > worst:  # labelled as iw_error.verdict labels them
                worst, label = k, site if not isinstance(entry["iw_std"], list) else f"{site}[{i}]"
    if not label:
        return ""
    return (f"the squared deviations of {label} had a tail k-hat of {worst:.2f} > "
            f"{thresholds.KHAT_TRUSTED}")


def _shown_sites(result: dict[str, Any], trace: poutine.Trace) -> dict[str, Any]:
    """``diagnostics``' result with the importance-weighted moments of the shown sites only."""
    if "sites" in result:
        result["sites"] = shown(result["sites"], trace)
    return result


def _weighable_trace(model: Callable, data: dict) -> poutine.Trace | str:
    """The model traced once, or why its draws cannot be weighed: it fails, or it marks
    sites for sequential enumeration (summed here only in parallel)."""
    try:
        single = site_trace(model, **data)
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"the model failed: {broadcast.described(exc, model)}"
    sequential = marginal.sequential_sites(single)
    if sequential:
        return ("the model enumerates site(s) " + ", ".join(repr(n) for n in sequential)
                + " sequentially; the weights sum out only parallel enumeration, as Pyro")
    return single


def _draw_plan(model: Callable, guide: Callable, data: dict, nesting: int,
               single: poutine.Trace, way: broadcast.Verdict,
               num_draws: int) -> tuple[int, str] | dict[str, Any]:
    """How many draws PSIS takes, and the line saying how they were sized ("" where as
    asked): fewer where the draws outgrow ``sized_psis.WORK`` or the model takes them one
    run each. Or the whole diagnostics, where a subsampled likelihood gave them (or why
    there are none)."""
    asked, sized = num_draws, ""
    if num_draws * sized_psis.draw_numbers(single) > sized_psis.WORK:
        if marginal.enumerated_sites(single):  # subsampling rows would split their sum
            found = "the model sums out discrete sites by enumeration"
        elif way.broadcasts:
            found, precision = _widened(guide, data, lambda wide_data: (
                sized_psis.subsampled(model, guide, wide_data, nesting, single, num_draws)))
            if isinstance(found, dict):
                return {**found, "precision": precision}
        else:  # subsampling rows replays the model vectorised
            found = "the model does not broadcast over draws"
        num_draws, sized = sized_psis.fewer_draws(single, num_draws, found)
        if not num_draws:
            return {"khat": None, "reason": sized}
    if way.draws(num_draws) < num_draws:
        num_draws = way.draws(num_draws)
        sized = (f"PSIS on {num_draws} of {asked} draws: the model does not broadcast over "
                 "draws, so each is one run of it")
    return num_draws, sized


def _psis_draws(model: Callable, guide: Callable, data: dict, nesting: int,
                single: poutine.Trace, way: broadcast.Verdict, num_draws: int,
                asked: int) -> tuple[dict[str, Any], torch.Tensor | None]:
    """PSIS over ``num_draws`` guide draws (``asked`` were asked for), in chunks whose
    tensors (draws x the model's largest site x its enumerated sites' values) stay within
    MAX_ELEMENTS numbers; with the log weights, or None where the draws could not be
    weighed."""
    per_draw = max((site["value"].numel() for site in single.nodes.values()
                    if site["type"] == "sample" and torch.is_tensor(site["value"])),
                   default=1) * marginal.enumerated_size(single)
    chunk = max(1, min(num_draws, MAX_ELEMENTS // max(per_draw, 1)))
    sites = latent_sites(single)
    derived = deterministic_sites(single)  # weighed too: e.g. eight schools' theta
    try:
        # unvalidated: a draw outside an observed site's support (its parameter past the
        # data) is weighed -inf, not an error for them all; and the arguments training
        # checked are not checked again for every draw (a covariance's Cholesky, say)
        with pyro.validation_enabled(False):
            found, precision = _widened(guide, data, lambda wide_data: _weigh(
                model, guide, wide_data, nesting, num_draws, chunk, sites, derived, way,
                single))
    except (RuntimeError, ValueError, NotImplementedError, IndexError) as exc:
        how = "vectorised" if way.broadcasts else "draw by draw"
        return {"khat": None, "reason": f"the guide and model cannot be run {how} over "
                                        f"{num_draws} draws: "
                                        f"{broadcast.described(exc, model)}"}, None
    if isinstance(found, str):
        return {"khat": None, "reason": found}, None
    log_w, draws = found
    result = weighed(log_w, draws, sites, num_draws)
    result["precision"] = precision
    if not way.broadcasts:
        result["per_draw"] = way.report_cost(asked)
    return result, log_w


def _weigh(model: Callable, guide: Callable, data: dict, nesting: int, num_draws: int,
           chunk: int, sites: dict, derived: dict, way: broadcast.Verdict,
           single: poutine.Trace) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | str:
    """The log importance weights of ``num_draws`` guide draws (in chunks of ``chunk``) and
    the draws of each latent and deterministic site; or why the guide cannot be weighed. A
    model that does not broadcast (``way``) is replayed draw by draw (``single``: it run
    once)."""
    enumerated = marginal.enumerated_sites(single)
    if enumerated:  # their values, summed out, are no draw's
        derived = {}
    log_ws, parts = [], {name: [] for name in {**sites, **derived}}
    per_draw = trace_numbers(single)
    for start in range(0, num_draws, chunk):
        n = min(chunk, num_draws - start)
        with pyro.plate(DRAWS_PLATE, n, dim=-(nesting + 1)):
            guide_trace = poutine.trace(guide).get_trace(**data)
        missing = [name for name in sites if name not in guide_trace.nodes]
        if missing:
            return "the guide does not sample " + ", ".join(repr(name) for name in missing)
        log_p = []
        if enumerated:
            log_p.append(summed_out(model, guide_trace, data, n, nesting, way, sites))
        for m, part in ([] if enumerated else draw_slices(guide_trace, n, nesting, per_draw)):
            if way.broadcasts:
                with pyro.plate(DRAWS_PLATE, m, dim=-(nesting + 1)):
                    model_trace = poutine.trace(
                        poutine.replay(model, trace=part)).get_trace(**data)
            else:
                model_trace = broadcast.replay(model, part, data, m, nesting, way, single,
                                               predictive=False)
            log_p.append(log_joint(model_trace, m, nesting))
            for name, shape in derived.items():
                parts[name].append(model_trace.nodes[name]["value"].reshape(m, *shape))
        log_ws.append(torch.cat(log_p) - log_joint(guide_trace, n, nesting))
        for name, shape in sites.items():
            parts[name].append(guide_trace.nodes[name]["value"].reshape(n, *shape))
    return torch.cat(log_ws), {name: torch.cat(chunks) for name, chunks in parts.items()}


def summed_out(model: Callable, guide_trace: poutine.Trace, data: dict, n: int, nesting: int,
                way: broadcast.Verdict, sites: dict) -> torch.Tensor:
    """log p(data, z) of a vectorised guide trace's ``n`` draws, the model's enumerated sites
    summed out: in one run under the draws plate, or one run a draw (``way``)."""
    return summed_likelihood(model, guide_trace, data, n, nesting, way, sites, {})[0]


def summed_likelihood(model: Callable, guide_trace: poutine.Trace, data: dict, n: int,
                      nesting: int, way: broadcast.Verdict, sites: dict, observed: dict
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | str]:
    """``summed_out``'s log p(data, z) of each draw and, from the same run of the model, each
    ``observed`` site's pointwise log density ``(n, *batch)`` with the enumerated sites summed
    out (``marginal.pointwise``), or why that does not split by observation."""
    if way.broadcasts:
        with pyro.plate(DRAWS_PLATE, n, dim=-(nesting + 1)):
            model_trace = poutine.trace(marginal.enumerated(
                poutine.replay(model, trace=guide_trace), nesting + 1)).get_trace(**data)
        log_p = marginal.log_density(model_trace, DRAWS_PLATE, n)
        found = marginal.pointwise(model_trace, list(observed))
        if isinstance(found, str):
            return log_p, found
        return log_p, {name: draws_of(value, n, _batch(model_trace.nodes[name], observed[name]))
                       for name, value in found.items()}
    draws = {name: draws_of(guide_trace.nodes[name]["value"], n, shape)
             for name, shape in sites.items()}
    log_ps, parts = [], []
    for i in range(n):
        one = poutine.condition(model, data={name: d[i] for name, d in draws.items()})
        model_trace = poutine.trace(marginal.enumerated(one, nesting)).get_trace(**data)
        log_ps.append(marginal.log_density(model_trace))
        parts.append(marginal.pointwise(model_trace, list(observed)))
    if isinstance(parts[0], str):
        return torch.stack(log_ps), parts[0]
    return torch.stack(log_ps), {
        name: torch.stack([part[name].reshape(_batch(model_trace.nodes[name], shape))
                           for part in parts]) for name, shape in observed.items()}


def _batch(site: dict, shape: torch.Size) -> torch.Size:
    """An observed site's shape without its event dims: its pointwise density's."""
    return shape[:len(shape) - site["fn"].event_dim]


SLICE_NUMBERS = 2**21  # numbers a draw slice's model tensors hold (16 MB in float64)


def draw_slices(trace: poutine.Trace, n: int, nesting: int, per_draw: int
                ) -> Iterator[tuple[int, poutine.Trace]]:
    """A vectorised guide trace of ``n`` draws as traces of at most ``SLICE_NUMBERS //
    per_draw`` draws each, to replay the model on: each sample site's value narrowed along
    the draws dim (a value without that dim as it is). The model's tensors of draws x rows
    then stay under glibc's 32 MB ceiling for reusing freed memory, where each larger one
    is fresh memory the kernel pages in: the same numbers, in about half the time."""
    step = max(1, SLICE_NUMBERS // max(per_draw, 1))
    if step >= n:
        yield n, trace
        return
    for start in range(0, n, step):
        m = min(step, n - start)
        part = poutine.Trace()
        for name, site in trace.nodes.items():
            if site["type"] != "sample":
                continue
            value = site["value"]
            dim = value.dim() - getattr(site["fn"], "event_dim", 0) - nesting - 1 \
                if torch.is_tensor(value) else -1
            if dim >= 0 and value.shape[dim] == n:
                value = value.narrow(dim, start, m)
            part.add_node(name, type="sample", name=name, value=value, fn=site["fn"],
                          is_observed=site["is_observed"], infer=site["infer"])
        yield m, part


_DTYPE_CLASH = re.compile(r"dtype|Double|Float|Half")


def _widened(guide: Callable, data: dict, compute: Callable[[dict], Any]) -> tuple[Any, str]:
    """``compute(data)`` in float64 (``wide``): float32 rounding in the tails is noise that
    k-hat reads as a tail. Where the model or guide keeps tensors of its own dtype (a dtype
    error), in the run's dtype instead; and which one it was."""
    try:
        with wide(guide) as widen:
            found = compute(widen(data))
        if not (isinstance(found, str) and _DTYPE_CLASH.search(found)):
            return found, "float64"
    except (RuntimeError, TypeError):
        pass
    return compute(data), str(torch.get_default_dtype()).removeprefix("torch.")


@contextlib.contextmanager
def wide(guide: Callable) -> Iterator[Callable[[dict], dict]]:
    """The guide's parameters (the parameter store's and its module's buffers) and new tensors
    in float64 while inside, put back exactly after (float32 values survive the round trip);
    yields what turns the data to float64. A model or guide holding float32 tensors of its
    own then fails with a dtype error, which the caller takes as the answer to weigh in the
    run's own dtype."""
    from workbench.device import default_dtype

    params = [p for _, p in pyro.get_param_store().named_parameters()
              if p.is_floating_point()]
    buffers = ([b for b in guide.buffers() if b.is_floating_point()]
               if isinstance(guide, torch.nn.Module) else [])
    kept = [t.data for t in (*params, *buffers)]
    try:
        for tensor in (*params, *buffers):
            tensor.data = tensor.data.double()
        with default_dtype(torch.float64):
            yield lambda data: {k: v.double() if torch.is_tensor(v) and v.is_floating_point()
                                else v for k, v in data.items()}
    finally:
        for tensor, data in zip((*params, *buffers), kept):
            tensor.data = data


def weighed(log_w: torch.Tensor, draws: dict[str, torch.Tensor], sites: dict,
            num_draws: int) -> dict[str, Any]:
    """``diagnostics``' result from the draws' log importance weights and the draws of each
    latent (``sites``) and deterministic site: k-hat, ESS, ELBO, log evidence and, when
    k-hat < 0.7, the importance-weighted moments; or why there is no k-hat."""
    flat = [name for name, d in draws.items()
            if name in sites and d.shape[0] > 1 and (d == d[:1]).all()]
    if flat:
        return {"khat": None, "reason": "the guide is a point mass at " + ", ".join(
            repr(n) for n in flat) + ": it has no density to weigh draws by"}
    log_w = log_w.detach().double().cpu()
    if torch.isnan(log_w).any() or (log_w == math.inf).any() or \
            not torch.isfinite(log_w).any():
        return {"khat": None, "reason": "the log importance weights are not finite"}
    khat, smoothed = psis(log_w)
    raw = torch.softmax(log_w, 0)
    ess = 1.0 / float((raw * raw).sum())
    result: dict[str, Any] = {
        "khat": khat, "reading": thresholds.khat_reading(khat, ess / num_draws), "ess": ess,
        "ess_fraction": ess / num_draws, "num_draws": num_draws,
        **_evidence(log_w),
    }
    if thresholds.khat_trusted(khat):
        weights = torch.softmax(smoothed, 0)
        result["sites"] = {name: _iw_entry(d, weights, raw) for name, d in draws.items()}
    return result


def _iw_entry(draws: torch.Tensor, weights: torch.Tensor, raw: torch.Tensor) -> dict:
    """A site's importance-weighted mean and sd under the smoothed ``weights``, with their
    Monte Carlo standard errors and the k-hat of the sd's tail (``iw_error.moments``; the
    tail under the ``raw`` weights), in the site's shape and dtype."""
    found = iw_error.moments(draws.reshape(len(draws), -1).cpu(), weights, raw)
    shape = draws.shape[1:]
    return {f"iw_{key}": to_plain(value.reshape(shape).to(draws.dtype))
            for key, value in found.items()}


def _evidence(log_w: torch.Tensor) -> dict[str, float]:
    """The ELBO (mean log weight) and the log evidence (log mean weight) from one set of log
    importance weights, each with its Monte Carlo standard error; the log evidence's by the
    delta method, sd(w) / (sqrt(S) mean(w)), on weights scaled by the largest."""
    weights = torch.exp(log_w - log_w.max())
    return {
        "elbo": float(log_w.mean()), "elbo_se": _se(log_w),
        "log_evidence": float(torch.logsumexp(log_w, 0)) - math.log(log_w.numel()),
        "log_evidence_se": _se(weights) / float(weights.mean()),
    }


def _se(values: torch.Tensor) -> float:
    """The standard error of the mean of ``values`` (NaN for a single value)."""
    count = values.numel()
    return float(values.std()) / math.sqrt(count) if count > 1 else math.nan


def psis(log_w: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Pareto-smoothed importance sampling (Vehtari, Gelman and Gabry): the k-hat of a
    generalised Pareto fitted to the largest weights, and the log weights with that tail
    replaced by the fit's quantiles (capped at the largest raw weight). As Pyro's
    ``psis_diagnostic``: the tail is the largest min(0.2 S, 3 sqrt S) of S weights."""
    from pyro.ops.stats import fit_generalized_pareto

    log_w = log_w.double()
    log_w = log_w - log_w.max()
    count = log_w.numel()
    ordered, order = torch.sort(log_w)
    cutoff_index = -int(math.ceil(min(0.2 * count, 3.0 * math.sqrt(count)))) - 1
    cutoff = max(math.log(1.0e-15), ordered[cutoff_index].item())
    in_tail = ordered > cutoff
    tail = ordered[in_tail]
    if tail.numel() < 10:
        return math.inf, log_w
    excess = tail.exp() - math.exp(cutoff)
    with torch.device(excess.device):  # Pyro's fit makes its tensors on the default device
        khat, sigma = fit_generalized_pareto(excess)
    size = tail.numel()
    p = (torch.arange(1, size + 1, dtype=torch.double, device=log_w.device) - 0.5) / size
    if abs(khat) > 1e-8:
        quantile = sigma * torch.expm1(-khat * torch.log1p(-p)) / khat
    else:
        quantile = -sigma * torch.log1p(-p)
    smoothed_tail = torch.log(quantile + math.exp(cutoff)).clamp(max=0.0)
    smoothed_sorted = ordered.clone()
    smoothed_sorted[in_tail] = smoothed_tail
    smoothed = torch.empty_like(log_w)
    smoothed[order] = smoothed_sorted
    return float(khat), smoothed


def log_joint(trace: poutine.Trace, n: int, nesting: int) -> torch.Tensor:
    """Each draw's log density over all sample sites of a vectorised trace (scaled and masked
    as Pyro's losses do), as a ``(n,)`` tensor."""
    compute_log_prob(trace)
    total = torch.zeros(n)
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            part = _per_draw(site["log_prob"], n, nesting)
            total = total.to(part.device) + part
    return total


def compute_log_prob(trace: poutine.Trace) -> None:
    """Pyro's ``trace.compute_log_prob`` over the sample sites but a plate's indices, each
    site's density by ``site_log_prob``: the same numbers and fields."""
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site) and "log_prob" not in site:
            raw = site_log_prob(site)
            site["unscaled_log_prob"] = raw
            site["log_prob"] = scale_and_mask(raw, site["scale"], site["mask"])
            site["log_prob_sum"] = site["log_prob"].sum()


def site_log_prob(site: dict) -> torch.Tensor:
    """A sample site's unscaled log density of its value, as ``site["fn"].log_prob`` gives it,
    computed on the distribution's parameters as they were before a plate expanded them
    (``compacted``): the same numbers, without a log or a square of a regression's sd per
    draw x row. Where that fails or gives another shape, the expanded distribution's."""
    fn, value = site["fn"], site["value"]
    compact = compacted(fn)
    if compact is not None and torch.is_tensor(value):
        try:
            log_p = _normal_log_prob(compact, value, *site["args"], **site["kwargs"])
            if log_p is None:
                log_p = compact.log_prob(value, *site["args"], **site["kwargs"])
            batch = value.shape[:value.dim() - fn.event_dim]
            shape = torch.Size(np.broadcast_shapes(batch, fn.batch_shape))
            if torch.is_tensor(log_p) and log_p.shape != shape:
                log_p = log_p.expand(shape)
            return log_p
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AttributeError):
            pass
    return fn.log_prob(value, *site["args"], **site["kwargs"])


def _normal_log_prob(fn: Any, value: torch.Tensor, *args: Any, **kwargs: Any
                     ) -> torch.Tensor | None:
    """torch's ``Normal.log_prob``, the same operations in the same order, in place on one
    draws x rows tensor instead of five new ones (each a fresh allocation the kernel pages
    in); None for any other distribution."""
    if type(fn).log_prob is not torch.distributions.Normal.log_prob or args or kwargs:
        return None
    if fn._validate_args:
        fn._validate_sample(value)
    log_p = value - fn.loc
    if np.broadcast_shapes(log_p.shape, fn.scale.shape) != tuple(log_p.shape):
        return None
    log_p.square_().neg_().div_(2 * fn.scale ** 2)
    return log_p.sub_(fn.scale.log()).sub_(math.log(math.sqrt(2 * math.pi)))


def compacted(fn: Any) -> Any:
    """A shallow copy of a distribution whose tensors (its own and its parts': a mixture's
    components) lose the dims that ``expand`` made (stride 0, kept at size 1, so they
    broadcast as before); None where nothing was expanded."""
    if not isinstance(fn, torch.distributions.Distribution):
        return None
    changed = {}
    for key, value in vars(fn).items():
        if torch.is_tensor(value) and 0 in value.stride() and value.numel() > 1:
            changed[key] = value[tuple(slice(0, 1) if stride == 0 and size > 1 else slice(None)
                                       for size, stride in zip(value.shape, value.stride()))]
        elif isinstance(value, torch.distributions.Distribution):
            part = compacted(value)
            if part is not None:
                changed[key] = part
    if not changed:
        return None
    twin = object.__new__(type(fn))
    twin.__dict__.update(vars(fn))
    twin.__dict__.update(changed)
    return twin


# --------------------------------------------------------------------------------------------
# what the plots show


def plot_sources(model: Callable, guide: Callable, data: dict[str, Any],
                 sites: dict[str, torch.Size], nesting: int,
                 exact: dict[str, torch.distributions.Distribution] | None = None,
                 num_draws: int = NUM_PLOT_DRAWS) -> dict[str, dict[str, Any]]:
    """Per latent site of the model as written, what ``workbench.report.plots.site_figure``
    draws::

        {SITE: {"guide": Distribution | Tensor, "prior": Distribution | Tensor,
                "exact": Distribution | None}}

    A distribution where the site's is fixed (the guide's or the prior's does not depend on
    any other draw, or a Gaussian autoguide's marginal: its density is drawn exactly), else
    draws shaped ``(num_draws, *site
    shape)`` (a density estimated from them). The prior's draws come from running the whole
    model, so for a site with latent parents they are its marginal prior, not a conditional.
    ``sites`` (the model's latent sites) lose the auxiliary ones and gain the deterministic
    sites that are latent sites as written (``AS_WRITTEN``: their guide draws are the model
    replayed against the guide's), in the model's order.
    """
    with torch.no_grad():
        marks = _forked(lambda: site_trace(model, **data))
        sites, written = shown(sites, marks), as_written_sites(marks)
        guide_fixed = _fixed_fns(guide, data, sites)
        for name in sites:
            marginal = None if name in guide_fixed else guide_marginal(guide, name)
            if marginal is not None:
                guide_fixed[name] = marginal
        prior_fixed = _fixed_fns(model, data, sites)
        guide_draws, _ = _guide_draws(guide, data,
                                      {n: s for n, s in sites.items() if n not in guide_fixed},
                                      nesting, num_draws)
        guide_draws.update(_written_draws(model, guide, data, nesting, num_draws, written,
                                          marks))
        wanted = {**{n: s for n, s in sites.items() if n not in prior_fixed}, **written}
        prior_draws = _prior_draws(model, data, nesting, num_draws, wanted) if wanted else {}
        place = {name: i for i, name in enumerate(marks.nodes)}
        order = sorted([*sites, *(n for n in written if n not in sites)],
                       key=lambda name: place.get(name, len(place)))
        return {
            name: {
                "guide": guide_fixed.get(name, guide_draws.get(name)),
                "prior": prior_fixed.get(name, prior_draws.get(name)),
                "exact": (exact or {}).get(name),
            }
            for name in order
        }


def _forked(compute: Callable[[], Any]) -> Any:
    """``compute()`` on a fork of torch's random streams (the default device's too): the
    draws after it are the ones they would have been without it."""
    from workbench.device import rng_devices

    with torch.random.fork_rng(devices=rng_devices(torch.get_default_device())):
        return compute()


def _written_draws(model: Callable, guide: Callable, data: dict, nesting: int,
                   num_draws: int, written: dict, trace: poutine.Trace) -> dict:
    """Draws of the latent sites as written (deterministic sites, ``written``) from the
    model replayed against the guide's draws (``trace``: the model run once)."""
    if not written:
        return {}
    parts: dict[str, list] = {name: [] for name in written}
    for n, _, model_trace in replayed(model, guide, data, nesting, num_draws,
                                      trace_numbers(trace), predictive=False):
        for name, shape in written.items():
            parts[name].append(draws_of(model_trace.nodes[name]["value"], n, shape))
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def _prior_draws(model: Callable, data: dict, nesting: int, num_draws: int,
                 wanted: dict) -> dict:
    """Draws of the ``wanted`` sites from the prior: the whole model run under a plate of
    draws, or one run a draw where it does not broadcast (vmap cannot sample)."""
    way = broadcast.verdict(model, data, nesting)
    count = num_draws if way.broadcasts else min(num_draws, broadcast.LOOP_DRAWS)
    if way.broadcasts:
        with pyro.plate(DRAWS_PLATE, count, dim=-(nesting + 1)):
            prior_trace = poutine.trace(model).get_trace(**data)
    else:
        prior_trace = broadcast.prior(model, data, count, nesting, site_trace(model, **data))
    return {n: prior_trace.nodes[n]["value"].reshape(count, *shape)
            for n, shape in wanted.items()}


def to_plain(value: torch.Tensor) -> float | list:
    """A tensor as JSON takes it: a float for one number, else nested lists."""
    value = value.detach().cpu()
    return value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
