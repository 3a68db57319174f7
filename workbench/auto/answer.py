"""The automatic pipeline's answer as draws, and the files a pipeline run gets from them.

The answer the pipeline reports (``summary.json``) is an equal mixture of the fits it used
(``auto.used``: its pooled estimates are that mixture's moments), each fit taken at its
importance-weighted (PSIS) estimates where the pipeline reported those (``auto.weighted``).
Its draws are drawn the same way: ``n`` split evenly over those fits, each weighted fit's draws
resampled by their Pareto-smoothed weights out of ``IS_POOL`` draws (so a draw may repeat),
the whole shuffled; their moments are the reported ones up to Monte Carlo error. Where the
fits sit at several modes and the answer is their mixture weighed against the model
(``auto.answer`` is ``MIXTURE``: the rhat stage, plugins/stages.py), ``IS_POOL`` draws are
shared evenly among the fits, each weighed against that mixture, and resampled as one. Where
the answer is the hmc stage's chains (``CHAINS``), its draws are the chains' (the pipeline's
``layout.CHAINS`` file), evenly spaced, through the fit they started from
(``workbench.report.draws.DrawsGuide``).

``answer_draws`` is the one implementation: as ``{site: tensor}`` for ``Fit.sample``, or as
the groups of ``posterior.nc`` (``workbench.report.inference_data``'s, draw for draw: the
replicated data and pointwise log-likelihood of each draw too). ``write`` saves that file in
the pipeline's directory (the pipeline at its end, ``vibench export``); ``write_plots`` draws
the answer's densities per latent site (beside the exact posterior where the model gives it)
and its posterior predictive check in ``plots/``. A fit is read back from its checkpoint by the
``load`` its caller hands in (``workbench.service.load``), each afresh: a guide may keep its
parameters in Pyro's global store, which the next fit's set-up clears.
"""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.rundir import files
from workbench.rundir.layout import FITS, POSTERIOR

IS_POOL = 10_000  # draws a weighted fit's draws are resampled from
# the largest chains file read back: the hmc stage's defaults write at most 20 MiB (32 chains x
# 400 draws x 200 dimensions in float64), and a stage's options could ask for some times that
MAX_CHAINS_BYTES = 2**30
NUM_DRAWS = 1000  # draws in a pipeline's posterior.nc, as in a run's
ANSWER = "the pipeline's answer"  # the answer's name in the plots' legends
# summary.json's auto.answer where the answer is the fits' mixture weighed against the model
MIXTURE = "weighed mixture"
# ... and where it is importance sampling from a heavier-tailed proposal built from the fits
TAILS = "heavier-tailed proposal"
# ... and where it is the draws of the hmc stage's chains
CHAINS = "hmc draws"
SAMPLE_STATS_NOTE = (
    "fit: the index, in the attribute fits, of the fit the draw came from; resampled: whether "
    "it was drawn by that fit's PSIS weights (its log_weight is then already applied: weighing "
    "the draws again counts it twice); lp and log_weight: log p(x, z) and "
    "log p(x, z) - log q(z) under that fit's guide")
MIXTURE_STATS_NOTE = (
    "fit: the index, in the attribute fits, of the fit whose guide drew the draw; resampled: "
    "every draw was drawn by PSIS weights out of the fits' pooled draws (its log_weight is "
    "then already applied: weighing the draws again counts it twice); lp and log_weight: "
    "log p(x, z) and log p(x, z) - log q_mix(z), q_mix the fits' mixture")

TAILS_STATS_NOTE = (
    "fit: 0, every draw was drawn from the proposal (diagnostics.proposal in summary.json) "
    "built from the fits in the attribute fits; resampled: every draw was drawn by PSIS "
    "weights out of the proposal's draws (its log_weight is then already applied: weighing "
    "the draws again counts it twice); lp and log_weight: log p(x, z) and "
    "log p(x, z) - log r(z), r the proposal")
CHAINS_STATS_NOTE = (
    "fit: 0, every draw is a draw of the HMC chains (diagnostics.sampler in summary.json)"
    " started from the fit in the attribute fits, evenly spaced over the chains; resampled: "
    "false (the draws are not weighted)")

