"""Figures of a run: the training loss, per latent site the prior, the guide and the exact
posterior on one axis (as in the seed tutorial's Beta figure), and the posterior predictive
check of the observed sites.

Matplotlib is imported inside the functions and drives its Agg canvas directly (no pyplot, no
GUI, no global figure state). Each figure function writes a PNG when given a path and returns
the picture as an ``(H, W, 3)`` uint8 array, which TensorBoard takes as it is::

    log.image("Plots/loss", loss_figure(losses), step)

``write_plots`` does both for a whole run.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workbench.rundir import files
from workbench.rundir.layout import PLOTS

DPI = 100
COLOURS = {"prior": "#7f7f7f", "guide": "#1f77b4", "exact": "#d62728"}
GRID = 400  # points on the x axis of a density plot
KDE_DRAWS = 4000  # draws behind one estimated density (a random subset when there are more)
MAX_POINTS = 20_000  # points of the loss curve drawn (a long run's curve is thinned)
MAX_FOREST_ROWS = 60  # elements of a tensor site drawn in its forest plot
PPC_DRAWS = 50  # replicated data sets drawn as densities in a posterior predictive check
ONES_BINS = 40  # bars at most in the histogram of replicated numbers of ones (binary data)
PPC_VALUES = 30  # discrete data with at most this many distinct values are counted per value
RATE_BINS = 10  # bins of predicted probability at most in binary data's calibration panel
PER_RATE_BIN = 10  # ... with at least this many values each
PPC_COLUMNS = 4  # panels in a row of the posterior predictive check


# --------------------------------------------------------------------------------------------
# loss


def loss_figure(losses: Sequence[float], path: Path | str | None = None) -> np.ndarray:
    """The loss at each step and its exponential moving average, against the step.

    The y axis is logarithmic when every loss is positive and they span more than a decade;
    otherwise linear, cut at the 99.5th percentile so a few early spikes do not flatten the
    rest (the title says so). Non-finite losses are left out. Writes a PNG to ``path`` when
    given; returns the image as an ``(H, W, 3)`` uint8 array.
    """
    fig = _figure(7.0, 4.0)
    ax = fig.add_subplot(1, 1, 1)
    values = np.asarray(list(losses), dtype=float)
    steps = np.arange(1, values.size + 1)
    finite = np.isfinite(values)
    title = f"training loss ({values.size} steps)"
    if finite.any():
        x, y = steps[finite], values[finite]
        span = min(max(10, y.size // 100), 1000)
        smooth = _ema(y, span)
        stride = max(1, y.size // MAX_POINTS)  # a long run: every stride-th point is plenty
        raw_label = "loss per step" if stride == 1 else f"loss, every {stride}th step"
        ax.plot(x[::stride], y[::stride], color=COLOURS["guide"], alpha=0.45, linewidth=0.6,
                label=raw_label)
        ax.plot(x[::stride], smooth[::stride], color="black", linewidth=1.5,
                label=f"moving average (EMA, span {span})")
        tail = y[-100:]
        ax.axhline(tail.mean(), color=COLOURS["exact"], linewidth=0.8, linestyle=":",
                   label=f"mean of the last {tail.size}: {tail.mean():.4g}")
        if (y > 0).all() and y.max() / y.min() > 10:
            from matplotlib.ticker import LogFormatter

            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(LogFormatter(labelOnlyBase=False))
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False,
                                                      minor_thresholds=(2, 0.5)))
        else:
            top = float(max(np.percentile(y, 99.5), smooth[-1]))
            low = float(min(y.min(), smooth.min()))
            pad = 0.05 * (top - low) or 1.0
            if y.max() > top + pad:
                title += ", y axis cut at the 99.5th percentile"
            ax.set_ylim(low - pad, top + pad)
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finite loss to show", ha="center", va="center",
                transform=ax.transAxes)
    if not finite.all():
        title += f", {int((~finite).sum())} non-finite left out"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    return _finish(fig, path)


def _ema(values: np.ndarray, span: int) -> np.ndarray:
    """Exponential moving average with weight 2 / (span + 1), bias-corrected at the start."""
    alpha = 2.0 / (span + 1.0)
    out = np.empty_like(values)
    level, weight = 0.0, 0.0
    for i, value in enumerate(values):
        level = (1 - alpha) * level + alpha * value
        weight = (1 - alpha) * weight + alpha
        out[i] = level / weight
    return out


# --------------------------------------------------------------------------------------------
# one latent site


def site_figure(site: str, guide: Any, path: Path | str | None = None, prior: Any = None,
                exact: Any = None, max_elements: int = 4, guide_label: str = "guide"
                ) -> np.ndarray:
    """The prior, the guide and (where known) the exact posterior of one latent site on one
    axis per element.

    ``guide``, ``prior`` and ``exact`` are each a torch distribution over the whole site
    (its batch and event shape together are the site's shape: its density is drawn exactly,
    per element as that element's marginal) or a tensor of draws shaped ``(num_draws, *site
    shape)`` (its density estimated by a Gaussian KDE, marked "(KDE)" in the legend); the
    prior and exact may be None. A guide whose draws do not vary is a point mass, drawn as a
    vertical line. A tensor site of up to ``max_elements`` elements shows them side by side,
    each titled with its index; a larger one is a forest plot of every element (up to
    MAX_FOREST_ROWS). ``workbench.report.posterior.plot_sources`` gives all three per site.
    ``guide_label`` names the guide's curve in the legend (the automatic pipeline's answer is
    draws of several fits). Writes a PNG to ``path`` when given; returns the image as an
    ``(H, W, 3)`` uint8 array.
    """
    import torch

    sources = {"prior": prior, "guide": guide, "exact": exact}
    shape = _site_shape(guide)
    count = math.prod(shape)
    samples = {key: _flat_draws(src) for key, src in sources.items() if src is not None}
    if count > max_elements:
        return forest_figure(site, shape, samples, path, guide_label=guide_label)
    shown = count
    fig = _figure(4.2 * shown + 0.6, 4.4)
    for i in range(shown):
        ax = fig.add_subplot(1, shown, i + 1)
        label = site if not shape else f"{site}[{', '.join(map(str, np.unravel_index(i, shape)))}]"
        _draw_element(ax, i, sources, samples, torch, guide_label)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("value")
        if i == 0:
            ax.set_ylabel("density")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), frameon=False)
    return _finish(fig, path)


def forest_figure(site: str, shape: tuple, samples: dict[str, np.ndarray],
                  path: Path | str | None = None, max_rows: int = MAX_FOREST_ROWS,
                  guide_label: str = "guide") -> np.ndarray:
    """A tensor site with many elements as a forest plot: per element (a row), the guide's
    mean and central 50% and 90% intervals, with the exact posterior's and the prior's 90%
    intervals beside it where given; all from draws (``samples``: source -> (n, elements))."""
    count = math.prod(shape)
    rows = min(count, max_rows)
    fig = _figure(7.0, 1.6 + 0.28 * rows)
    ax = fig.add_subplot(1, 1, 1)
    offsets = {"prior": 0.25, "guide": 0.0, "exact": -0.25}
    for key in ("prior", "exact", "guide"):
        if key not in samples:
            continue
        draws = samples[key][:, :rows]
        q05, q25, q75, q95 = np.quantile(draws, [0.05, 0.25, 0.75, 0.95], axis=0)
        y = np.arange(rows)[::-1] + offsets[key]
        name = {"prior": "prior", "guide": guide_label, "exact": "exact posterior"}[key]
        ax.hlines(y, q05, q95, color=COLOURS[key], linewidth=1.2,
                  label=f"{name}: 90% interval" + ("; 50%, mean" if key == "guide" else ""))
        if key == "guide":
            ax.hlines(y, q25, q75, color=COLOURS[key], linewidth=3.5)
            ax.plot(draws.mean(0), y, "o", color=COLOURS[key], markersize=4)
    labels = [f"{site}[{', '.join(map(str, np.unravel_index(i, shape)))}]" for i in range(rows)]
    ax.set_yticks(np.arange(rows)[::-1], labels, fontsize=8)
    ax.set_xlabel("value")
    ax.grid(alpha=0.3, axis="x")
    title = site if rows == count else f"{site}: the first {rows} of {count} elements"
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.08 - 1.0 / (rows + 4)),
              ncol=3, frameon=False)
    return _finish(fig, path)


def _draw_element(ax: Any, i: int, sources: dict, samples: dict, torch: Any,
                  guide_label: str = "guide") -> None:
    """One element's densities on one axis, over a range that covers the guide and the exact
    posterior (the prior is drawn over the same range; it is usually wider), or the prior's
    central 90% for a point mass without an exact posterior."""
    ranges = []
    for key in ("guide", "exact"):
        if key in samples:
            column = samples[key][:, i]
            low, high = np.quantile(column, [0.005, 0.995])
            ranges.append((low, high))
    low = min(r[0] for r in ranges)
    high = max(r[1] for r in ranges)
    if high - low <= 0 and "prior" in samples:  # a point mass alone: show it in the prior
        low, high = np.quantile(np.append(samples["prior"][:, i], low), [0.05, 0.95])
        low, high = min(low, ranges[0][0]), max(high, ranges[0][1])
    width = high - low
    if width <= 0:  # only a point mass: show a neighbourhood of it
        width = max(abs(low) * 0.2, 1e-3)
    low, high = low - 0.3 * width, high + 0.3 * width
    bounds = [_bounds(src) for src in sources.values() if _is_dist(src, torch)]
    for lower, upper in bounds:
        if lower is not None and low < lower:
            low = lower + 1e-6 * width
        if upper is not None and high > upper:
            high = upper - 1e-6 * width
    grid = np.linspace(low, high, GRID)
    for key in ("prior", "guide", "exact"):
        src = sources[key]
        if src is None:
            continue
        name = {"prior": "prior", "guide": guide_label, "exact": "exact posterior"}[key]
        column = samples[key][:, i]
        moments = _moments(src, i, column, torch)
        stats = "no finite mean" if moments is None else f"{moments[0]:.3g} ± {moments[1]:.2g}"
        if _is_dist(src, torch):
            density = _marginal_density(src, i, grid, torch)
            if density is None:  # no per-element density: estimate it from draws
                density = kde(column, grid)
                name += " (KDE)"
        elif column.std() <= 1e-6 * max(1.0, abs(column.mean())):
            ax.axvline(column.mean(), color=COLOURS[key], linewidth=2,
                       label=f"{name}: point mass at {column.mean():.3g}")
            continue
        else:
            density = kde(column, grid)
            name += " (KDE)"
        style = {"prior": ":", "guide": "-", "exact": "--"}[key]
        ax.plot(grid, density, color=COLOURS[key], linestyle=style, linewidth=2,
                label=f"{name}: {stats}")
        if key == "guide":
            ax.fill_between(grid, density, color=COLOURS[key], alpha=0.12)
    ax.set_xlim(low, high)
    ax.set_ylim(bottom=0)


def _moments(src: Any, i: int, column: np.ndarray, torch: Any) -> tuple[float, float] | None:
    """Element ``i``'s mean and sd: the distribution's own where it has them (None where they
    are not finite), else the draws'."""
    if _is_dist(src, torch):
        try:
            shape = tuple(src.batch_shape + src.event_shape)
            mean = src.mean.expand(shape).reshape(-1)[i].item()
            std = src.stddev.expand(shape).reshape(-1)[i].item()
            if math.isfinite(mean) and math.isfinite(std):
                return mean, std
            return None  # no finite mean or sd (a Cauchy, say): draws would say nothing
        except (NotImplementedError, RuntimeError, AttributeError):
            pass
    return float(column.mean()), float(column.std())


