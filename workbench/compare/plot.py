"""compare.png: a dot plot, a row per combination and a dot per run, of the numbers that
compare across losses (ELBO, log evidence, the errors in exact sds, k-hat), the runs not to be
trusted in red."""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from workbench.compare.metrics import combined, untrusted
from workbench.compare.plan import Grid, label
from workbench.compare.results import Result, group
from workbench.report.thresholds import KHAT_TRUSTED

PANELS = (  # the plot's panels: metric, axis label, format of the written values
    ("elbo", "ELBO (nats, higher is better)", ".3f"),
    ("log_evidence", "log evidence, importance-sampled (nats)", ".3f"),
    ("mean_error_sd", "mean error / sd:\n|guide mean - exact mean| / exact sd", ".3f"),
    ("sd_ratio", "sd ratio: guide sd / exact sd\n(log scale; 1 is right)", ".2f"),
    ("khat", f"PSIS k-hat\n(shaded: over {KHAT_TRUSTED}, do not trust)", ".2f"),
)
RATIO_TICKS = (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 10)
UNTRUSTED = "tab:red"


def write_plot(path: Path, grids: list[Grid], results: list[Result]) -> bool:
    """A dot plot, a row per combination and a dot per run, of the numbers that compare
    across losses: ELBO, log evidence, the errors in exact sds where the exact posterior is
    known, and k-hat. Each axis spans the values (written above them), not 0 onwards; a run
    with k-hat over KHAT_TRUSTED is an open red dot and its combination's label and values
    are red and marked "!". False (and a warning) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("warning: matplotlib is not installed, so there is no compare.png "
              "(pip install matplotlib)", file=sys.stderr)
        return False
    groups = group(results)
    runs = [[r for r in g if r.status == "ok"] for g in groups]
    panels = [p for p in PANELS if p[0] in ("elbo", "log_evidence")
              or any(r.metrics.get(p[0]) is not None for rs in runs for r in rs)]
    note = _plot_note(results)
    bottom = 0.75 + 0.15 * note.count("\n")  # inches for the legend and the note
    height = 0.6 * len(groups) + 1.6 + bottom
    figure, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels) + 2.5, height),
                                squeeze=False, sharey=True)
    suite = bool(grids) and grids[0].key == "recipe" and len(grids[0].values) > 1
    for ax, panel in zip(axes[0], panels):
        if suite and panel[0] in ("elbo", "log_evidence"):
            metric, title, spec = panel
            name = "ELBO" if metric == "elbo" else "log evidence"
            panel = (metric, f"{name} - best of its recipe (nats)", spec)
            _dot_panel(ax, panel, from_best(runs, metric))
        else:
            _dot_panel(ax, panel, runs)
    _rows(axes[0][0], grids, groups, runs)
    _legend(figure, note, bottom, height, max(len(g) for g in groups))
    figure.tight_layout(rect=(0, bottom / height, 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def _rows(first: Any, grids: list[Grid], groups: list[list[Result]],
          runs: list[list[Result]]) -> None:
    """The combinations' labels down the first panel: red where a seed's k-hat says not to
    trust it, grey where it has no dots."""
    first.set_yticks(range(len(groups)), [_plot_label(grids, g, rs)
                                          for g, rs in zip(groups, runs)])
    for tick, rs in zip(first.get_yticklabels(), runs):
        tick.set_color(UNTRUSTED if untrusted(combined(rs, "khat")) else
                       "0.5" if not rs else "black")
    first.set_ylim(len(groups) - 0.5, -0.7)
    first.set_ylabel("combination")


def _legend(figure: Any, note: str, bottom: float, height: float, seeds: int) -> None:
    """The legend and footnote under the panels, and the title: how many runs each row has."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], ls="", marker="o", color="tab:blue", label="one run"),
               Line2D([], [], ls="", marker="o", mfc="white", mec=UNTRUSTED,
                      label=f"k-hat > {KHAT_TRUSTED}: do not trust (red, !)"),
               Line2D([], [], color="0.4", lw=1, label="± 2 Monte Carlo se")]
    figure.legend(handles=handles, loc="lower center", ncol=3, frameon=False,
                  bbox_to_anchor=(0.5, (bottom - 0.4) / height))
    figure.text(0.5, 0.08 / height, note, ha="center", va="bottom", fontsize=8, color="0.3")
    per = f"{seeds} seeds per combination, a dot per run; written: the mean over seeds " \
          "(ELBO, log evidence), the worst seed (the rest)" if seeds > 1 else \
          "one run per combination"
    figure.suptitle(per, fontsize=10)


def from_best(runs: list[list[Result]], metric: str) -> list[list[Result]]:
    """In a suite each recipe is its own model, and ELBOs of different models share no scale:
    each run's value less the best of its recipe's runs (0 for the best, negative below).
    The runs are copied, not changed."""
    best: dict[Any, float] = {}
    for run in (r for rs in runs for r in rs):
        value = run.metrics.get(metric)
        if value is not None and math.isfinite(value):
            recipe = run.spec.combo[0]
            best[recipe] = max(best.get(recipe, value), value)
    return [[replace(r, metrics={**r.metrics, metric: r.metrics[metric] - best[r.spec.combo[0]]})
             if r.metrics.get(metric) is not None and r.spec.combo[0] in best
             and math.isfinite(r.metrics[metric]) else r for r in rs] for rs in runs]