Loader = Callable[[Path], Any]  # a fit's run directory -> the run, rebuilt from its checkpoint
_FIT, _RESAMPLED = ("", "fit"), ("", "resampled")  # keys no site's or group's name can be


@dataclass
class Answer:
    """Draws of the pipeline's answer: ``draws`` (``{site: (n, ...)}`` tensors) or, drawn
    whole, ``groups`` and ``attrs`` as ``inference_data.draw`` gives them; ``fit`` (the index
    in ``used`` of each draw's fit) and ``resampled`` (whether it was drawn by weight)."""

    used: list[str]
    weighted: list[str]  # resampled by their PSIS weights
    fit: Any = None
    resampled: Any = None
    draws: dict = field(default_factory=dict)
    groups: dict = field(default_factory=dict)
    attrs: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # why a fit to weigh was not
    mixture: bool = False  # drawn as the fits' weighed mixture, resampled as one


def plan(summary: dict) -> list[tuple[str, bool]]:
    """The fits the answer mixes, each with whether the pipeline reported its
    importance-weighted estimates: ``auto.weighted``, or for a summary from before that key,
    the psis stage's rule (a k-hat below its ``khat``)."""
    auto = summary["auto"]
    used = list(auto["used"])
    if "weighted" in auto:
        weighted = set(auto["weighted"])
    else:
        khats = {entry["label"]: entry.get("khat") for entry in auto["fits"]}
        stages = ((summary.get("recipe") or {}).get("auto") or {}).get("stages") or []
        threshold = next((stage.get("khat") for stage in stages if isinstance(stage, dict)
                          and stage.get("name") == "psis"), None)  # the stage that weighs
        weighted = {label for label in used if threshold is not None
                    and khats.get(label) is not None and khats[label] < threshold}
    return [(label, label in weighted) for label in used]


def answer_draws(run_dir: Path, summary: dict, n: int, load: Loader, seed: int | None = None,
                 whole: bool = False) -> Answer:
    """``n`` draws of the answer of the pipeline in ``run_dir`` (its ``summary``), each fit
    rebuilt by ``load``. With ``seed`` the same draws each time (torch's stream seeded, and
    put back after); without, from torch's random stream. ``whole``: the groups of
    ``posterior.nc`` (posterior, posterior_predictive, log_likelihood, sample_stats with
    ``fit`` and ``resampled``, observed_data) rather than the sites' draws; where the data
    are too big for them, ``inference_data`` leaves groups out, and may give fewer draws."""
    import torch

    planned = plan(summary)
    answer = Answer([label for label, _ in planned], [])
    with seeded(seed, _device(summary)):
        kind = summary["auto"].get("answer")
        found = (_mixture(answer, run_dir, n, load, whole) if kind == MIXTURE else
                 _tails(answer, summary, run_dir, n, load, whole) if kind == TAILS else
                 _chains(answer, run_dir, n, load, whole) if kind == CHAINS else None)
        parts, meta = found or _separately(answer, planned, run_dir, n, load, whole)
        keys = [key for key in parts[0] if all(key in part for part in parts)]
        joined = {key: _cat([part[key] for part in parts]) for key in keys}
        order = torch.randperm(len(joined[_FIT]))
        joined = {key: _take(values, order) for key, values in joined.items()}
    answer.fit, answer.resampled = joined.pop(_FIT), joined.pop(_RESAMPLED)
    if not whole:
        answer.draws = joined
        return answer
    _as_groups(answer, joined, meta)
    return answer


def _separately(answer: Answer, planned: list[tuple[str, bool]], run_dir: Path, n: int,
                load: Loader, whole: bool) -> tuple[list[dict], list[tuple]]:
    """The draws of an equal mixture of the fits: ``n`` split evenly over them, each weighed
    fit's resampled by its own PSIS weights. Per fit its rows (``_FIT`` and ``_RESAMPLED``
    among them) and its groups' dims and attrs."""
    import torch

    parts: list[dict] = []
    meta: list[tuple[dict, dict]] = []
    for i, (label, weigh) in enumerate(planned):
        count = n // len(planned) + (i < n % len(planned))
        if not count:
            continue
        with keeping_random():  # set-up seeds every stream
            run = load(Path(run_dir) / FITS / label)
        size = max(count, IS_POOL) if weigh else count
        rows, log_w, extra = (_whole(run, size) if whole else _sites(run, size, weigh))
        got = len(next(iter(rows.values())))
        why = _unweighable(log_w) if weigh else ""
        if weigh and why:
            answer.notes.append(f"{label}: drawn unweighted: {why}")
        if weigh and not why:
            index = _resample(log_w, count)
            answer.weighted.append(label)
        else:
            index = torch.arange(min(count, got))
        rows = {key: _take(values, index) for key, values in rows.items()}
        rows[_FIT] = torch.full((len(index),), i, dtype=torch.int64)
        rows[_RESAMPLED] = torch.full((len(index),), weigh and not why)
        parts.append(rows)
        meta.append(extra)
    return parts, meta


