"""The automatic pipeline's stages (``workbench/auto/pipeline.py`` runs them in the recipe's order):

- ``start``: where each Gaussian begins: the Laplace approximation (L-BFGS mode, inverse
  Hessian; ``init: laplace``) or another initialiser a Gaussian autoguide offers;
- ``gaussian``: several independent Gaussian fits (full-rank, low-rank beyond
  ``low_rank_above`` dimensions) with the STL gradient, the step size searched (``lr: auto``)
  and each stopped at convergence (``train.stop: converged``: its iterate average settles,
  the step size halves, and the next average agrees with it);
- ``rhat``: R-hat across those fits (Dhaka et al. 2020), flagged above ``threshold``;
- ``flow``: when the best Gaussian's PSIS k-hat is above ``khat``, a flow started at it;
- ``psis``: report the importance-weighted (PSIS) estimates of fits with k-hat below ``khat``.
"""

from __future__ import annotations

import math
from typing import Literal

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
             budget_s: float = 20.0, num_particles: int = 4,
             estimator: Literal["stl", "reparam"] = "stl", lr: float | str = "auto",
             max_steps: int | None = 300, window: int = 50, skl: float = 0.01,
             lr_factor: float = 0.5, spread: float = 0.5):
    """Independent Gaussian fits: STL, searched step size, stopped at convergence."""
    if lr != "auto" and not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be 'auto' or a positive number, got {lr!r}")
    if not 1 <= min_runs <= runs:
        raise ValueError(f"need 1 <= min_runs <= runs, got {min_runs} and {runs}")
    return Gaussian(family, low_rank_above, runs, min_runs, budget_s, num_particles, estimator,
                    lr, max_steps, _stop(window, skl, lr_factor), spread)


class Gaussian:
    def __init__(self, family, low_rank_above, runs, min_runs, budget_s, num_particles,
                 estimator, lr, max_steps, train, spread):
        self.family, self.low_rank_above = family, low_rank_above
        self.runs, self.min_runs, self.budget_s = runs, min_runs, budget_s
        self.loss = {"name": "elbo", "num_particles": num_particles, "estimator": estimator}
        self.lr, self.max_steps, self.spread = lr, max_steps, spread
        self.train = train

    def run(self, pipeline) -> str:
        import time

        dimension = pipeline.dimension
        family = self.family
        if family == "auto":
            family = "low_rank" if dimension > self.low_rank_above else "full_rank"
        guide = {"name": FAMILIES[family], **pipeline.guide}
        if family == "full_rank":
            guide["num_transforms"] = 0
        train = {**self.train, "steps": self.max_steps or pipeline.recipe["train"]["steps"]}
        began = time.process_time()  # CPU time: the budget does not shrink on a busy machine
        seed = pipeline.recipe["seed"]
        captured: list = []  # the first fit's start (the Laplace Gaussian, say), for the rest

        def first_start(guide) -> None:
            from workbench.report.gaussians import fitted_gaussian

            captured.append(fitted_gaussian(guide))
            moved = _overdispersed(captured[0], self.spread, seed + 1)
            if moved is not None:
                moved(guide)

        first = pipeline.fit("gaussian-1", guide=guide, loss=self.loss,
                             optimizer={"name": "adam", "lr": self.lr}, train=train,
                             start=first_start)
        fits, skipped = [first], ""
        if first.ok:
            lr = first.lr
            for i in range(2, self.runs + 1):
                spent = time.process_time() - began
                if i > self.min_runs and spent > self.budget_s:
                    skipped = (f"; fits {i}-{self.runs} skipped: {spent:.0f} s of CPU spent, "
                               f"over the budget of {self.budget_s:g} s")
                    break
                fits.append(pipeline.fit(
                    f"gaussian-{i}", guide={**guide, "init": "init_loc"} if "init" in guide
                    else guide, loss=self.loss,
                    optimizer={"name": "adam", "lr": lr}, train=train, seed_offset=i - 1,
                    start=_overdispersed(captured[0], self.spread, seed + i)))
        pipeline.candidates = [fit for fit in fits if fit.ok]
        stops = ", ".join(fit.ending() for fit in fits)
        searched = " (searched)" if self.lr == "auto" and first.ok else ""
        lr_text = f"{first.lr:g}{searched}" if first.ok else str(self.lr)
        return (f"{len(fits)} {family.replace('_', '-')} Gaussian fits of {dimension} "
                f"dimensions, {self.loss['estimator']} gradient, lr {lr_text}; {stops}"
                f"{skipped}; each starts at its own draw from the start's Gaussian (spread "
                f"{self.spread:g})")


