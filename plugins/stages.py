"""The automatic pipeline's stages (``workbench/auto/pipeline.py`` runs them in the recipe's order):

- ``start``: where each Gaussian begins: the Laplace approximation (L-BFGS mode, inverse
  Hessian; ``init: laplace``) or another initialiser a Gaussian autoguide offers;
- ``gaussian``: several independent Gaussian fits (full-rank, low-rank beyond
  ``low_rank_above`` dimensions) with the STL gradient, the step size searched (``lr: auto``)
  and each stopped at convergence (``train.stop: converged``: its iterate average settles,
  the step size halves, and the next average agrees with it); with ``modes``, the fits start
  at each of the distinct modes that searches from overdispersed starts found, in turn;
  with ``reparam: auto``, where the fits are poor and the model is a centred funnel, the fits
  again on it with those sites non-centred (plugins/reparam.py), kept where their ELBO is higher;
- ``rhat``: R-hat across those fits (Dhaka et al. 2020), flagged above ``threshold``; where
  the fits sit at several modes (``gaussian``'s ``modes``), their equal mixture
  importance-weighted against the model (plugins/modes.py) is the answer where its k-hat is
  trusted, else the flag says so and gives that mixture's moments;
- ``psis``: report the importance-weighted (PSIS) estimates of fits with k-hat below ``khat``;
- ``hmc``: where the fits' answer is flagged (its k-hat, their disagreement, an sd it does not
  pin down), HMC chains started from the best Gaussian fit (plugins/hmc.py); their draws are
  the answer where their nested R-hat, ESS and divergences say they can be trusted;
- ``flow``: when the best Gaussian's PSIS k-hat is above ``khat``, a flow started at it
  (not where the hmc stage's draws are the answer, by default the cheaper and surer lever
  below ``hmc``'s ``max_dimension``; nor where the answer is the fits' weighed mixture, nor
  where a heavier-tailed proposal built from the Gaussian fits, which the answer then comes
  from, has a trusted k-hat).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import statistics
from typing import Any, Literal

from workbench import hookimpl
from workbench.report.thresholds import KHAT_TRUSTED, RHAT_AGREE
from workbench.rundir.jsonsafe import numbers

# full rank: a Gaussian learnt in coordinates whitened by its start (plugins/flows.py)
FAMILIES = {"full_rank": "auto_gaussian_flow",
            "low_rank": "auto_lowrank_multivariate_normal", "diagonal": "auto_normal"}


@hookimpl
def register_stages(register):
    register("start", start)
    register("gaussian", gaussian)
    register("rhat", rhat)
    register("flow", flow)
    register("psis", psis)
    register("hmc", hmc)


def start(method: Literal["laplace", "pathfinder", "init_loc", "none"] = "laplace"):
    """Start each Gaussian at the mode and its curvature (laplace), at Pathfinder's Gaussian
    (pathfinder), or at its guide's init_loc."""
    return Start(method)


class Start:
    def __init__(self, method: str):
        self.method = method

    def run(self, pipeline) -> str:
        if self.method in ("none", "init_loc"):
            pipeline.guide.pop("init", None)
            return "no initialiser: each Gaussian starts at its guide's init_loc"
        pipeline.guide["init"] = self.method
        return (f"the first Gaussian starts at the {self.method} approximation (its guide's "
                f"init: {self.method})")


def gaussian(family: Literal["auto", "full_rank", "low_rank", "diagonal"] = "auto",
             low_rank_above: int = 200, runs: int = 4, min_runs: int = 2,
             budget_steps: int = 900, agree: float | None = 0.1, num_particles: int = 4,
             estimator: Literal["stl", "reparam"] = "stl", lr: float | str = "auto",
             max_steps: int | None = 300, window: int = 50, skl: float = 0.01,
             lr_factor: float = 0.5, spread: float = 0.5, scatter: float = 0.0,
             modes: int = 8, reparam: Literal["auto", "none"] = "auto"):
    """Independent Gaussian fits: STL, searched step size, stopped at convergence; no more
    fits once ``min_runs`` agree or the stage has taken ``budget_steps`` steps. With
    ``scatter`` > 0, fits after the first start ``scatter`` of the start's sds away (a draw)
    and, after a Laplace start, at the Laplace approximation found from there. With
    ``modes`` > 0, that many mode searches from overdispersed starts (plugins/modes.py) and
    the fits start at the distinct modes in turn, at least one fit each. With ``reparam:
    auto``, where the fits are poor (k-hat above KHAT_TRUSTED, or no mode at the Laplace
    start) and the model has centred location-scale sites, the fits again on the model with
    those sites non-centred (plugins/reparam.py), kept where their best ELBO is higher."""
    if lr != "auto" and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be 'auto' or a positive number, got {lr!r}")
    if not 1 <= min_runs <= runs:
        raise ValueError(f"need 1 <= min_runs <= runs, got {min_runs} and {runs}")
    if budget_steps < 1 or (agree is not None and agree < 0) or scatter < 0 or modes < 0:
        raise ValueError(f"need budget_steps >= 1, agree >= 0 (or null), scatter >= 0 and "
                         f"modes >= 0, got {budget_steps}, {agree}, {scatter} and {modes}")
    return Gaussian(family, low_rank_above, runs, min_runs, Enough(budget_steps, agree),
                    num_particles, estimator, lr, max_steps, _stop(window, skl, lr_factor),
                    spread, scatter, modes, reparam)