def _mixture(answer: Answer, run_dir: Path, n: int, load: Loader, whole: bool
             ) -> tuple[list[dict], list[tuple]] | None:
    """The draws of the fits' weighed mixture (``auto.answer`` is MIXTURE): IS_POOL draws
    (``n`` where more) shared evenly among the fits' guides, each draw's log weight
    log p - log q_i turned into log p - log q_mix (q_mix the fits' mixture in those shares,
    each q_j the Gaussian its guide is in the unconstrained space, where the Jacobians of
    p and q cancel), the pooled draws resampled once by their Pareto-smoothed weights; the
    log weights are posterior.nc's ``log_weight``. None where a fit has no Gaussian or no
    finite weights (``answer.notes`` says why; the fits are then mixed as ``_separately``)."""
    import torch

    share = -(-max(n, IS_POOL) // len(answer.used))
    parts, meta, pooled = [], [], []
    for i, label in enumerate(answer.used):
        with keeping_random():
            run = load(Path(run_dir) / FITS / label)
        rows, log_w, extra = (_whole(run, share, auxiliary=True) if whole
                              else _sites(run, share, True, auxiliary=True))
        gaussian, points = _in_unconstrained(run, rows, whole)
        rows = _shown(run, rows, whole)
        why = _unweighable(log_w) or ("" if gaussian is not None else "its guide is no Gaussian")
        if why:
            answer.notes.append(f"{label}: the fits' mixture not weighed: {why}")
            return None
        rows[_FIT] = torch.full((len(log_w),), i, dtype=torch.int64)
        rows[_RESAMPLED] = torch.full((len(log_w),), True)
        parts.append(rows)
        meta.append(extra)
        pooled.append((gaussian, points, log_w))
    log_w = _mixture_weights(pooled)
    index = _resample(log_w, n)
    joined = {key: _cat([part[key] for part in parts]) for key in parts[0]
              if all(key in part for part in parts)}
    if whole:
        joined["sample_stats", "log_weight"] = log_w.numpy()
    answer.weighted, answer.mixture = list(answer.used), True
    return [{key: _take(values, index) for key, values in joined.items()}], meta


def _tails(answer: Answer, summary: dict, run_dir: Path, n: int, load: Loader, whole: bool
           ) -> tuple[list[dict], list[tuple]]:
    """The draws of a heavier-tailed proposal's answer (``auto.answer`` is TAILS): IS_POOL
    draws (``n`` where more) of the proposal ``diagnostics.proposal`` names, built from its
    fits' Gaussians, resampled by their Pareto-smoothed weights against the model."""
    import torch

    chosen = summary["diagnostics"]["proposal"]
    run, _, _ = _proposal_run(run_dir, chosen["fits"], chosen["name"], load)
    rows, log_w, extra = (_whole(run, max(n, IS_POOL)) if whole
                          else _sites(run, max(n, IS_POOL), True))
    why = _unweighable(log_w)
    if why:
        raise ValueError(f"the proposal's draws cannot be weighed: {why}")
    index = _resample(log_w, n)
    rows[_FIT] = torch.zeros(len(log_w), dtype=torch.int64)
    rows[_RESAMPLED] = torch.full((len(log_w),), True)
    answer.weighted = list(answer.used)
    if whole:
        rows["sample_stats", "log_weight"] = log_w.numpy()
    return [{key: _take(values, index) for key, values in rows.items()}], [extra]


def _chains(answer: Answer, run_dir: Path, n: int, load: Loader, whole: bool
            ) -> tuple[list[dict], list[tuple]]:
    """The draws of the hmc stage's answer (``auto.answer`` is CHAINS): ``n`` of the chains'
    draws, evenly spaced (all of them where ``n`` is their number)."""
    import torch

    run = chains_run(run_dir, answer.used[0], load)
    rows, _, extra = _whole(run, n) if whole else _sites(run, n, False)
    count = len(next(iter(rows.values())))
    rows[_FIT] = torch.zeros(count, dtype=torch.int64)
    rows[_RESAMPLED] = torch.zeros(count, dtype=torch.bool)
    return [rows], [extra]


def chains_run(run_dir: Path, label: str, load: Loader) -> Any:
    """Fit ``label`` (the one the chains started from) rebuilt, its guide swapped for the
    chains' draws (``layout.CHAINS``, read without pickle) as a ``DrawsGuide``."""
    import copy

    import numpy as np
    import torch

    from workbench.report.draws import DrawsGuide
    from workbench.rundir.layout import CHAINS as CHAINS_FILE

    path = Path(run_dir) / CHAINS_FILE
    content = files.read_bounded(path, MAX_CHAINS_BYTES)  # as every file read back is
    try:
        points = np.load(io.BytesIO(content), allow_pickle=False)  # objects: unpickled, code
    except ValueError as exc:
        raise files.UnsafeFile(f"{path}: not the draws vibench writes ({exc}); not read") \
            from None
    if points.ndim != 3 or points.dtype != np.float64:
        raise files.UnsafeFile(f"{path}: holds {points.dtype} {points.shape}, not the float64 "
                               "(chains, draws, dimensions) vibench writes; not used")
    with keeping_random():
        run = load(Path(run_dir) / FITS / label)
    proxy = copy.copy(run)
    proxy.guide = DrawsGuide(getattr(run.guide, "model", run.model),
                             torch.from_numpy(points).flatten(0, 1).to(run.device))
    return proxy


def chains_summary(run_dir: Path, label: str, load: Loader) -> dict:
    """summary.json's posterior of the hmc stage's answer: per latent and deterministic
    site of the model as written, the moments and quantiles of all the chains' draws."""
    import torch

    from workbench.device import run_context
    from workbench.report import posterior

    run = chains_run(run_dir, label, load)
    count = len(run.guide.get_posterior().points)
    with run_context(run.device, run.dtype), torch.no_grad(), \
            posterior.whole_data(run.minibatch):
        return posterior.summarize(run.guide, run.data, run.sites, run.nesting, run.exact,
                                   num_draws=count, model=run.model)


def _resample(log_w: Any, n: int) -> Any:
    """``n`` indices of the draws behind ``log_w``, drawn with replacement by their
    Pareto-smoothed weights."""
    import torch

    from workbench.report.posterior import psis

    _, smoothed = psis(log_w)
    return torch.multinomial(torch.softmax(smoothed, 0).float(), n, replacement=True)


def _proposal_run(run_dir: Path, labels: list[str], name: str, load: Loader) -> tuple:
    """The last of the fits ``labels`` rebuilt, its guide swapped for proposal ``name`` built
    from the Gaussians of those that are Gaussians (workbench/report/tails.py); that guide;
    and the labels of the fits it was built from."""
    import copy

    from workbench.report import tails

    kept, gaussians, run = _gaussians(run_dir, labels, load)
    if not kept:
        return run, None, kept
    proxy = copy.copy(run)
    proxy.guide = tails.proposal_guide(getattr(run.guide, "model", run.model), name, gaussians)
    return proxy, proxy.guide, kept


def _gaussians(run_dir: Path, labels: list[str], load: Loader) -> tuple[list, list, Any]:
    """Of the fits ``labels``, those whose guide is a Gaussian in the unconstrained space (a
    flow is not), their (loc, scale_tril) in float64, and the last fit rebuilt."""
    from workbench.device import run_context
    from workbench.report.gaussians import fitted_gaussian

    kept, gaussians, run = [], [], None
    for label in labels:
        with keeping_random():
            run = load(Path(run_dir) / FITS / label)
        with run_context(run.device, run.dtype):
            found = fitted_gaussian(run.guide, whole=True, diagonal=True)
        if found is None:
            continue
        loc, scale = (t.detach().double().cpu() for t in found)
        kept.append(label)
        gaussians.append((loc, scale if scale.dim() == 2 else scale.diag()))
    return kept, gaussians, run


def heavier_tails(pipeline: Any, found: tuple) -> tuple:
    """The pipeline's answer (``found``, as ``pipeline._answer`` gives it) importance-sampled
    from a heavier-tailed proposal built from its Gaussian fits (``proposals``), where
    the answer's k-hat says do not trust it: of the proposals (``proposals``) whose k-hat is
    trusted, the one with the largest ESS (``trusted_proposal``); its estimates, diagnostics
    (with ``proposal``: which, from which fits, each one's k-hat) and flags (the stages').
    Where none is trusted, ``found`` with the tried k-hats in its k-hat flag; ``found``
    itself where there is nothing to try."""
    from workbench.report import thresholds

    used, post, weighted, estimates, diagnostics, flags = found
    khat = diagnostics.get("khat")
    if pipeline.mixture is not None or khat is None or thresholds.khat_trusted(khat):
        return found
    fits, tried, why = proposals(pipeline)
    if why:
        return used, post, weighted, estimates, diagnostics, _khat_noted(flags, why)
    if not tried:
        return found
    best = trusted_proposal(tried)
    khats = {name: result.get("khat") for name, result in tried.items()}
    if best is None:
        said = ", ".join(f"{name} {_khat_text(k)}" for name, k in khats.items())
        flags = _khat_noted(flags, f"heavier-tailed proposals from {len(fits)} fits: k-hat {said}")
        return used, post, weighted, estimates, {**diagnostics, "proposals": khats}, flags
    return _tails_answer(pipeline, fits, best, tried[best], khats)


def proposals(pipeline: Any) -> tuple[list, dict[str, dict], str]:
    """The heavier-tailed proposals built from the pipeline's Gaussian fits of the model its
    candidates are fits of (the user's, or the same posterior non-centred: plugins/reparam.py;
    a flow's guide is no Gaussian to widen), each weighed against that model
    (``_weigh_proposals``): the fits they were built from, each proposal's weighing, and why
    none could be built ("" where they were). Weighed once per set of fits, kept in
    ``pipeline.proposals``: the flow stage asks first (and skips the flow where one is
    trusted), the answer after."""
    from workbench.report.gaussians import FULL_UP_TO

    models = [fit.summary["recipe"].get("model") for fit in pipeline.candidates if fit.ok]
    fits = [fit for fit in pipeline.fits if fit.ok and fit.gaussian is not None
            and fit.summary["recipe"].get("model") == (models or [None])[0]
            and not fit.summary["recipe"]["guide"].get("num_transforms")]
    if any(fit.gaussian[0].numel() > FULL_UP_TO for fit in fits):  # no D x D scales to widen
        return [], {}, f"no heavier-tailed proposal beyond {FULL_UP_TO} dimensions"
    labels = [fit.label for fit in fits]
    if pipeline.proposals is None or pipeline.proposals[0] != labels:
        tried, kept = _weigh_proposals(pipeline.run_dir, labels, pipeline.load) if fits \
            else ({}, [])
        pipeline.proposals = (labels, [fit for fit in fits if fit.label in kept], tried)
    return pipeline.proposals[1], pipeline.proposals[2], ""


def trusted_proposal(tried: dict[str, dict]) -> str | None:
    """Of the weighed proposals (``proposals``), the one with a trusted k-hat and the largest
    ESS; None where none is trusted."""
    from workbench.report import thresholds

    return max((name for name, result in tried.items()
                if thresholds.khat_trusted(result.get("khat")) and "sites" in result),
               key=lambda name: tried[name]["ess"], default=None)


def _tails_answer(pipeline: Any, fits: list, name: str, result: dict, khats: dict) -> tuple:
    """The answer tuple of proposal ``name``'s weighted draws (``result``, the report's
    diagnostics of its guide)."""
    from workbench.report import iw_error, tails

    sites = result["sites"]
    post = iw_error.pooled([sites], 1, {site: {"mean": entry["iw_mean"], "std": entry["iw_std"]}
                                        for site, entry in sites.items()})
    labels = [fit.label for fit in fits]
    diagnostics = {**{k: v for k, v in result.items() if k != "sites"},
                   "khats": {fit.label: fit.khat for fit in fits},
                   "proposal": {"name": name, "fits": labels, "nu": tails.NU,
                                "scale": tails.SCALE, "eps": tails.EPS, "khats": khats}}
    estimates = (f"importance-weighted (PSIS) estimates under {tails.described(name, len(fits))}"
                 f" ({', '.join(labels)})")
    return fits, post, labels, estimates, diagnostics, list(pipeline.flags)


def _weigh_proposals(run_dir: Path, labels: list[str], load: Loader
                     ) -> tuple[dict[str, dict], list[str]]:
    """Each proposal of workbench/report/tails.py built from the Gaussians among the fits
    ``labels``, weighed against the model as the report weighs a guide
    (``posterior.diagnostics``), each on a stream of its own that leaves torch's as it was;
    and the fits it was built from ({} and [] where none is a Gaussian)."""
    import torch

    from workbench.device import run_context
    from workbench.report import posterior, tails

    kept, gaussians, run = _gaussians(run_dir, labels, load)
    tried = {}
    for i, name in enumerate(tails.PROPOSALS if kept else ()):
        guide = tails.proposal_guide(getattr(run.guide, "model", run.model), name, gaussians)
        with keeping_random(), run_context(run.device, run.dtype), torch.no_grad(), \
                posterior.whole_data(run.minibatch):
            torch.manual_seed(run.recipe["seed"] + 7 + i)
            tried[name] = posterior.diagnostics(run.model, guide, run.data, run.nesting)
    return tried, kept


def _khat_noted(flags: list[str], note: str) -> list[str]:
    """``flags`` with ``note`` added, in parentheses, to the k-hat flag."""
    return [f"{flag} ({note})" if flag.startswith("k-hat ") else flag for flag in flags]


def _khat_text(khat: float | None) -> str:
    return "-" if khat is None else f"{khat:.2f}"


def _mixture_weights(pooled: list[tuple]) -> Any:
    """Each pooled draw's log p - log q_mix from its own fit's log p - log q_i: ``pooled``
    holds per fit its Gaussian (loc, scale_tril), its draws in the unconstrained space and
    their log weights; q_mix weighs each fit by its share of the draws. In float64."""
    import torch

    from workbench.report.gaussians import mixture_log_prob

    points = torch.cat([p for _, p, _ in pooled])
    counts = torch.tensor([len(p) for _, p, _ in pooled], dtype=torch.float64)
    log_q, log_mix = mixture_log_prob([gaussian for gaussian, _, _ in pooled], points, counts)
    own = torch.cat([log_q[i, int(counts[:i].sum()):int(counts[:i + 1].sum())]
                     for i in range(len(pooled))])
    return torch.cat([w for _, _, w in pooled]) + own - log_mix


def _in_unconstrained(run: Any, rows: dict, whole: bool) -> tuple[tuple | None, Any]:
    """The fit's guide as a Gaussian (loc, scale_tril) in the unconstrained space, None where
    it is no Gaussian, and its draws ``rows`` there (``gaussians.unconstrained_draws``)."""
    import torch

    from workbench.device import run_context
    from workbench.report.gaussians import fitted_gaussian, unconstrained_draws

    with run_context(run.device, run.dtype):
        gaussian = fitted_gaussian(run.guide, diagonal=True)
    if gaussian is None:
        return None, None
    loc, scale = (part.detach().double().cpu() for part in gaussian)
    trace = run.guide.prototype_trace
    draws = {name: rows["posterior", name] if whole else rows[name]
             for name, _ in trace.iter_stochastic_nodes()}
    points = unconstrained_draws(trace, draws)
    return (loc, scale if scale.dim() == 2 else torch.diag(scale)), points


def _shown(run: Any, rows: dict, whole: bool) -> dict:
    """The fit's draws ``rows`` without its guide's auxiliary sites (the coordinates it was
    fitted in, as ``workbench.report.posterior.AUXILIARY`` marks them), which only its
    density needed."""
    from workbench.report.posterior import auxiliary_sites

    hidden = auxiliary_sites(run.guide.prototype_trace)
    return {key: values for key, values in rows.items()
            if (key[1] if whole and isinstance(key, tuple) else key) not in hidden}


def _as_groups(answer: Answer, joined: dict, meta: list[tuple[dict, dict]]) -> None:
    """Put the joined draws into ``answer.groups`` as posterior.nc's groups, with their attrs
    (what was left out, which fits were drawn unweighted)."""
    dims, attrs = meta[0]
    groups: dict[str, dict] = {}
    for (group, name), values in joined.items():
        groups.setdefault(group, {})[name] = (values, dims[group, name])
    stats = groups.setdefault("sample_stats", {})
    stats["fit"] = (answer.fit.numpy(), [])
    stats["resampled"] = (answer.resampled.numpy(), [])
    if "observed_data" in dims:
        groups["observed_data"] = dims["observed_data"]
    left_out = sorted({part_attrs[""]["left_out"] for _, part_attrs in meta
                       if "left_out" in part_attrs[""]})
    answer.groups = groups
    answer.attrs = {"": {"num_draws": len(answer.fit),
                         **({"left_out": "; ".join(left_out)} if left_out else {}),
                         **({"unweighted": "; ".join(answer.notes)} if answer.notes else {})},
                    **({"posterior_predictive": attrs["posterior_predictive"]}
                       if "posterior_predictive" in attrs and "posterior_predictive" in groups
                       else {})}


def _sites(run: Any, size: int, weigh: bool, auxiliary: bool = False
           ) -> tuple[dict, Any, tuple]:
    """``size`` draws of the fit's latent and deterministic sites (and their log weights);
    its auxiliary sites too with ``auxiliary``."""
    from workbench.report import inference_data

    draws, log_w = inference_data.site_draws(run, size, weigh, auxiliary)
    return draws, log_w, ({}, {})


def _whole(run: Any, size: int, auxiliary: bool = False) -> tuple[dict, Any, tuple]:
    """``size`` draws of the fit as posterior.nc's groups: ``{(group, name): values}`` (draws
    first), the log weights where the file has them, and each variable's dims (the observed
    data under "observed_data") with the attributes; its auxiliary sites too with
    ``auxiliary``."""
    import torch

    from workbench.device import run_context
    from workbench.report import inference_data, posterior

    with run_context(run.device, run.dtype), torch.no_grad(), \
            posterior.whole_data(run.minibatch):
        groups, attrs = inference_data.draw(run.model, inference_data.fitted_guide(run),
                                            run.data, run.nesting, size, auxiliary)
    rows, dims = {}, {}
    for group, variables in groups.items():
        if group == "observed_data":
            dims["observed_data"] = variables
            continue
        for name, (values, names) in variables.items():
            rows[group, name] = values
            dims[group, name] = names
    stats = groups.get("sample_stats", {})
    log_w = (torch.as_tensor(stats["log_weight"][0], dtype=torch.float64)
             if "log_weight" in stats else None)
    return rows, log_w, (dims, attrs)


def _unweighable(log_w: Any) -> str:
    """Why these log weights cannot resample the draws, or ""."""
    import torch

    if log_w is None:
        return "the fit's draws have no log weights (see posterior.nc's left_out)"
    if torch.isnan(log_w).any() or (log_w == float("inf")).any() \
            or not torch.isfinite(log_w).any():
        return "its log weights are not finite"
    return ""


def _take(values: Any, index: Any) -> Any:
    import numpy as np

    if isinstance(values, np.ndarray):
        return values[index.cpu().numpy()]
    return values[index.to(values.device)]


def _cat(values: list) -> Any:
    import numpy as np
    import torch

    if isinstance(values[0], np.ndarray):
        return np.concatenate(values)
    return torch.cat([v.to(values[0].device) for v in values])


def _device(summary: dict) -> Any:
    """The device the fits ran on, whose random stream a seed forks (the CPU where that is
    a GPU this machine lacks: loading the fits then says why)."""
    import torch

    try:
        device = torch.device(summary.get("device") or "cpu")
    except (RuntimeError, TypeError):
        return torch.device("cpu")
    if device.type == "cuda" and not torch.cuda.is_available():
        return torch.device("cpu")
    return device


@contextlib.contextmanager
def seeded(seed: int | None, device: Any) -> Iterator[None]:
    """With a seed, torch's random stream seeded by it, and put back after; else untouched."""
    if seed is None:
        yield
        return
    import torch

    from workbench.device import rng_devices

    with torch.random.fork_rng(devices=rng_devices(device)):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def keeping_random() -> Iterator[None]:
    """Python's, NumPy's and torch's random streams as they were before (Pyro seeds all
    three when a run is set up)."""
    import numpy as np
    import torch

    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy)