def _stop(window: int, skl: float, lr_factor: float) -> dict:
    """A fit's ``train.stop: converged`` settings (workbench/train/callbacks.py ``Converged``)."""
    if window < 8 or not skl > 0 or not 0 < lr_factor <= 1:
        raise ValueError(f"need window >= 8, skl > 0 and 0 < lr_factor <= 1, got {window}, "
                         f"{skl} and {lr_factor}")
    return {"stop": "converged", "converge_window": window, "converge_skl": skl,
            "converge_lr_factor": lr_factor}


def _overdispersed(gaussian, spread: float, seed: int):
    """A fit's start: the start's Gaussian (the Laplace one, say) moved to a draw from it (its
    scale times ``spread``), so the fits begin apart, as independent runs should."""
    if gaussian is None:
        return None
    loc, scale_tril = gaussian

    def start(guide) -> None:
        import torch

        from vibench_plugins.laplace import layout, write

        generator = torch.Generator(device=loc.device).manual_seed(seed)
        noise = torch.randn(loc.shape, generator=generator, device=loc.device, dtype=loc.dtype)
        if hasattr(guide, "start_at"):  # whitened: the start's Gaussian, shifted in its sds
            guide.start_at(loc, scale_tril, spread * noise)
            return
        moved = loc + spread * scale_tril @ noise
        covariance = scale_tril @ scale_tril.T
        write(guide, layout(guide), moved, covariance, covariance.diagonal().reciprocal())

    return start


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
            pipeline.flags.append(f"R-hat {found[worst]:.3f} > {self.threshold:g} across "
                                  f"{len(fits)} fits ({worst}): the fits disagree")
            return (f"R-hat across {len(fits)} fits {found[worst]:.3f} > {self.threshold:g} "
                    f"({worst}): the fits disagree; reporting the one with the highest ELBO")
        return (f"R-hat across {len(fits)} fits {found[worst]:.3f} <= {self.threshold:g}: "
                f"they agree; their estimates are pooled")


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
         window: int = 100, skl: float = 0.001, lr_factor: float = 0.5, rhat: float = 1.1):
    """Escalate to a normalizing flow, started at the best Gaussian, when its k-hat > khat.
    Its stop compares the marginal moments of its draws, which do not see the tails a flow is
    there for: ``skl`` is ten times tighter than the Gaussians' (at 0.01 kilpisjarvi's flow
    stopped at 200 steps with k-hat 0.78, against 0.44 after its 300)."""
    return Flow(khat, {"name": "auto_gaussian_flow", "num_transforms": num_transforms,
                       "hidden_factor": hidden_factor},
                {"name": "elbo", "num_particles": num_particles, "estimator": estimator}, lr,
                max_steps, {**_stop(window, skl, lr_factor), "converge_rhat": rhat})


class Flow:
    def __init__(self, khat, guide, loss, lr, max_steps, train):
        self.khat, self.guide, self.loss, self.lr = khat, guide, loss, lr
        self.max_steps, self.train = max_steps, train

    def run(self, pipeline) -> str:
        fits = pipeline.candidates
        if not fits:
            return "skipped: no Gaussian fit to start from"
        best = pipeline.best(fits)
        khat = best.khat
        if khat is not None and khat <= self.khat:
            return f"skipped: the best Gaussian's k-hat {khat:.2f} <= {self.khat:g}"
        why = (f"k-hat {khat:.2f} > {self.khat:g}" if khat is not None else
               "no k-hat for the Gaussian")
        if best.gaussian is None:
            return f"skipped ({why}): the Gaussian fit left no Gaussian to start from"
        train = {**self.train, "steps": self.max_steps or pipeline.recipe["train"]["steps"]}
        loc, scale_tril = best.gaussian
        fit = pipeline.fit("flow", guide=self.guide, loss=self.loss,
                           optimizer={"name": "adam", "lr": self.lr}, train=train,
                           start=lambda guide: guide.start_at(loc, scale_tril))
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
        if len(good) == len(fits):
            return (f"importance-weighted (PSIS) estimates: k-hat "
                    f"{', '.join(f'{fit.khat:.2f}' for fit in fits)} < {self.khat:g}")
        return (f"the guide's own moments for {len(fits) - len(good)} of {len(fits)} fits "
                f"(k-hat >= {self.khat:g}); importance-weighted for the rest")