def _is_dist(src: Any, torch: Any) -> bool:
    return isinstance(src, torch.distributions.Distribution)


def _site_shape(guide: Any) -> tuple:
    import torch

    if _is_dist(guide, torch):
        return tuple(guide.batch_shape + guide.event_shape)
    return tuple(guide.shape[1:])


def _flat_draws(src: Any) -> np.ndarray:
    """Draws of a source as ``(n, elements)`` float64 numbers: given, or drawn from it."""
    import torch

    if _is_dist(src, torch):
        draws = src.sample((KDE_DRAWS,))
    else:
        draws = src
        if draws.shape[0] > KDE_DRAWS:
            generator = torch.Generator().manual_seed(0)
            index = torch.randperm(draws.shape[0], generator=generator)[:KDE_DRAWS]
            draws = draws[index.to(draws.device)]
    draws = draws.detach().double().cpu()
    return draws.reshape(draws.shape[0], -1).numpy()


def _bounds(dist: Any) -> tuple[float | None, float | None]:
    """The support's lower and upper bounds, where it has them."""
    support = dist.support
    while hasattr(support, "base_constraint"):
        support = support.base_constraint
    bounds = []
    for attr in ("lower_bound", "upper_bound"):
        value = getattr(support, attr, None)
        try:
            bounds.append(None if value is None else float(value))
        except (TypeError, ValueError, RuntimeError):  # a tensor bound: not one number
            bounds.append(None)
    return bounds[0], bounds[1]