# --------------------------------------------------------------------------------------------
# the pipeline's own files


def write(run_dir: Path, summary: dict, load: Loader, num_draws: int = NUM_DRAWS
          ) -> tuple[Path, Answer]:
    """``posterior.nc`` in the pipeline's ``run_dir``: ``num_draws`` draws of its answer
    (seeded by the recipe's seed, so ``vibench export`` writes the same file again), whole or
    not at all; returns its path and the draws."""
    import pyro

    from workbench.report import inference_data

    answer = answer_draws(run_dir, summary, num_draws, load,
                          seed=(summary.get("recipe") or {}).get("seed", 0), whole=True)
    diagnostics = summary.get("diagnostics") or {}
    tailed = summary["auto"].get("answer") == TAILS
    sampled = summary["auto"].get("answer") == CHAINS
    mixed = answer.mixture
    how = (", importance-sampled from a heavier-tailed proposal built from the fits" if tailed
           else ", the fits' mixture weighed against the model" if mixed else
           ", then HMC chains started from a fit" if sampled else "")
    attrs = {**answer.attrs}
    attrs[""] = {**attrs[""], "inference_library": "pyro",
                 "inference_library_version": pyro.__version__,
                 "method": "stochastic variational inference: the automatic pipeline's answer"
                 + how,
                 "guide": "auto", "seed": (summary.get("recipe") or {}).get("seed", 0),
                 "estimates": summary["auto"].get("estimates", ""),
                 "fits": ",".join(answer.used), "resampled_fits": ",".join(answer.weighted)}
    attrs["sample_stats"] = {"description": TAILS_STATS_NOTE if tailed else
                             MIXTURE_STATS_NOTE if mixed else
                             CHAINS_STATS_NOTE if sampled else SAMPLE_STATS_NOTE}
    if diagnostics.get("khat") is not None:  # the reported k-hat: the worst fit's or mixture's
        attrs["sample_stats"].update(khat=diagnostics["khat"],
                                     khat_reading=str(diagnostics.get("reading", "")))
    path = Path(run_dir) / POSTERIOR
    with files.atomic_path(path) as tmp:
        inference_data.save(answer.groups, attrs, tmp)
    return path, answer