class Enough:
    """When the gaussian stage launches no more fits: once its fits have taken ``budget``
    gradient steps between them, or once they agree (R-hat across them at most RHAT_AGREE,
    their means within ``agree`` of an sd of each other and their sds within a factor
    1 + ``agree``). Both count what the fits did, never the clock, so the stage's path
    depends only on the recipe and the seed."""

    def __init__(self, budget: int, agree: float | None):
        self.budget, self.agree = budget, agree

    def why(self, fits: list) -> str:
        """Why to launch no more fits after ``fits``, or "" to go on."""
        if self.agree is not None and all(fit.ok for fit in fits):
            found = agreement([fit.summary["posterior"] for fit in fits], self.agree)
            if found is not None:
                return (f"the {len(fits)} fits agree (R-hat {found:.3f} <= {RHAT_AGREE:g}, "
                        f"means within {self.agree:g} sd, sds within {1 + self.agree:g}x)")
        spent = sum(fit.summary["steps"] for fit in fits if fit.ok)
        if spent >= self.budget:
            return f"{spent} steps taken, the budget is {self.budget} (budget_steps)"
        return ""


def agreement(posteriors: list[dict], fraction: float) -> float | None:
    """The largest R-hat across these fits' estimates where they agree as ``Enough`` asks,
    else None."""
    found = between_fits(posteriors)
    worst = max(found.values())
    if worst > RHAT_AGREE:
        return None
    for site in posteriors[0]:
        means = [numbers(post[site]["mean"]) for post in posteriors]
        sds = [numbers(post[site]["std"]) for post in posteriors]
        for i in range(len(means[0])):
            m, s = [values[i] for values in means], [values[i] for values in sds]
            if max(m) - min(m) > fraction * min(s) or max(s) > (1 + fraction) * min(s):
                return None
    return worst


class Gaussian:
    def __init__(self, family, low_rank_above, runs, min_runs, enough, num_particles,
                 estimator, lr, max_steps, train, spread, scatter, modes, reparam):
        self.family, self.low_rank_above, self.reparam = family, low_rank_above, reparam
        self.no_mode = ""  # the first fit's Laplace start found no mode: why (_no_mode)
        self.deferred = None  # the centred fits after the first, where they wait (defers)
        self.scatter, self.modes = scatter, modes
        self.runs, self.min_runs, self.enough = runs, min_runs, enough
        self.loss = {"name": "elbo", "num_particles": num_particles, "estimator": estimator}
        self.lr, self.max_steps, self.spread = lr, max_steps, spread
        self.train = train

    def run(self, pipeline) -> str:
        self.deferred = None
        said = self.fit_all(pipeline, "gaussian")
        if self.reparam == "none":
            return said
        return said + noncentred(self, pipeline)

    def fit_all(self, pipeline, name: str, search: bool = True) -> str:
        """The stage's fits, labelled ``name``-1, -2, ...: ``pipeline.candidates``; with
        ``search`` off, no mode searches."""
        from workbench.report.gaussians import FULL_UP_TO

        dimension = pipeline.dimension
        family = self.family
        if family == "auto":
            family = "low_rank" if dimension > self.low_rank_above else "full_rank"
        guide = {"name": FAMILIES[family], **pipeline.guide}
        if family == "full_rank":
            guide["num_transforms"] = 0
        train = {**self.train, "steps": self.max_steps or pipeline.recipe["train"]["steps"]}
        shared = min(self.runs * train["steps"], self.enough.budget)  # the stage's fits, one step
        seed = pipeline.recipe["seed"]
        captured: list = []  # the first fit's start (the Laplace Gaussian, say), for the rest
        found: list = []  # with ``modes``: what the mode searches found (plugins/modes.py)
        # beyond FULL_UP_TO dimensions no D x D covariance: the start's marginal sds
        marginal = FULL_UP_TO if dimension > FULL_UP_TO else None

        first = pipeline.fit(f"{name}-1", guide=guide, loss=self.loss,
                             optimizer={"name": "adam", "lr": self.lr}, train=train,
                             start=self.first_start(captured, found if search else None,
                                                    marginal, seed),
                             compile_for=shared)
        pipeline.modes = found[0] if found else None
        fits, skipped = [first], ""

        def more() -> str:
            """Fits 2, 3, ... until enough; the stage line's words on those not launched."""
            later = {**guide, "init": "init_loc"} if "init" in guide else guide
            distinct = len(pipeline.modes.modes) if pipeline.modes else 0
            at_least = min(self.runs, max(self.min_runs, distinct))  # a fit at each mode
            for i in range(len(fits) + 1, self.runs + 1):
                why = self.enough.why(fits) if i > at_least else ""
                if why:
                    pipeline.say(f"auto: fits {i}-{self.runs} not launched: {why}")
                    return f"; fits {i}-{self.runs} not launched: {why}"
                start = (_at_mode(pipeline.modes, i, self.spread, seed + i) if distinct > 1
                         else self.later_start(captured[0], guide.get("init"), marginal,
                                               seed + i))
                fits.append(pipeline.fit(
                    f"{name}-{i}", guide=later, loss=self.loss,
                    optimizer={"name": "adam", "lr": first.lr}, train=train, seed_offset=i - 1,
                    start=start, compile_for=shared))
            return ""

        def said(skipped: str) -> str:
            pipeline.candidates = [fit for fit in fits if fit.ok]
            return self.said(pipeline, fits, family, dimension, skipped, marginal,
                             pipeline.modes)

        if first.ok:
            skipped = self.no_mode = _no_mode(pipeline.last_run)
            if name == "gaussian" and self.defers(pipeline):
                self.deferred = lambda: said(skipped + more())
                waiting = f"fits 2-{self.runs}" if self.runs > 2 else "fit 2"
                return said(f"{skipped}; {waiting} not launched yet: the non-centred fits come "
                            "first, and these follow only where the first's ELBO is the higher")
            skipped += more()
        return said(skipped)

    def first_start(self, captured: list, found: list | None, marginal: int | None,
                    seed: int):
        """Fit 1's start: its guide's own (the Laplace one, say) kept in ``captured`` for the
        later fits, the mode searches' findings in ``found`` (with ``modes``; none where it is
        None), then a draw from that start (``spread``)."""

        def start(guide, data) -> None:
            from workbench.report.gaussians import fitted_gaussian

            captured.append(fitted_gaussian(guide, diagonal=marginal is not None))
            if self.modes and found is not None and marginal is None and \
                    captured[0] is not None:
                from vibench_plugins.modes import search

                found[:] = [search(guide, data, self.modes, seed + 2, first=captured[0][0])]
            moved = _overdispersed(captured[0], self.spread, seed + 1)
            if moved is not None:
                moved(guide, data)

        return start

    def defers(self, pipeline) -> bool:
        """Whether the fits after the first wait for the non-centred ones (``reparam: auto``):
        the first fit's Laplace start found no mode (a centred funnel's density grows without
        bound at its neck) and the model has centred sites to refit non-centred. The choice
        between them is still made by ELBO; the centred fits go on where the first wins."""
        from vibench_plugins import reparam
        from workbench.device import run_context

        run = pipeline.last_run
        if self.reparam != "auto" or not self.no_mode or run is None or self.runs < 2 or (
                pipeline.modes is not None and len(pipeline.modes.modes) > 1):
            return False
        with run_context(run.device, run.dtype):
            return bool(reparam.centred_sites(run.model, run.data))

    def later_start(self, gaussian, init: str | None, marginal: int | None, seed: int):
        """Where fit 2, 3, ... starts: a draw from the start's Gaussian (``spread`` of its
        sds); with ``scatter``, first a draw ``scatter`` sds away, then (after a Laplace
        start) the Laplace approximation from there, where a second mode shows, and a draw
        from that (``spread``)."""
        if not self.scatter or gaussian is None:
            return _overdispersed(gaussian, self.spread, seed)
        if init != "laplace":
            return _overdispersed(gaussian, self.scatter, seed)
        spread = self.spread

        def start(guide, data) -> None:
            from workbench.report.gaussians import fitted_gaussian

            _laplace_from(_draw(gaussian, self.scatter, seed), gaussian, guide, data)
            own = fitted_gaussian(guide, diagonal=marginal is not None)
            moved = _overdispersed(own, spread, seed + 1000)
            if moved is not None:
                moved(guide, data)

        return start

    def said(self, pipeline, fits: list, family: str, dimension: int, skipped: str,
             marginal: int | None, found=None) -> str:
        """The stage's line: the fits, how each ended, what was skipped, where they began."""
        first = fits[0]
        stops = ", ".join(fit.ending() for fit in fits)
        searched = " (searched)" if self.lr == "auto" and first.ok else ""
        lr_text = f"{first.lr:g}{searched}" if first.ok else str(self.lr)
        whence = (f"the start's marginal sds (more than {marginal} dimensions: no dense "
                  "covariance)" if marginal else "the start's Gaussian")
        scattered = (f"; fits after the first from {self.scatter:g} of its sds away"
                     if self.scatter else "")
        if found is not None:
            scattered += f"; {found.said()}" + (
                ", the fits start at each in turn" if len(found.modes) > 1 else "")
        loss = pipeline.summing_out(self.loss)
        gradient = (f"{self.loss['estimator']} gradient" if loss is self.loss
                    else f"loss {loss['name']}")
        return (f"{len(fits)} {family.replace('_', '-')} Gaussian fits of {dimension} "
                f"dimensions, {gradient}, lr {lr_text}; {stops}"
                f"{skipped}; each starts at its own draw from {whence} (spread "
                f"{self.spread:g}){scattered}")


