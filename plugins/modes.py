"""Mode searches from overdispersed starts, for the gaussian stage's ``modes`` option
(plugins/stages.py): independent fits that all begin around one Laplace mode cannot disagree,
so R-hat across them cannot reveal a second mode. Here L-BFGS (plugins/laplace.py) climbs the
log joint from ``count`` starts spread over the prior, and the converged modes are grouped into
distinct ones, each with its Laplace Gaussian, for the fits to start at in turn.

The starts come in antithetic pairs about the origin of the unconstrained space: a draw of the
prior (Stan's advice: start overdispersed relative to the posterior), or where the prior gives
no finite draw, uniform in (-2, 2) as Stan and Pyro's ``init_to_uniform``; then its reflection
through 0, which is the prior draw's twin for a prior symmetric there. A posterior whose modes
lie on either side of the origin is searched on both sides whatever the random stream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pyro
import torch

from vibench_plugins import laplace
from vibench_plugins.pathfinder import batch_potential

SAME_SDS = 1.0  # two modes within this many of each other's marginal sds, per coordinate, are one
# A mode found beyond the first fit's own whose Laplace mass is below this share of all the
# modes' is left out: it cannot move the answer's moments by much, and fits started there
# would disagree with the rest for nothing (hmm_drive has one at a share of 1e-4 or less).
MIN_SHARE = 0.01
UNIFORM_RADIUS = 2.0  # the fallback start's box, as Stan's


@dataclass
class Mode:
    """A distinct mode: where it is, -log p there, its Laplace covariance, the log of its
    Laplace mass (log p + log det(2 pi covariance) / 2) and how many searches reached it."""

    point: torch.Tensor
    potential: float
    covariance: torch.Tensor
    log_mass: float
    hits: int = 1

    def sds(self) -> torch.Tensor:
        return self.covariance.diagonal().sqrt()

    def same(self, other: Mode) -> bool:
        """Whether ``other`` is this mode: each within SAME_SDS of the other's marginal sds."""
        gap = (self.point - other.point).abs()
        return bool((gap <= SAME_SDS * self.sds()).all() and (gap <= SAME_SDS * other.sds()).all())


@dataclass
class Found:
    """What the searches found: the distinct modes, the first search's first where it
    converged (``first_known``), the others heaviest (by Laplace mass) first; the number of
    searches and how many converged."""

    modes: list[Mode]
    searches: int
    converged: int
    first_known: bool = False
    stopped: bool = False  # the search from the first fit's start found no mode
    light: int = 0  # modes left out, their Laplace mass below MIN_SHARE

    def unvisited(self, gaussians: list[tuple]) -> int:
        """How many of the distinct modes no fit sits at: no Gaussian (loc, scale_tril or
        marginal sds) of ``gaussians`` is the same mode (``Mode.same``). The fits' weighed
        mixture cannot stand for a posterior with a mode that none of them covers."""
        fitted = []
        for loc, scale in gaussians:
            sds = scale if scale.dim() == 1 else scale.pow(2).sum(-1).sqrt()
            fitted.append(Mode(loc.detach().cpu(), 0.0, torch.diag(sds.detach().cpu() ** 2),
                               0.0))
        return sum(not any(mode.same(fit) for fit in fitted) for mode in self.modes)

    def said(self) -> str:
        """In a few words, for the gaussian stage's line."""
        if self.stopped:
            return ("mode searches stopped: the first, from the first fit's start, found no "
                    "mode (a density without one, as a funnel's, would send the rest astray)")
        if not self.modes:
            return f"{self.searches} mode searches from overdispersed starts: none converged"
        light = (f" ({self.light} more below {MIN_SHARE:.0%} of the Laplace mass left out)"
                 if self.light else "")
        if len(self.modes) < 2:
            return (f"{self.searches} mode searches from overdispersed starts: "
                    f"{self.converged} converged, one mode{light}")
        shares = _shares(self.modes)
        return (f"{self.searches} mode searches from overdispersed starts: {len(self.modes)} "
                f"distinct modes (Laplace mass {', '.join(f'{s:.2f}' for s in shares)})"
                f"{light}")