def write_plots(run_dir: Path, summary: dict, answer: Answer, load: Loader, nc: Path
                ) -> list[Path]:
    """``plots/`` of the pipeline's ``run_dir``: per latent site the density of the answer's
    draws (``answer``, as written to posterior.nc) beside the prior and, where the model gives
    it, the exact posterior (from the best fit used), and the posterior predictive check of the
    answer's replicated data (from ``nc``). Returns the paths written."""
    import torch

    from workbench.device import run_context
    from workbench.report import inference_data, plots, posterior

    elbos = {entry["label"]: entry.get("elbo") for entry in summary["auto"]["fits"]}
    best = max(answer.used, key=lambda label: -float("inf") if elbos.get(label) is None
               else elbos[label])
    with keeping_random():
        run = load(Path(run_dir) / FITS / best)
        with run_context(run.device, run.dtype), torch.no_grad(), \
                posterior.whole_data(run.minibatch):
            torch.manual_seed((summary.get("recipe") or {}).get("seed", 0))
            sources = posterior.plot_sources(run.model, inference_data.fitted_guide(run),
                                             run.data, run.sites, run.nesting, run.exact)
    drawn = answer.groups.get("posterior", {})
    for name, source in sources.items():
        if name in drawn:  # not a site as written where the data left deterministic sites out
            source["guide"] = torch.as_tensor(drawn[name][0])
    return plots.write_plots(run_dir, None, sources, ppc=inference_data.ppc_sources(nc),
                             guide_label=ANSWER)