def _marginal_density(dist: Any, i: int, grid: np.ndarray, torch: Any) -> np.ndarray | None:
    """Element ``i``'s marginal density on the grid: exact for a factorised distribution
    (univariate, or Independent over univariate ones) and for a multivariate Normal; None for
    other joints."""
    shape = tuple(dist.batch_shape + dist.event_shape)
    base = dist
    while isinstance(base, torch.distributions.Independent):
        base = base.base_dist
    if base.event_shape == ():
        probe = base.sample()
        points = torch.as_tensor(grid, dtype=probe.dtype, device=probe.device)
        values = points.reshape((-1,) + (1,) * len(shape)).expand((grid.size,) + shape)
        inside = base.support.check(values)
        safe = torch.where(inside, values, values.new_tensor(float(_inside_point(base))))
        log_prob = base.log_prob(safe).expand((grid.size,) + shape).reshape(grid.size, -1)
        density = torch.where(inside.reshape(grid.size, -1), log_prob.exp(),
                              torch.zeros_like(log_prob))
        return density[:, i].double().cpu().numpy()
    covariance = getattr(dist, "covariance_matrix", None)
    if covariance is not None and len(dist.event_shape) == 1:
        loc = dist.loc.expand(shape).reshape(-1)[i]
        scale = covariance.diagonal(dim1=-2, dim2=-1).expand(shape).reshape(-1)[i].sqrt()
        normal = torch.distributions.Normal(loc.double(), scale.double())
        return normal.log_prob(torch.as_tensor(grid, dtype=torch.double,
                                               device=loc.device)).exp().cpu().numpy()
    return None