def noncentred(stage: Gaussian, pipeline) -> str:
    """``reparam: auto``: where the fits are poor (their median k-hat over 0.7 and no
    heavier-tailed proposal built from them trusted, or no mode at the Laplace start) and the
    model has centred location-scale sites, the stage's fits
    again on the model with those sites non-centred (the same posterior, so the ELBOs
    compare: the higher, the nearer the fit in KL), kept, with the run that stands for them
    (``pipeline.last_run``), where the best ELBO is higher; the words the stage's line
    gains."""
    from vibench_plugins import reparam
    from workbench.device import run_context

    fits, run = pipeline.candidates, pipeline.last_run
    if not fits or run is None:
        return ""
    khats = [fit.khat for fit in fits if fit.khat is not None]
    typical = statistics.median(khats) if khats else None  # one fit's k-hat is noisy
    if typical is None:
        why = "no k-hat"
    elif typical > KHAT_TRUSTED:
        why = (f"k-hat {typical:.2f} > {KHAT_TRUSTED:g}" if len(khats) == 1 else
               f"the fits' median k-hat {typical:.2f} > {KHAT_TRUSTED:g}")
    elif stage.no_mode:
        why = "no mode at the Laplace start"
    else:
        return ""
    with run_context(run.device, run.dtype):
        sites = reparam.centred_sites(run.model, run.data)
    if not sites:
        return ""
    trusted = trusted_proposal(pipeline) if not stage.no_mode else ""
    if trusted:  # the answer comes from it, as good as a refit could give
        return f"; {why}, but {trusted}: no non-centred refit"
    kept = (fits, run, pipeline.modes)
    pipeline.model = reparam.section(pipeline.recipe["model"], sites)
    named = ", ".join(sites)
    pipeline.say(f"auto: {why}: the fits again with {named} non-centred")
    # the posterior's mass is where it was: one mode found by every search of the centred
    # model is one mode of the non-centred (separate modes stay separate under the change
    # of variables), so the searches are not run again
    searched = pipeline.modes
    once = searched is not None and len(searched.modes) == 1 and \
        searched.converged == searched.searches
    again = stage.fit_all(pipeline, "noncentred", search=not once)
    if once:
        again += "; no mode searches: every search of the centred model found its one mode"
    elbo = pipeline.best(fits).elbo
    centred = "the centred fit's" if len(fits) == 1 else "the centred fits'"
    found = pipeline.best(pipeline.candidates).elbo if pipeline.candidates else None
    if found is not None and found > elbo:
        return (f"; {why}: refitted with {named} non-centred: {again}; kept (ELBO "
                f"{found:.2f} against {centred} {elbo:.2f})")
    pipeline.candidates, pipeline.last_run, pipeline.modes = kept
    pipeline.model = None
    shown = "none" if found is None else f"{found:.2f}"
    said = (f"; {why}: refitted with {named} non-centred (ELBO {shown} against {centred} "
            f"{elbo:.2f}), no better: kept the centred fits")
    if stage.deferred is not None:
        pipeline.say("auto: the centred fits go on")
        said += f"; the centred fits went on: {stage.deferred()}"
    return said