def search(guide, data: dict, count: int, seed: int, first: torch.Tensor | None = None
           ) -> Found:
    """``count`` mode searches for ``guide``'s model from overdispersed starts (``seed`` draws
    them); ``first``, where given, is a mode already found (the first fit's Laplace start),
    searched from again and listed first; where that search finds no mode (it ran into a
    funnel's neck, where the density grows without bound) no more are searched: each would
    cost its L-BFGS's every iteration for nothing. torch's random stream
    is left as it was: the model's potential draws from it (the guide's init_loc strategy
    runs at each site), and the fit's path must not depend on how many searches ran."""
    with torch.random.fork_rng(devices=[]):
        return _search(guide, data, count, seed, first)


def _search(guide, data: dict, count: int, seed: int, first: torch.Tensor | None) -> Found:
    sites = laplace.layout(guide)
    # the model itself: guide.model's init_loc strategy would draw at each site of each
    # evaluation, for the same density; the searches' random stream is their own (search)
    potential = laplace.potential_fn(laplace.model_of(guide), sites, (), data)
    dimension = sites[-1].stop
    if dimension > laplace.MAX_HESSIAN_DIM:
        return Found([], 0, 0)
    like = first if first is not None else torch.zeros(dimension)
    starts = ([first] if first is not None else []) + overdispersed(guide, sites, data, like,
                                                                     count, seed)
    fits = []
    if first is not None:  # as the first fit's start: where it finds no mode, no more
        fits.append(laplace.descend(potential, first, True))
        if _laplace(fits[0]) is None:
            return Found([], 1, 0, stopped=True)
    if starts[len(fits):]:  # the rest side by side, a batched run of the model a round
        potentials = batch_potential(laplace.model_of(guide), sites, (), data, potential,
                                     grad=True)
        fits += laplace.descend_together(potentials, potential, starts[len(fits):], True)
    modes: list[Mode] = []
    converged, first_known = 0, False
    for index, fit in enumerate(fits):
        mode = _laplace(fit)
        if mode is None:
            continue
        converged += 1
        first_known = first_known or (index == 0 and first is not None)
        same = next((known for known in modes if known.same(mode)), None)
        if same is None:
            modes.append(mode)
        else:
            same.hits += 1
    head = modes[:1] if first_known else []
    rest = sorted(modes[len(head):], key=lambda mode: -mode.log_mass)
    shares = _shares(head + rest) if modes else []
    kept = [mode for mode, share in zip(rest, shares[len(head):]) if share >= MIN_SHARE]
    return Found(head + kept, len(starts), converged, first_known, light=len(rest) - len(kept))


