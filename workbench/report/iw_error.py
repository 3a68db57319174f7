"""The Monte Carlo error of the importance-weighted moments, and whether it can be believed.

A self-normalised importance-sampling estimate of a mean or sd is itself uncertain: with
normalised weights w, the delta method gives (Owen 2013, "Monte Carlo theory, methods and
examples", section 9.2)

    MCSE(mean) = sqrt(sum w^2 (x - mean)^2)
    MCSE(var)  = sqrt(sum w^2 ((x - mean)^2 - var)^2),   MCSE(sd) = MCSE(var) / (2 sd).

That standard error is read off the same draws, so where the squared deviations have a heavy
tail (a funnel's x = exp(v / 2) z) it is too small exactly when the sd came out too small. The
Pareto k-hat of the tail of w (x - mean)^2 says when (Vehtari, Simpson, Gelman, Yao and Gabry
2024, "Pareto smoothed importance sampling", section 3: the k-hat of h(theta) r(theta) for one
expectation): above ``thresholds.KHAT_TRUSTED`` the variance of the sd's estimate is not finite
and its MCSE is no bound on its error. ``thresholds.sd_unknown`` turns both into a reading."""

from __future__ import annotations

import math
from typing import Any

import torch

from workbench.report import thresholds

COLUMNS = 256  # elements whose tails are fitted at once (each fit holds 50 x tail numbers)


def moments(values: torch.Tensor, weights: torch.Tensor, raw: torch.Tensor
            ) -> dict[str, torch.Tensor]:
    """The weighted mean and sd of each column of ``values`` (draws x elements) under the
    normalised ``weights`` (Pareto-smoothed), their delta-method MCSEs, and the k-hat of the
    tail of each column's squared deviations under the normalised ``raw`` weights: ``mean``,
    ``std``, ``mean_mcse``, ``std_mcse``, ``std_khat``, each of one number per element."""
    values, weights, raw = values.double(), weights.double(), raw.double()
    w = weights.reshape(-1, 1)
    mean = (w * values).sum(0)
    squared = (values - mean) ** 2
    var = (w * squared).sum(0)
    sd = var.sqrt()
    w2 = w * w
    mean_mcse = (w2 * squared).sum(0).sqrt()
    var_mcse = (w2 * (squared - var) ** 2).sum(0).sqrt()
    std_mcse = torch.where(sd > 0, var_mcse / (2 * sd), torch.zeros_like(sd))
    return {"mean": mean, "std": sd, "mean_mcse": mean_mcse, "std_mcse": std_mcse,
            "std_khat": tail_khat(raw.reshape(-1, 1) * squared)}


def tail_khat(values: torch.Tensor) -> torch.Tensor:
    """The generalised Pareto k-hat of the upper tail of each column of ``values`` (draws x
    elements, non-negative), fitted as PSIS fits its weights (the largest min(0.2 S, 3 sqrt S)
    values above the next one, Zhang and Stephens' estimate with its prior, as Pyro's
    ``fit_generalized_pareto``), all columns at once; -inf for a column whose tail is flat."""
    count = values.shape[0]
    size = int(math.ceil(min(0.2 * count, 3.0 * math.sqrt(count))))
    if count < 2 or size < 5:
        return torch.full((values.shape[1],), math.nan, dtype=torch.float64)
    found = []
    for start in range(0, values.shape[1], COLUMNS):
        part = values[:, start:start + COLUMNS].double()
        top = part.topk(size + 1, dim=0).values.flip(0)  # ascending: the cutoff first
        scale = top[-1:].clamp(min=torch.finfo(torch.float64).tiny)
        found.append(_zhang_stephens((top[1:] - top[:1]) / scale))
    return torch.cat(found)


def _zhang_stephens(excess: torch.Tensor) -> torch.Tensor:
    """Zhang and Stephens' (2009) posterior-mean k of a generalised Pareto fitted to each
    column of ``excess`` (tail size x columns, ascending), with PSIS's weakly informative
    prior towards 0.5, as Pyro's ``fit_generalized_pareto`` for one column."""
    x = excess.T  # columns x tail
    n = x.shape[1]
    grid = 30 + int(math.sqrt(n))
    flat = x[:, -1] <= 0
    x = torch.where(flat[:, None], torch.ones_like(x), x)  # fitted, then set to -inf
    quarter = x[:, int(n / 4 - 0.5)].clamp(min=torch.finfo(torch.float64).tiny)
    bs = 1.0 - math.sqrt(grid) / (torch.arange(1, grid + 1, dtype=torch.float64) - 0.5).sqrt()
    bs = bs[None, :] / (3.0 * quarter[:, None]) + 1 / x[:, -1:]
    ks = torch.log1p(-bs[..., None] * x[:, None, :]).mean(-1)
    log_like = n * (torch.log(-bs / ks) - (ks + 1.0))
    weights = 1.0 / torch.exp(log_like[:, None, :] - log_like[:, :, None]).sum(-1)
    weights = torch.where(weights > 1e-30, weights, torch.zeros_like(weights))
    weights = weights / weights.sum(-1, keepdim=True)
    b = (bs * weights).sum(-1)
    k = torch.log1p(-b[:, None] * x).mean(-1)
    k = k * n / (n + 10.0) + 5.0 / (n + 10.0)
    return torch.where(flat, torch.full_like(k, -math.inf), k)