def _inside_point(dist: Any) -> float:
    """A value inside the distribution's support, standing in for grid points outside it."""
    lower, upper = _bounds(dist)
    if lower is not None and upper is not None:
        return (lower + upper) / 2
    if lower is not None:
        return lower + 1.0
    if upper is not None:
        return upper - 1.0
    return 0.0


def kde(draws: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """A Gaussian kernel density estimate with Scott's bandwidth, at the points of ``grid``.

    On an evenly spaced grid (every plot's) the draws are binned linearly onto a grid at
    most a quarter of the bandwidth apart and the bins smoothed by the kernel: the same
    curve to well under a percent of its peak, at a cost that does not grow with grid x
    draws. Draws more than ``KERNEL_REACH`` bandwidths outside the grid are left out of the
    sum (each adds under 4e-6 of a draw's peak)."""
    draws = draws[np.isfinite(draws)]
    if draws.size == 0:
        return np.zeros_like(grid)
    spread = min(draws.std(), (np.quantile(draws, 0.75) - np.quantile(draws, 0.25)) / 1.349) \
        if draws.size > 1 else 0.0
    if not spread > 0:
        spread = draws.std() or 1e-3
    bandwidth = spread * draws.size ** (-1 / 5)
    binned = _binned_kernel_sum(draws, grid, bandwidth)
    if binned is None:
        z = (grid[:, None] - draws[None, :]) / bandwidth
        binned = np.exp(-0.5 * z * z).sum(1)
    return binned / (draws.size * bandwidth * math.sqrt(2 * math.pi))


KERNEL_REACH = 5.0  # bandwidths either side of a draw that its kernel covers when binned


def _binned_kernel_sum(draws: np.ndarray, grid: np.ndarray, bandwidth: float
                       ) -> np.ndarray | None:
    """sum over draws of exp(-z^2 / 2) at each grid point, from linearly binned draws; None
    where the grid is not evenly spaced or binning would cost more than the direct sum."""
    if grid.size < 2 or not bandwidth > 0:
        return None
    step = (grid[-1] - grid[0]) / (grid.size - 1)
    if not step > 0 or not np.allclose(np.diff(grid), step, rtol=1e-6, atol=0.0):
        return None
    ratio = math.ceil(4 * step / bandwidth)  # fine points a grid step: spacing <= h / 4
    fine = step / ratio
    pad = math.ceil(KERNEL_REACH * bandwidth / fine)
    count = (grid.size - 1) * ratio + 1 + 2 * pad
    if count * (2 * pad + 1) > grid.size * draws.size:
        return None
    position = (draws - grid[0]) / fine + pad
    position = position[(position >= 0) & (position <= count - 1)]
    low = np.floor(position).astype(np.int64)
    frac = position - low
    weights = (np.bincount(low, 1 - frac, minlength=count + 1)
               + np.bincount(low + 1, frac, minlength=count + 1))[:count]
    kernel = np.exp(-0.5 * (np.arange(-pad, pad + 1) * (fine / bandwidth)) ** 2)
    return np.convolve(weights, kernel, mode="same")[pad:count - pad:ratio]


# --------------------------------------------------------------------------------------------
# posterior predictive check


def ppc_figure(sources: dict[str, dict], path: Path | str | None = None,
               max_sites: int = 4) -> np.ndarray:
    """The posterior predictive check: per observed site, its data against data sets drawn
    from the model at guide draws; data that look unlike their replicates are data the fit
    does not explain.

    ``sources`` is ``{SITE: {"observed": array, "replicated": array (draws first),
    "discrete": bool}}``, as ``workbench.report.inference_data.ppc_sources`` gives. Binary data (a
    coin's flips) show the observed number of ones against the histogram of the replicated
    numbers, with the share of replicates at least as large; where the model predicts some
    values likelier to be one than others (a regression's covariates, a group index), also the
    observed rate of ones against the replicated rates in bins of predicted probability
    (``_ppc_rates``); other discrete data with few values, the observed count of each value
    against the replicated counts' median and 90% range; anything else, the observed values'
    density against ``PPC_DRAWS`` replicated data sets' densities (Gaussian KDEs over at most
    ``KDE_DRAWS`` values each, a random subset of more; a site's elements are pooled). The
    first ``max_sites`` sites, ``PPC_COLUMNS`` panels a row. Writes a PNG to ``path`` when
    given; returns the image as an ``(H, W, 3)`` uint8 array.
    """
    shown = list(sources.items())[:max_sites]
    panels: list[tuple[Any, tuple]] = []
    for site, src in shown:
        observed = np.asarray(src["observed"], dtype=float).reshape(-1)
        replicated = np.asarray(src["replicated"], dtype=float)
        replicated = replicated.reshape(replicated.shape[0], -1)
        values = np.unique(np.concatenate([observed, replicated.reshape(-1)])) \
            if src.get("discrete") else None
        if values is not None and np.isin(values, (0.0, 1.0)).all():
            panels.append((_ppc_ones, (site, observed, replicated)))
            bins = _rate_bins(replicated)
            if bins is not None:
                panels.append((_ppc_rates, (site, observed, replicated, *bins)))
        elif values is not None and values.size <= PPC_VALUES:
            panels.append((_ppc_counts, (site, observed, replicated, values)))
        else:
            panels.append((_ppc_densities, (site, observed, replicated)))
    columns = min(len(panels), PPC_COLUMNS)
    rows = -(-len(panels) // columns)
    fig = _figure(5.2 * columns + 0.4, 4.2 * rows)
    for i, (draw, args) in enumerate(panels):
        ax = fig.add_subplot(rows, columns, i + 1)
        draw(ax, *args)
        ax.grid(alpha=0.3)
        legend = ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16),
                           ncol=2, frameon=False)
        for handle in legend.legend_handles:  # faint replicate curves, a clear key
            handle.set_alpha(1.0)
    if len(sources) > len(shown):
        fig.suptitle(f"the first {len(shown)} of {len(sources)} observed sites", fontsize=10)
    return _finish(fig, path)