def _at_mode(found, i: int, spread: float, seed: int):
    """Fit ``i``'s start where the mode searches found several modes: a draw (``spread``)
    from the Laplace Gaussian of the modes in turn, fit 1's own mode first where it is known."""
    import torch

    modes = found.modes
    mode = modes[(i - 1 if found.first_known else i - 2) % len(modes)]
    return _overdispersed((mode.point, torch.linalg.cholesky(mode.covariance)), spread, seed)


def _no_mode(run) -> str:
    """The stage line's words where the first fit's Laplace start found no mode (a degenerate
    one: plugins/laplace.py ``degenerate``) and the fits started at init_loc instead."""
    for note in getattr(run, "notes", None) or []:
        if note.startswith("init laplace: no mode"):
            return f"; gaussian-1's Laplace start: {note.removeprefix('init laplace: ')}"
    return ""


def _stop(window: int, skl: float, lr_factor: float) -> dict:
    """A fit's ``train.stop: converged`` settings (workbench/train/callbacks.py ``Converged``)."""
    if window < 8 or not skl > 0 or not 0 < lr_factor <= 1:
        raise ValueError(f"need window >= 8, skl > 0 and 0 < lr_factor <= 1, got {window}, "
                         f"{skl} and {lr_factor}")
    return {"stop": "converged", "converge_window": window, "converge_skl": skl,
            "converge_lr_factor": lr_factor}


def _overdispersed(gaussian, spread: float, seed: int):
    """A fit's start: the start's Gaussian (the Laplace one, say) moved to a draw from it (its
    scale times ``spread``), so the fits begin apart, as independent runs should. A scale that
    is a vector is the Gaussian's marginal sds (a large model's): the draw and the guide's
    scales then come from those alone, with no D x D matrix."""
    if gaussian is None:
        return None
    loc, scale = gaussian

    def start(guide, data) -> None:
        import torch

        from vibench_plugins.laplace import layout, write

        if hasattr(guide, "start_at"):  # whitened: the start's Gaussian, shifted in its sds
            guide.start_at(loc, torch.diag(scale) if scale.dim() == 1 else scale,
                           spread * _noise(loc, seed))
            return
        moved = _draw(gaussian, spread, seed)
        if scale.dim() == 1:
            write(guide, layout(guide), moved, None, scale.pow(-2))
            return
        covariance = scale @ scale.T
        write(guide, layout(guide), moved, covariance, covariance.diagonal().reciprocal())

    return start


def _draw(gaussian, factor: float, seed: int):
    """A draw from the Gaussian (loc, scale_tril or marginal sds) with its scale times
    ``factor``, from its own seed."""
    loc, scale = gaussian
    noise = _noise(loc, seed)
    return loc + factor * (scale * noise if scale.dim() == 1 else scale @ noise)


def _noise(like, seed: int):
    """Standard normal noise shaped as ``like``, from its own seed."""
    import torch

    generator = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=generator, device=like.device, dtype=like.dtype)


def _laplace_from(point, gaussian, guide, data: dict) -> None:
    """The Laplace approximation found from ``point`` (the mode search starts there),
    written into the guide."""
    scale = gaussian[1]
    if hasattr(guide, "start_at"):
        from vibench_plugins.flow_transforms import laplace_start

        guide.start_at(point, scale.diag() if scale.dim() == 1 else scale)
        laplace_start(guide, (), data)
    else:
        from vibench_plugins.laplace import initialise, layout, write

        write(guide, layout(guide), point, None, None)
        initialise(guide, **data)


def rhat(threshold: float = RHAT_AGREE):
    """R-hat across the independent fits' posterior draws; flag the result above threshold."""
    return RHat(threshold)