def overdispersed(guide, sites: list[laplace.Site], data: dict, like: torch.Tensor,
                  count: int, seed: int) -> list[torch.Tensor]:
    """``count`` starts in the guide's unconstrained space (shaped as ``like``): prior draws
    (uniform in (-2, 2) where a draw is no number) and their reflections through 0, in pairs.
    It reseeds torch's random stream (``search`` puts it back)."""
    from pyro import poutine

    generator = torch.Generator().manual_seed(seed)
    model = laplace.model_of(guide)  # guide.model draws init_loc
    starts = []
    for _ in range((count + 1) // 2):
        torch.manual_seed(int(torch.randint(2 ** 62, (), generator=generator)))
        try:
            with torch.no_grad():
                trace = poutine.trace(model).get_trace(**data)
            draw = torch.cat([site.transform.inv(trace.nodes[site.name]["value"]).reshape(-1)
                              for site in sites]).to(like)
        except (KeyError, NotImplementedError, RuntimeError, ValueError):
            draw = torch.full_like(like, math.nan)
        if draw.shape != like.shape or not torch.isfinite(draw).all():
            uniform = torch.rand(like.shape, generator=generator, dtype=like.dtype)
            draw = (uniform * 2 - 1).to(like.device) * UNIFORM_RADIUS
        starts += [draw, -draw]
    return starts[:count]


def _laplace(fit: laplace.Fit | None) -> Mode | None:
    """The mode an L-BFGS search reached with its Laplace Gaussian, or None where it did not
    converge to one with a positive definite Hessian."""
    if fit is None or not fit.converged or fit.hessian is None:
        return None
    covariance, _, note = laplace.curvature(fit.hessian)
    if covariance is None or note:
        return None
    log_det = float(torch.linalg.slogdet(2 * math.pi * covariance.double())[1])
    return Mode(fit.point, fit.potential, covariance, -fit.potential + log_det / 2)


def _shares(modes: list[Mode]) -> list[float]:
    """Each mode's share of the modes' summed Laplace masses."""
    masses = torch.tensor([mode.log_mass for mode in modes], dtype=torch.float64)
    return torch.softmax(masses, 0).tolist()


@dataclass
class Weighed:
    """The fits' equal mixture importance-weighted against the model: its PSIS k-hat, the
    effective sample size's fraction of ``draws``, per site the weighted mean and sd of its
    values (flat), and per site the entry the pipeline reports when this mixture is its
    answer (``entries``: mean, std and the quantiles QUANTILES, in the site's shape); the
    ELBO and log evidence the same weights give (log of the mean weight)."""

    khat: float
    ess_fraction: float
    moments: dict[str, tuple[list[float], list[float]]]
    entries: dict[str, dict] = field(default_factory=dict)
    draws: int = 0
    elbo: float | None = None
    log_evidence: float | None = None

    def said(self) -> str:
        """The k-hat and each element's mean +- sd, for the rhat stage's line."""
        shown = []
        for site, (means, sds) in self.moments.items():
            for i, (mean, sd) in enumerate(zip(means, sds)):
                label = site if len(means) == 1 else f"{site}[{i}]"
                shown.append(f"{label} {mean:.3g} +- {sd:.3g}")
        return (f"the fits' equal mixture importance-weighted against the model: k-hat "
                f"{self.khat:.2f}, ESS {self.ess_fraction:.0%}: {', '.join(shown)}")

    def diagnostics(self) -> dict:
        """summary.json's ``diagnostics`` where this mixture is the pipeline's answer, in
        the keys a run's report reads (workbench/rundir/summary.py ``Diagnostics``)."""
        from workbench.report.thresholds import khat_reading

        return {"khat": self.khat, "reading": khat_reading(self.khat, self.ess_fraction),
                "ess": self.ess_fraction * self.draws, "ess_fraction": self.ess_fraction,
                "num_draws": self.draws, "elbo": self.elbo, "log_evidence": self.log_evidence}


def weigh_mixture(guide, data: dict, gaussians: list[tuple], draws: int, seed: int
                  ) -> Weighed | None:
    """``draws`` draws shared evenly among the fits' Gaussians (loc, scale_tril) in the
    guide's unconstrained space, each weighed by p(x) / q_mix(x), q_mix their equal mixture
    (the balance heuristic, as multi-path Pathfinder's), in float64; None where no weight is
    finite. Each fit then need only be good near its own mode: the weights set the modes'
    shares. torch's random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        return _weigh(guide, data, gaussians, draws, seed)


def _weigh(guide, data: dict, gaussians: list[tuple], draws: int, seed: int) -> Weighed | None:
    from pyro.distributions import MultivariateNormal

    from vibench_plugins.pathfinder import batch_potential
    from workbench.report.gaussians import mixture_log_prob
    from workbench.report.posterior import psis, shown

    sites = laplace.layout(guide)
    model = laplace.model_of(guide)
    potential = laplace.potential_fn(model, sites, (), data)
    potentials = batch_potential(model, sites, (), data, potential)
    components = [MultivariateNormal(loc.double(), scale_tril=tril.double())
                  for loc, tril in gaussians]
    generator = torch.Generator().manual_seed(seed)
    share = max(draws // len(components), 1)
    points = torch.cat([c.loc + torch.randn(share, c.loc.numel(), generator=generator,
                                            dtype=torch.float64) @ c.scale_tril.T
                        for c in components])
    _, log_q = mixture_log_prob(gaussians, points)
    log_w = -potentials(points.to(gaussians[0][0].dtype)).double() - log_q
    finite = torch.isfinite(log_w)
    if not finite.any():
        return None
    points, log_w = points[finite], log_w[finite]
    khat, smoothed = psis(log_w)
    weights, raw = torch.softmax(smoothed, 0), torch.softmax(log_w, 0)
    moments, entries = {}, {}
    constrained = {site.name: site.transform(points[:, site.start:site.stop]
                                             .reshape(-1, *site.shape)) for site in sites}
    try:
        derived = _derived(guide.model, data, constrained)
    except (RuntimeError, ValueError, IndexError, NotImplementedError):
        derived = {}  # a draw the model refuses: the answer's entries hold the latent sites
    for name, drawn in shown({**constrained, **derived}, guide.prototype_trace).items():
        values = drawn.to(weights).reshape(len(points), -1)
        mean = weights @ values
        sd = (weights @ (values - mean).pow(2)).sqrt()
        if name in constrained:
            moments[name] = (mean.tolist(), sd.tolist())
        entries[name] = _entry(values, weights, mean, sd, drawn.shape[1:], raw)
    return Weighed(khat, float(1 / weights.pow(2).sum()) / len(weights), moments, entries,
                   len(weights), float(log_w.mean()),
                   float(torch.logsumexp(log_w, 0)) - math.log(len(log_w)))


def _derived(model, data: dict, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Each ``pyro.deterministic`` site's value at each draw (``values``: each latent site's
    draws, draws first), the model replayed against them as the report replays it: in one
    trace under a plate of the draws where the model broadcasts, else draw by draw
    (``workbench.report.broadcast``); {} where the model has none."""
    from pyro import poutine

    from workbench.report import broadcast
    from workbench.report.posterior import DRAWS_PLATE, deterministic_sites, draws_of, plate_nesting

    single = poutine.trace(model).get_trace(**data)
    derived = deterministic_sites(single)
    if not derived:
        return {}
    nesting, count = plate_nesting(single), len(next(iter(values.values())))
    drawn = broadcast.to_replay({
        name: broadcast.lay_out(value.to(single.nodes[name]["value"].dtype), nesting,
                                getattr(single.nodes[name]["fn"], "event_dim", 0))
        for name, value in values.items()}, single)
    way = broadcast.verdict(model, data, nesting, single)
    if way.broadcasts:
        with pyro.plate(DRAWS_PLATE, count, dim=-(nesting + 1)):
            traced = poutine.trace(poutine.replay(model, trace=drawn)).get_trace(**data)
    else:
        traced = broadcast.replay(model, drawn, data, count, nesting, way, single,
                                  predictive=False)
    return {name: draws_of(traced.nodes[name]["value"], count, shape)
            for name, shape in derived.items()}


def _entry(values: torch.Tensor, weights: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor,
           shape: torch.Size, raw: torch.Tensor) -> dict:
    """A site's entry in the pipeline's ``posterior`` from weighted draws (``values``, one
    row a draw): mean, std, weighted quantiles and the Monte Carlo error of the moments
    (``iw_error.moments``, the sd's tail under the ``raw`` weights), numbers for a scalar
    site, nested lists in its ``shape`` else."""
    from workbench.report import iw_error
    from workbench.report.posterior import QUANTILES

    ordered, order = values.sort(0)
    cumulative = weights[order].cumsum(0)
    errors = iw_error.moments(values, weights, raw)
    entry = {"mean": mean, "std": sd, **{f"iw_{key}": errors[key]
                                          for key in ("mean_mcse", "std_mcse", "std_khat")}}
    for key, q in QUANTILES.items():
        index = (cumulative < q).sum(0, keepdim=True).clamp(max=len(values) - 1)
        entry[key] = ordered.gather(0, index)[0]
    return {key: value.reshape(shape).tolist() for key, value in entry.items()}