def _ppc_ones(ax: Any, site: str, observed: np.ndarray, replicated: np.ndarray) -> None:
    """Binary data: the observed number of ones against the replicated numbers' histogram."""
    counts = replicated.sum(1).round().astype(int)
    seen = int(round(observed.sum()))
    low, high = min(counts.min(), seen), max(counts.max(), seen)
    # Bars over the counts that occur, not over 0..N: the cost does not grow with the data;
    # beyond ONES_BINS counts, bins of several counts, so a thousand replicates read as a shape
    width = max(1, -(-(high - low + 1) // ONES_BINS))
    edges = np.arange(low, high + width + 1, width) - 0.5
    shares = np.histogram(counts, bins=edges)[0] / counts.size
    label = f"replicated data sets ({counts.size})"
    ax.bar(edges[:-1] + width / 2, shares, width=0.9 * width, color=COLOURS["guide"],
           alpha=0.6, label=label)
    above = float((counts >= seen).mean())
    ax.axvline(seen, color="black", linewidth=2.5,
               label=f"observed: {seen} of {observed.size}\n"
                     f"{above:.0%} of replicates have as many or more")
    ax.set_xlim(edges[0] - width / 2, edges[-1] + width / 2)
    ax.set_title(f"{site}: number of ones in {observed.size} values", fontsize=10)
    ax.set_xlabel("number of ones in a data set"
                  + (f" (bars of {width} counts)" if width > 1 else ""))
    ax.set_ylabel("share of replicated data sets")


def _rate_bins(replicated: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Binary data: each value's predicted probability of a one (the share of replicates with
    a one there) and its bin, bins of equal count by that probability; None where there are
    too few values for two bins of ``PER_RATE_BIN``, or where the probabilities vary no more
    than the Monte Carlo noise of a share of that many replicates (four times its variance):
    exchangeable data, as a coin's flips, whose number of ones says it all."""
    draws, size = replicated.shape
    count = min(RATE_BINS, size // PER_RATE_BIN)
    if count < 2:
        return None
    predicted = replicated.mean(0)
    if predicted.var() <= 4 * float(np.mean(predicted * (1 - predicted))) / draws:
        return None
    bins = np.empty(size, dtype=int)
    bins[np.argsort(predicted, kind="stable")] = np.arange(size) * count // size
    return predicted, bins


def _binned_rates(observed: np.ndarray, replicated: np.ndarray, predicted: np.ndarray,
                  bins: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per bin (``_rate_bins``): the mean predicted probability, the observed rate of ones and
    the replicated rates' 5%, 50% and 95% quantiles (rows)."""
    members = [bins == b for b in range(int(bins.max()) + 1)]
    where = np.array([predicted[m].mean() for m in members])
    seen = np.array([observed[m].mean() for m in members])
    rates = np.stack([replicated[:, m].mean(1) for m in members], axis=1)
    return where, seen, np.quantile(rates, [0.05, 0.5, 0.95], axis=0)


def _ppc_rates(ax: Any, site: str, observed: np.ndarray, replicated: np.ndarray,
               predicted: np.ndarray, bins: np.ndarray) -> None:
    """Binary data whose values' predicted probabilities differ: a binned calibration plot.
    Per bin of predicted probability, the observed rate of ones against the replicated data
    sets' rates (median and 90% range) in the same values. It needs nothing but the data and
    the replicates, so it serves any model: values a regression's covariates or a group index
    make likelier to be one fall in higher bins, and a fit that misses a trend or a group shows
    observed rates outside the replicated range."""
    where, seen, (low, mid, high) = _binned_rates(observed, replicated, predicted, bins)
    count, draws = where.size, replicated.shape[0]
    outside = int(((seen < low) | (seen > high)).sum())
    ax.plot([0, 1], [0, 1], color=COLOURS["prior"], linestyle="--", linewidth=0.8,
            label="rate = predicted probability")
    ax.errorbar(where, mid, yerr=[mid - low, high - mid], fmt="o", color=COLOURS["guide"],
                capsize=3, label=f"replicated: median and 90% range ({draws} sets)")
    ax.plot(where, seen, "D", color="black", markersize=5,
            label=f"observed rate ({outside} of {count} outside the range)")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{site}: rate of ones in {count} bins of predicted probability", fontsize=10)
    ax.set_xlabel(f"predicted probability of a one (bin mean; ~{observed.size // count} "
                  "values a bin)")
    ax.set_ylabel("rate of ones in the bin")


def _ppc_counts(ax: Any, site: str, observed: np.ndarray, replicated: np.ndarray,
                values: np.ndarray) -> None:
    """Discrete data with few values: each value's observed count against its replicated
    counts' median and 90% range."""
    counts = np.stack([(replicated == value).sum(1) for value in values], axis=1)
    low, mid, high = np.quantile(counts, [0.05, 0.5, 0.95], axis=0)
    ax.bar(values, (observed[:, None] == values).sum(0), width=0.8, color="#bbbbbb",
           edgecolor="black", label="observed count")
    ax.errorbar(values, mid, yerr=[mid - low, high - mid], fmt="o", color=COLOURS["guide"],
                capsize=3, label=f"replicated: median and 90% range ({counts.shape[0]} sets)")
    ax.set_title(f"{site}: count of each value in {observed.size} values", fontsize=10)
    ax.set_xlabel("value")
    ax.set_ylabel("count")


def _ppc_densities(ax: Any, site: str, observed: np.ndarray, replicated: np.ndarray) -> None:
    """Continuous data: the observed values' density against replicated data sets'."""
    pick = np.unique(np.linspace(0, replicated.shape[0] - 1, PPC_DRAWS).round().astype(int))
    size = observed.size
    if size > KDE_DRAWS:  # a density from a random subset: the KDE costs grid x values
        keep = np.random.default_rng(0).choice(size, KDE_DRAWS, replace=False)
        observed, replicated = observed[keep], replicated[:, keep]
    sets = replicated[pick]
    finite = sets[np.isfinite(sets)]
    low, high = np.quantile(np.concatenate([observed, finite]), [0.005, 0.995])
    low, high = min(low, observed.min()), max(high, observed.max())
    pad = 0.1 * (high - low) or 1.0
    grid = np.linspace(low - pad, high + pad, GRID)
    for j, values in enumerate(sets):
        ax.plot(grid, kde(values, grid), color=COLOURS["guide"], alpha=0.25, linewidth=0.8,
                label=f"replicated data sets ({len(pick)})" if j == 0 else None)
    ax.plot(grid, kde(observed, grid), color="black", linewidth=2.2,
            label=f"observed ({size} values)")
    if size <= 200:
        ax.plot(observed, np.zeros_like(observed), "|", color="black", markersize=10)
    ax.set_xlim(grid[0], grid[-1])
    ax.set_ylim(bottom=0)
    ax.set_title(f"{site}: density of the values", fontsize=10)
    ax.set_xlabel("value")
    ax.set_ylabel("density")


# --------------------------------------------------------------------------------------------
# a whole run


def write_plots(run_dir: Path | str, losses: Sequence[float] | None, sources: dict[str, dict],
                writer: Any = None, step: int = 0, ppc: dict[str, dict] | None = None,
                guide_label: str = "guide") -> list[Path]:
    """Every figure of a run as PNGs in ``run_dir/plots``: ``loss.png`` (unless ``losses`` is
    None: the automatic pipeline has one loss a fit), one
    ``site-<name>.png`` per latent site and, given ``ppc`` (what
    ``workbench.report.inference_data.ppc_sources`` returns), ``ppc.png``; also logged to
    TensorBoard as ``Plots/loss``, ``Plots/<site>`` and ``Plots/ppc`` when given the
    run's ``Loggers`` as ``writer`` (at ``step``). ``sources`` is what
    ``workbench.report.posterior.plot_sources`` returns; ``guide_label`` names its guide in
    the legends. Returns the paths written."""
    folder = files.make_folder(Path(run_dir) / PLOTS)
    written = []
    if losses is not None:
        path = folder / "loss.png"
        image = loss_figure(losses, path)
        written.append(path)
        if writer is not None:
            writer.image("Plots/loss", image, step)
    for name, src in sources.items():
        path = folder / f"site-{_file_name(name)}.png"
        image = site_figure(name, src["guide"], path, prior=src.get("prior"),
                            exact=src.get("exact"), guide_label=guide_label)
        written.append(path)
        if writer is not None:
            writer.image(f"Plots/{name}", image, step)
    if ppc:
        path = folder / "ppc.png"
        image = ppc_figure(ppc, path)
        written.append(path)
        if writer is not None:
            writer.image("Plots/ppc", image, step)
    return written


def _file_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "site"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _finish(fig: Any, path: Path | str | None) -> np.ndarray:
    """Lay out, write the PNG if asked (zlib's fastest level: a tenth larger, a third of
    the time), and return the pixels as (H, W, 3) uint8."""
    fig.tight_layout()
    fig.canvas.draw()
    rgba = np.asarray(fig.canvas.buffer_rgba())
    if path is not None:  # the pixels just drawn, not a second rendering
        from matplotlib.image import imsave

        files.write_atomic(Path(path), lambda handle: imsave(
            handle, rgba, format="png", dpi=DPI, pil_kwargs={"compress_level": 1}))
    return rgba[..., :3].copy()