def pooled(weighted: list[dict[str, Any]], count: int, answer: dict[str, Any]) -> dict:
    """The answer's per-site entries (``answer``: mean and std of an equal mixture of
    ``count`` fits) with the Monte Carlo error of those that ``weighted`` (the ``posterior``
    of each fit whose importance-weighted moments the answer pools) has: ``iw_mean_mcse``
    sqrt(sum MCSE(mean_k)^2) / count, ``iw_std_mcse`` the pooled variance's MCSE
    sqrt(sum MCSE(var_k)^2) / count over 2 sd, and ``iw_std_khat`` the fits' largest (an
    infinite-variance tail in any fit is the answer's), each in the site's shape."""
    found = {}
    for site, entry in answer.items():
        parts = [fit[site] for fit in weighted if "iw_std_mcse" in fit.get(site, {})]
        if not parts:
            found[site] = entry
            continue
        sd = _tensor(entry["std"])
        var_var = sum((2 * _tensor(p["iw_std"]) * _tensor(p["iw_std_mcse"])).pow(2)
                      for p in parts)
        std_mcse = torch.where(sd > 0, var_var.sqrt() / count / (2 * sd), torch.zeros_like(sd))
        khat = torch.stack([_tensor(p.get("iw_std_khat", [math.nan] * len(sd)))
                            for p in parts]).amax(0)
        shape = torch.tensor(entry["std"]).shape
        found[site] = {**entry, "iw_std_mcse": std_mcse.reshape(shape).tolist(),
                       "iw_std_khat": khat.reshape(shape).tolist()}
        if all("iw_mean_mcse" in p for p in parts):
            mean_mcse = sum(_tensor(p["iw_mean_mcse"]).pow(2) for p in parts).sqrt() / count
            found[site]["iw_mean_mcse"] = mean_mcse.reshape(shape).tolist()
    return found


def verdict(posterior: dict[str, Any], khat: float | None) -> tuple[list[str], list[str]]:
    """The flag or the caution (``thresholds.sd_caution_only``, by the answer's k-hat
    ``khat``) saying which importance-weighted sds of ``posterior`` (per site ``iw_std``, or
    ``std`` where the answer's sd is the weighted one, with ``iw_std_mcse`` and
    ``iw_std_khat``) are not known to the precision the reading asks
    (``thresholds.sd_unknown``), the worst first: ([flag], []), ([], [caution]) or ([], [])."""
    unknown = []  # (badness, label, reading)
    for site, entry in posterior.items():
        if "iw_std_mcse" not in entry:
            continue
        sd = _tensor(entry.get("iw_std", entry["std"]))
        relative = _tensor(entry["iw_std_mcse"]) / sd
        tail = _tensor(entry.get("iw_std_khat", [math.nan] * len(sd)))
        for i in range(len(sd)):
            reading = thresholds.sd_unknown(float(relative[i]), float(tail[i]))
            if reading:
                badness = max(float(relative[i]) / thresholds.SD_MCSE_MAX,
                              float(tail[i]) / thresholds.KHAT_TRUSTED)
                label = site if not isinstance(entry["std"], list) else f"{site}[{i}]"
                unknown.append((badness, label, reading))
    if not unknown:
        return [], []
    unknown.sort(key=lambda found: -found[0])
    line = f"the sd of {unknown[0][1]} is not known to +-{thresholds.SD_MCSE_MAX:.0%}"
    if len(unknown) > 1:
        others = [label for _, label, _ in unknown[1:]]
        named = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3
                                         else "")
        line += f" (nor {'is that' if len(others) == 1 else 'are those'} of {named})"
    line += f": {unknown[0][2]}"
    if not thresholds.sd_caution_only(khat):
        return [line], []
    return [], [f"{line}; the draws are a good importance sampler (k-hat {khat:.2f} < "
                f"{thresholds.KHAT_GOOD}), so the means and the other sds stand: quantiles "
                "are the robust summary of a tail this heavy"]


def _tensor(value: Any) -> torch.Tensor:
    """A summary's number or nested list, flat, as float64; None as NaN."""
    return torch.tensor(flat(value), dtype=torch.float64)


def flat(value: Any) -> list[float]:
    """A summary's number or nested list, flat; None as NaN."""
    if isinstance(value, list):
        return [x for item in value for x in flat(item)]
    return [math.nan if value is None else float(value)]