class RHat:
    def __init__(self, threshold: float):
        self.threshold = threshold

    def run(self, pipeline) -> str:
        fits = pipeline.candidates
        if len(fits) < 2:
            pipeline.rhat = None
            return f"skipped: {len(fits)} fit(s), R-hat needs two"
        found = between_fits([fit.summary["posterior"] for fit in fits])
        worst = max(found, key=found.get)
        pipeline.rhat = {"max": found[worst], "worst": worst, "threshold": self.threshold,
                         "fits": len(fits), "params": found}
        if found[worst] > self.threshold:
            return self.disagree(pipeline, fits, found[worst], worst)
        return (f"R-hat across {len(fits)} fits {found[worst]:.3f} <= {self.threshold:g}: "
                f"they agree; their estimates are pooled")

    def disagree(self, pipeline, fits: list, worst: float, where: str) -> str:
        """The fits disagree. Where they sit at several modes and their mixture weighed
        against the model has a trusted k-hat, that mixture is the pipeline's answer
        (``pipeline.mixture``) and the disagreement is information, not a flag: its
        importance-weighted estimates are as sound as any fit's at that k-hat, and what no
        fit found (another mode) is as unseen as it is by a single fit. Where a mode the
        searches found has no fit at it, or the k-hat is bad, the answer is the fit with
        the highest ELBO, flagged."""
        from workbench.report.thresholds import khat_trusted

        searched = pipeline.modes
        several = (f": several modes ({len(searched.modes)} found by the mode searches)"
                   if searched is not None and len(searched.modes) > 1 else "")
        mixture = _weighed(pipeline, fits) if several else None
        said = (f"R-hat across {len(fits)} fits {worst:.3f} > {self.threshold:g} ({where}): "
                f"the fits disagree{several}")
        if mixture is not None:  # summary.json's auto.rhat.mixture
            pipeline.rhat["mixture"] = {"khat": mixture.khat,
                                        "ess_fraction": mixture.ess_fraction,
                                        "moments": mixture.moments}
        unvisited = searched.unvisited([fit.gaussian for fit in fits]) if several else 0
        if mixture is not None and khat_trusted(mixture.khat) and not unvisited:
            pipeline.mixture = mixture
            return f"{said}: answered by their weighed mixture ({mixture.said()})"
        weighed = f" ({mixture.said()})" if mixture is not None else ""
        if unvisited:
            weighed += f"; {unvisited} of the modes found has no fit at it (raise runs)"
        pipeline.flags.append(f"R-hat {worst:.3f} > {self.threshold:g} across {len(fits)} "
                              f"fits ({where}): the fits disagree{several}{weighed}")
        return f"{said}; reporting the one with the highest ELBO" + (
            f"; {mixture.said()}" if mixture is not None else "")


def _weighed(pipeline, fits: list, draws: int = 4000):
    """Where the fits sit at several modes: their equal mixture, importance-weighted against
    the model (plugins/modes.py ``weigh_mixture``); None where it cannot be."""
    import torch

    from vibench_plugins.modes import weigh_mixture
    from workbench.device import run_context

    run = pipeline.last_run
    if run is None or any(fit.gaussian is None for fit in fits):
        return None
    gaussians = [(loc, scale if scale.dim() == 2 else torch.diag(scale))  # sds: a diagonal
                 for loc, scale in (fit.gaussian for fit in fits)]
    with run_context(run.device, run.dtype), torch.no_grad():
        return weigh_mixture(run.guide, run.data, gaussians, draws, pipeline.recipe["seed"] + 3)


def between_fits(posteriors: list[dict]) -> dict[str, float]:
    """R-hat per site element, with each fit's guide draws as one chain of many draws:
    sqrt(1 + B / W), B the variance of the fits' means, W the mean of their variances (Gelman
    and Rubin's R-hat as the chains grow long)."""
    found = {}
    for site in posteriors[0]:
        means = [numbers(post[site]["mean"]) for post in posteriors]
        sds = [numbers(post[site]["std"]) for post in posteriors]
        for i in range(len(means[0])):
            m = [values[i] for values in means]
            within = sum(values[i] ** 2 for values in sds) / len(sds)
            centre = sum(m) / len(m)
            between = sum((v - centre) ** 2 for v in m) / (len(m) - 1)
            label = site if len(means[0]) == 1 else f"{site}[{i}]"
            found[label] = math.sqrt(1 + between / within) if within > 0 else (
                1.0 if between == 0 else math.inf)
    return found


def flow(khat: float = KHAT_TRUSTED, num_transforms: int = 2, hidden_factor: int = 4,
         lr: float | str = "auto", num_particles: int = 4,
         estimator: Literal["stl", "reparam"] = "stl", max_steps: int | None = 300,
         window: int = 100, skl: float = 0.001, lr_factor: float = 0.5, rhat: float = 1.1,
         max_dimension: int = 1000, proposals: bool = True):
    """Escalate to a normalizing flow, started at the best Gaussian, when its k-hat > khat;
    with ``proposals``, not where a heavier-tailed proposal built from the Gaussian fits with
    no training (workbench/auto/answer.py ``proposals``) has a trusted k-hat: the answer is
    importance-sampled from it, as it would be after a flow that fell short.
    Its stop compares the marginal moments of its draws, which do not see the tails a flow is
    there for: ``skl`` is ten times tighter than the Gaussians' (at 0.01 kilpisjarvi's flow
    stopped at 200 steps with k-hat 0.78, against 0.44 after its 300). Beyond
    ``max_dimension`` latent dimensions no flow is tried: its parameters grow as the square of
    the dimension (a dense Gaussian and hidden layers ``hidden_factor`` times as wide)."""
    return Flow(khat, max_dimension, {"name": "auto_gaussian_flow",
                                      "num_transforms": num_transforms,
                                      "hidden_factor": hidden_factor},
                {"name": "elbo", "num_particles": num_particles, "estimator": estimator}, lr,
                max_steps, {**_stop(window, skl, lr_factor), "converge_rhat": rhat},
                proposals)