def _plot_label(grids: list[Grid], runs: list[Result], ok: list[Result]) -> str:
    """A combination's row label: its grid values, and why it has no dots if it has none."""
    text = label(grids, runs[0].spec.combo)
    return text if ok else f"{text} (failed)"


def _plot_note(results: list[Result]) -> str:
    """The plot's footnote: why these numbers, and which are missing."""
    draws = {r.draws for r in results if r.draws is not None}
    counted = f"the same {draws.pop()}" if len(draws) == 1 else "the same number of"
    note = (f"ELBO and log evidence: importance weights of {counted} guide draws for every "
            "run, whatever loss trained it (training losses are different objectives: "
            "final_loss in compare.csv)")
    if not any(r.metrics.get("mean_error_sd") is not None for r in results):
        note += "\nno exact posterior: mean error / sd and sd ratio are n/a"
    return note


def _dot_panel(ax: Any, panel: tuple[str, str, str], runs: list[list[Result]]) -> None:
    """One metric's panel: each run a dot (with ± 2 se where it has one), each combination's
    value written above its dots."""
    metric, title, spec = panel
    extents: list[float] = []
    for y, rs in enumerate(runs):
        step = min(0.12, 0.4 / max(len(rs) - 1, 1))
        for i, run in enumerate(rs):
            value = run.metrics.get(metric)
            if value is None or not math.isfinite(value):
                continue
            se = run.metrics.get(f"{metric}_se")
            spread = 2 * se if se is not None and math.isfinite(se) else 0.0
            bad = untrusted(run.metrics.get("khat"))
            ax.errorbar(value, y + (i - (len(rs) - 1) / 2) * step, xerr=spread or None,
                        fmt="o", ms=6, mfc="white" if bad else "tab:blue",
                        mec=UNTRUSTED if bad else "tab:blue", ecolor="0.4", elinewidth=1,
                        capsize=2, zorder=3)
            extents += [value - spread, value + spread]
    low, high = _span(metric, extents)
    _axis(ax, metric, low, high)
    for y, rs in enumerate(runs):
        _write_value(ax, y, rs, metric, spec, low, high)
    ax.set_xlabel(title)
    ax.grid(axis="x", alpha=0.3)


def _span(metric: str, values: list[float]) -> tuple[float, float]:
    """The x range of a panel: the values and room to write them; 0 for an error, 1 for a
    ratio, KHAT_TRUSTED for k-hat; at least 0.1 nats wide for ELBO and log evidence, so Monte
    Carlo noise does not fill the panel."""
    if metric == "sd_ratio":
        values = [v for v in values if v > 0] + [1.0]
        return min(values) / 1.6, max(values) * 1.6
    if metric == "mean_error_sd":
        high = max(values + [0.1]) * 1.25
        return -0.1 * high, high
    if metric == "khat":
        low, high = min(values + [0.0]), max(values + [1.0])
        return low - 0.15 * (high - low), high + 0.15 * (high - low)
    if not values:
        return -1.0, 1.0
    low, high = min(values), max(values)
    middle, half = (low + high) / 2, max(high - low, 0.1) / 2
    return middle - 1.3 * half, middle + 1.3 * half


def _axis(ax: Any, metric: str, low: float, high: float) -> None:
    """A panel's x axis from ``low`` to ``high``, with plain tick labels (no offset) and its
    reference: 1 for a ratio (log scale), the k-hat limit, 0 for an error."""
    from matplotlib.ticker import FixedLocator, MaxNLocator, NullLocator, ScalarFormatter

    if metric == "sd_ratio":
        ax.set_xscale("log")
        ticks = [t for t in RATIO_TICKS if low <= t <= high]
        if high / low > 50:  # a point mass's sd ratio, say: one tick a decade
            ticks = [10.0 ** k for k in range(math.ceil(math.log10(low)),
                                              math.floor(math.log10(high)) + 1)]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.axvline(1.0, color="0.3", lw=1, zorder=1)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4))
        ax.ticklabel_format(axis="x", style="plain", useOffset=False)
    if metric == "mean_error_sd":
        ax.axvline(0.0, color="0.3", lw=1, zorder=1)
    if metric == "khat":
        ax.axvspan(KHAT_TRUSTED, high, color=UNTRUSTED, alpha=0.1, lw=0, zorder=0)
        ax.axvline(KHAT_TRUSTED, color=UNTRUSTED, lw=1, ls="--", zorder=1)
    ax.set_xlim(low, high)


def _write_value(ax: Any, y: int, runs: list[Result], metric: str, spec: str, low: float,
                 high: float) -> None:
    """A combination's value for a panel, above its dots: red and marked "!" where a seed's
    k-hat says not to trust it; "n/a" where its runs have no such number."""
    if not runs:
        return
    value = combined(runs, metric)
    bad = untrusted(combined(runs, "khat"))
    text = "n/a" if value is None else format(value, spec) + (" !" if bad else "")
    if value is not None and math.isfinite(value) and low <= value <= high:
        x = value
    else:  # in the middle of the panel
        x = math.sqrt(low * high) if metric == "sd_ratio" else (low + high) / 2
    ax.text(x, y - 0.3, text, ha="center", va="bottom", fontsize=8,
            color=UNTRUSTED if bad else "0.15")