class Flow:
    def __init__(self, khat, max_dimension, guide, loss, lr, max_steps, train, proposals):
        self.khat, self.guide, self.loss, self.lr = khat, guide, loss, lr
        self.max_dimension, self.proposals = max_dimension, proposals
        self.max_steps, self.train = max_steps, train

    def run(self, pipeline) -> str:
        fits = pipeline.candidates
        if not fits:
            return "skipped: no Gaussian fit to start from"
        if pipeline.sampled is not None:  # HMC answered (by default it runs first: cheaper)
            return "skipped: the answer is the hmc stage's draws"
        if pipeline.mixture is not None:  # a flow from one fit would see one mode
            return (f"skipped: the answer is the fits' weighed mixture (k-hat "
                    f"{pipeline.mixture.khat:.2f})")
        best = pipeline.best(fits)
        khat = best.khat
        if khat is not None and khat <= self.khat:
            return f"skipped: the best Gaussian's k-hat {khat:.2f} <= {self.khat:g}"
        why = (f"k-hat {khat:.2f} > {self.khat:g}" if khat is not None else
               "no k-hat for the Gaussian")
        if best.gaussian is None:
            return f"skipped ({why}): the Gaussian fit left no Gaussian to start from"
        proposed = self.proposal(pipeline, khat)
        if proposed:
            return f"skipped ({why}): {proposed}"
        if pipeline.dimension > self.max_dimension:
            return (f"skipped ({why}): {pipeline.dimension} dimensions, more than "
                    f"max_dimension {self.max_dimension} (a flow's size grows as their square)")
        train = {**self.train, "steps": self.max_steps or pipeline.recipe["train"]["steps"]}
        loc, scale = best.gaussian
        scale_tril = scale.diag() if scale.dim() == 1 else scale  # marginal sds: a diagonal
        fit = pipeline.fit("flow", guide=self.guide, loss=self.loss,
                           optimizer={"name": "adam", "lr": self.lr}, train=train,
                           start=lambda guide, data: guide.start_at(loc, scale_tril))
        if not fit.ok:
            return f"escalated to a flow ({why}), which failed ({fit.error}); kept the Gaussian"
        new = fit.khat
        if new is not None and (khat is None or new < khat):
            pipeline.candidates = [fit]  # the R-hat across the Gaussians stays reported
            return (f"escalated to a flow: {why}; the flow's k-hat {new:.2f} ({fit.ending()}); "
                    "reporting the flow")
        shown = "none" if new is None else f"{new:.2f}"
        return (f"escalated to a flow: {why}; the flow's k-hat {shown} is no better "
                f"({fit.ending()}); kept the Gaussian")

    def proposal(self, pipeline, khat: float | None) -> str:
        """Where the answer's k-hat is not trusted and a heavier-tailed proposal built from
        the Gaussian fits is (weighed once: the answer reuses it), the words saying the answer
        comes from it; else "", and the flow is trained."""
        from workbench.report.thresholds import khat_trusted

        if not self.proposals or khat is None or khat_trusted(khat):
            return ""
        trusted = trusted_proposal(pipeline)
        return f"{trusted}; the answer is importance-sampled from it" if trusted else ""


def trusted_proposal(pipeline) -> str:
    """Where a heavier-tailed proposal built from the pipeline's Gaussian fits
    (workbench/auto/answer.py ``proposals``: weighed once, the answer reuses it) has a trusted
    k-hat, the words saying which; else ""."""
    from workbench.auto import answer

    fits, tried, _ = answer.proposals(pipeline)
    name = answer.trusted_proposal(tried)
    if name is None:
        return ""
    found = tried[name]
    return (f"the {name} proposal built from {len(fits)} Gaussian fits has k-hat "
            f"{found['khat']:.2f} <= {KHAT_TRUSTED:g} (ESS {found['ess']:.0f})")


def psis(khat: float = KHAT_TRUSTED):
    """Report importance-weighted (PSIS) estimates of the fits whose k-hat is below khat."""
    if not 0 < khat <= KHAT_TRUSTED:
        raise ValueError(f"khat must be in (0, {KHAT_TRUSTED}] (the report weighs only up to "
                         f"{KHAT_TRUSTED}), got {khat!r}")
    return PSIS(khat)


class PSIS:
    def __init__(self, khat: float):
        self.khat = khat

    def run(self, pipeline) -> str:
        pipeline.weighted = self.khat
        fits = pipeline.candidates
        good = [fit for fit in fits if fit.khat is not None and fit.khat < self.khat]
        if not fits:
            return "skipped: no fit"
        if pipeline.mixture is not None:
            return (f"importance-weighted (PSIS) estimates of the {len(fits)} fits' mixture: "
                    f"k-hat {pipeline.mixture.khat:.2f}")
        if len(good) == len(fits):
            return (f"importance-weighted (PSIS) estimates: k-hat "
                    f"{', '.join(f'{fit.khat:.2f}' for fit in fits)} < {self.khat:g}")
        return (f"the guide's own moments for {len(fits) - len(good)} of {len(fits)} fits "
                f"(k-hat >= {self.khat:g}); importance-weighted for the rest")


def hmc(chains: int = 32, groups: int = 4, warmup: int = 100, draws: int = 50, rounds: int = 8,
        target_accept: float = 0.65, max_dimension: int = 200):
    """Where the answer from the fits is flagged (its k-hat, the fits' disagreement, an sd it does
    not pin down; not where the mode searches found several modes), ``chains`` HMC chains
    started from the best Gaussian fit and preconditioned by it (plugins/hmc.py), in ``groups``
    sharing a start each: ``warmup`` transitions, then ``draws`` at a time until the chains are
    trusted (``thresholds.chains_distrusted``, by their nested R-hat), ``rounds`` times at most
    (after a divergent transition, once more from the start with the target halfway to 1).
    They are judged from the second round on: the first draws after the warm-up still carry
    the fit's narrow start in every group alike, which the groups' agreement cannot show
    (latent_gp's sds came out 14% short at 50 draws a chain with every diagnostic passed). The
    step size is tuned to ``target_accept``, the chains' harmonic-mean acceptance (ChEES-HMC's 0.65:
    their arithmetic mean then sits near 0.95). Their draws are the answer where the chains are
    trusted, or where the fits' k-hat was not (then flagged if the chains are not trusted either).
    All chains cost one batched run of the model a leapfrog step, so many short chains cost what a
    few do; a model that does not broadcast is run a chain at a time, and gets two chains a group.
    Beyond ``max_dimension`` latent dimensions (a dense metric's cost grows as their square) it does
    not run."""
    if min(warmup, draws, rounds, max_dimension) < 1 or groups < 2 or chains % groups:
        raise ValueError(f"need groups >= 2 dividing chains, and warmup, draws, rounds and "
                         f"max_dimension >= 1, got chains {chains}, groups {groups}, {warmup}, "
                         f"{draws}, {rounds} and {max_dimension}")
    if not 0 < target_accept < 1:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")
    return HMC(chains, groups, warmup, draws, rounds, target_accept, max_dimension)


class HMC:
    def __init__(self, chains, groups, warmup, draws, rounds, target_accept, max_dimension):
        self.chains, self.groups, self.warmup, self.draws = chains, groups, warmup, draws
        self.rounds, self.target, self.max_dimension = rounds, target_accept, max_dimension

    def run(self, pipeline) -> str:
        from workbench.auto import answer
        from workbench.auto.pipeline import variational_answer
        from workbench.report.thresholds import khat_trusted

        if not any(fit.ok for fit in pipeline.candidates):
            return "skipped: no fit"
        if pipeline.mixture is not None:  # chains from one fit would see one mode
            return (f"skipped: the answer is the fits' weighed mixture (k-hat "
                    f"{pipeline.mixture.khat:.2f})")
        searched = pipeline.modes
        if searched is not None and len(searched.modes) > 1:  # trusted chains at one of them
            return (f"skipped: the mode searches found {len(searched.modes)} modes, between "
                    "which chains from one fit would not move")
        found, _ = variational_answer(pipeline)
        flags, khat = found[5], found[4].get("khat")
        if not flags:
            return "skipped: the answer is trusted"
        why = flags[0].split(":")[0]  # "k-hat 0.85 > 0.7", "R-hat 1.084 > 1.01 across 4 fits"
        gaussians, _, _ = answer.proposals(pipeline)  # the Gaussian fits of the answer's model
        if not gaussians:
            return f"skipped ({why}): no Gaussian fit to start from"
        if pipeline.dimension > self.max_dimension:
            return (f"skipped ({why}): {pipeline.dimension} dimensions, more than "
                    f"max_dimension {self.max_dimension}")
        start = pipeline.best(gaussians)
        pipeline.say(f"auto: {why}: HMC from {start.label}'s Gaussian")
        sampled = sample(pipeline, start, self)
        said = f"{why}: HMC from {start.label}'s Gaussian, {sampled.said()}"
        if sampled.distrusted and khat_trusted(khat):  # the fits' answer is the better-known
            return f"{said}; {sampled.distrusted}: no better; the answer stays the fits'"
        pipeline.sampled = sampled
        sampled.write(pipeline.run_dir)
        if sampled.distrusted:
            return f"{said}; {sampled.distrusted}; the answer is its draws, flagged"
        return f"{said}: the answer is its draws"


@dataclasses.dataclass
class Sampled:
    """What the hmc stage left for the answer: the fit it started from, its chains, their
    diagnostics (per coordinate: ``workbench.report.draws.chain_diagnostics``) and each
    coordinate's name."""

    label: str
    chains: Any
    groups: int
    diagnostics: dict
    labels: list[str]  # each unconstrained coordinate's site and element
    target: float  # the acceptance its step size was tuned to (raised after a divergence)

    @property
    def distrusted(self) -> str:
        """Why the chains are not to be trusted, "" where they are."""
        from workbench.report.thresholds import chains_distrusted

        return chains_distrusted(*self.worst(), self.chains.divergences)

    def write(self, run_dir) -> None:
        """The chains' draws to the pipeline's CHAINS file, which its answer is drawn from."""
        import numpy as np

        from workbench.rundir import files, layout

        files.write_atomic(run_dir / layout.CHAINS, lambda handle: np.save(
            handle, self.chains.points.numpy(), allow_pickle=False))

    def worst(self) -> tuple[float, float, str, float, str]:
        """The nested R-hat furthest past its limit, that limit and its coordinate; the
        smallest ESS (bulk or tail) and its coordinate."""
        return _worst(self.diagnostics, self.labels, self.groups)

    def record(self) -> dict:
        """summary.json's ``diagnostics.sampler``."""
        rhat, limit, at_rhat, ess, at_ess = self.worst()
        chains = self.chains
        return {"method": "hmc", "from": self.label, "chains": int(chains.points.shape[0]),
                "groups": self.groups, "draws": int(chains.points.shape[1]),
                "warmup": chains.warmup, "target_accept": self.target,
                "step_size": chains.step_size,
                "leapfrog": chains.leapfrog, "accept": chains.accept,
                "divergences": chains.divergences, "gradients": chains.gradients,
                "seconds": chains.seconds, "graph": chains.graph, "nested_rhat": rhat,
                "nested_rhat_limit": limit, "nested_rhat_at": at_rhat, "ess": ess, "ess_at": at_ess,
                "trusted": not self.distrusted}

    def said(self) -> str:
        rhat, limit, _, ess, _ = self.worst()
        chains = self.chains
        count, length = chains.points.shape[:2]
        return (f"{count} chains in {self.groups} groups, {length} draws each after "
                f"{chains.warmup} warm-up (target acceptance {self.target:.2f}, step size "
                f"{chains.step_size:.3g}, "
                f"{chains.leapfrog:.1f} leapfrog steps, acceptance {chains.accept:.2f}, "
                f"{chains.divergences} divergent, {chains.seconds:.1f} s); nested R-hat "
                f"{rhat:.3f} (at most {limit:.3f}), ESS {ess:.0f}")


def enough(points, groups: int, labels: list[str], draws: int) -> bool:
    """Whether the chains' draws so far (``(chains, n, d)``) end the hmc stage's rounds of
    ``draws``: trusted, and from the second round on (see ``hmc``)."""
    from workbench.report.draws import chain_diagnostics
    from workbench.report.thresholds import chains_distrusted

    return points.shape[1] >= 2 * draws and not chains_distrusted(
        *_worst(chain_diagnostics(points, groups), labels, groups), 0)


def _worst(found: dict, labels: list[str], groups: int) -> tuple[float, float, str, float, str]:
    """Of ``chain_diagnostics``: the nested R-hat furthest past its limit (by its ESS), with
    the limit and coordinate; the smallest ESS (bulk or tail) and its coordinate."""
    import torch

    from workbench.report.thresholds import nested_rhat_limit

    rhat = found["nested_rhat"]
    limits = torch.tensor([nested_rhat_limit(float(e), groups) for e in found["ess_bulk"]],
                          dtype=rhat.dtype)
    ess = torch.minimum(found["ess_bulk"], found["ess_tail"])
    r, e = int((rhat ** 2 - limits ** 2).argmax()), int(ess.argmin())
    return float(rhat[r]), float(limits[r]), labels[r], float(ess[e]), labels[e]


def chain_potentials(run, loc) -> tuple[Any, list[str]]:
    """For chains on fit ``run``'s model in its guide's unconstrained coordinates (inside
    its ``run_context``): the potential of each row of an ``(n, d)`` tensor, differentiable,
    probed once at ``loc`` so that its ``rowwise`` says whether the model runs the rows in one
    batch; and each coordinate's name."""
    from vibench_plugins import laplace
    from vibench_plugins.pathfinder import batch_potential

    sites = laplace.layout(run.guide)
    model = laplace.model_of(run.guide)
    potential = laplace.potential_fn(model, sites, (), run.data)
    potentials = batch_potential(model, sites, (), run.data, potential, grad=True)
    potentials(loc.expand(2, -1))
    labels = [site.name if site.stop - site.start == 1 else f"{site.name}[{i}]"
              for site in sites for i in range(site.stop - site.start)]
    return potentials, labels


def gradient_function(potentials, loc, chains: int) -> tuple[Any, list]:
    """The chains' gradients as the stage packages them: ``laplace.value_and_gradient`` of
    ``potentials``, and inputs laid out as ``chains`` chains' points (the fit's location, a
    copy a chain). The stage looks its package up and the child builds it from these alone,
    so both record the same key."""
    from vibench_plugins import laplace

    return (functools.partial(laplace.value_and_gradient, potentials),
            [loc.expand(chains, -1).clone()])


def packaged_gradients(pipeline, fit_dir, potentials, loc, chains: int):
    """The chains' gradients (``laplace.value_and_gradient``) compiled by an earlier run, or
    None; where none is, a child started to compile them for later runs from the fit in
    ``fit_dir`` (plugins/hmc_package.py), and its line said. Only for a model that runs all
    chains in one batch (the rest are never replayed as a graph)."""
    from vibench_plugins import hmc_package
    from workbench.compile import background, traced

    if potentials.rowwise:
        return None
    found, key = traced.packaged(*gradient_function(potentials, loc, chains))
    if found is None and key is not None:
        said = background.start_child(key, lambda: hmc_package.arguments(
            fit_dir, chains, key), "the chains' gradients")
        if said:
            pipeline.say(f"auto: hmc: {said}")
    return found


def sample(pipeline, start, stage: HMC) -> Sampled:
    """Run the chains from fit ``start``'s Gaussian on the model it was fitted to."""
    import pyro
    import torch

    from vibench_plugins import hmc as sampler
    from workbench.device import run_context
    from workbench.report.draws import chain_diagnostics

    run = pipeline.load(start.path)
    loc, scale = start.gaussian
    groups, chains = stage.groups, stage.chains
    with run_context(run.device, run.dtype), torch.no_grad(), pyro.validation_enabled(False):
        dtype = torch.get_default_dtype()
        loc, scale = loc.to(dtype), (scale if scale.dim() == 2 else scale.diag()).to(dtype)
        potentials, labels = chain_potentials(run, loc)
        if potentials.rowwise:  # each chain costs a run of the model: two a group
            chains = min(chains, 2 * groups)

        packaged = packaged_gradients(pipeline, start.path, potentials, loc, chains)
        judged = functools.partial(enough, groups=groups, labels=labels, draws=stage.draws)
        target = stage.target
        for attempt in range(2):  # a divergence: once more, with smaller steps (Stan's advice)
            found = sampler.sample(potentials, loc, scale, chains, stage.warmup, stage.draws,
                                   pipeline.recipe["seed"] + 11 + attempt, rounds=stage.rounds,
                                   enough=judged, target=target, groups=groups,
                                   packaged=packaged)
            if not found.divergences or attempt:
                break
            target = (1 + target) / 2
            pipeline.say(f"auto: {found.divergences} divergent transitions: HMC again, the "
                         f"step size tuned to an acceptance of {target:.2f}")
    return Sampled(start.label, found, groups, chain_diagnostics(found.points, groups), labels,
                   target)
