"""The numbers a comparison compares: each run's from its summary.json, and a combination's
over its seeds (the worst seed for accuracy, so one seed's bad fit does not hide behind a good
one). Whether a k-hat is to be trusted is workbench.report.thresholds' to say."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from workbench.report.thresholds import khat_trusted
from workbench.rundir import files
from workbench.rundir import summary as schema
from workbench.rundir.layout import SUMMARY

if TYPE_CHECKING:
    from workbench.compare.results import Result

METRICS = ("elbo", "elbo_se", "log_evidence", "log_evidence_se", "mean_error_sd", "sd_ratio",
           "khat", "final_loss", "mean_error", "std_error", "steps_per_second")
WORST_OF_SEEDS = ("mean_error_sd", "sd_ratio", "khat")  # the rest: the mean over seeds


def read_summary(result: Result) -> schema.Summary | None:
    """Fill in a result's metrics from its run's summary.json, and return it, where there is
    one that holds what a summary must."""
    try:
        data = json.loads(files.read_bounded(result.run_dir / SUMMARY))
    except (OSError, ValueError, files.UnsafeFile):
        return None
    if schema.check(data):
        return None
    summary = schema.read(data)
    result.metrics = metrics(data)
    result.khat_reading = str(summary.diagnostics.get("reading") or "")
    draws = summary.diagnostics.get("num_draws")
    result.draws = draws if isinstance(draws, int) else None
    result.steps = summary.steps
    result.wall_seconds = number(summary.wall_seconds)
    return summary


def metrics(summary: dict) -> dict[str, float | None]:
    """One run's numbers from its summary.json's content (any part of it: a number it lacks
    is None).

    The same yardstick for every run whatever its loss: the ELBO and the importance-sampled
    log evidence, each with its Monte Carlo se, from the report's guide draws. Where the exact
    posterior is known (or a reference one: its report's z and r), errors in units of its sd,
    so sites of any scale compare:
    ``mean_error_sd`` the largest |mean - exact mean| / exact sd, ``sd_ratio`` the guide sd /
    exact sd furthest from 1, over every site and element; and the raw ``mean_error`` and
    ``std_error`` (largest absolute differences) that compare.csv always had. Then k-hat, the
    run's own final loss and steps/s. None where the run has no such number.
    """
    entries = [e for e in (summary.get("posterior") or {}).values() if isinstance(e, dict)]
    diagnostics = summary.get("diagnostics")
    diagnostics = diagnostics if isinstance(diagnostics, dict) else {}
    khat = [v for v in _flatten(diagnostics.get("khat")) if number(v) is not None]
    z, r = _standardised(summary, entries)
    return {
        **{key: number(diagnostics.get(key))
           for key in ("elbo", "elbo_se", "log_evidence", "log_evidence_se")},
        "mean_error_sd": _largest(z),
        "sd_ratio": _furthest_from_one(r),
        "khat": _largest(khat),
        "final_loss": number(summary.get("final_loss")),
        "mean_error": _largest([abs(a - b) for e in entries
                                for a, b in _elements(e, ("mean", "exact_mean"))]),
        "std_error": _largest([abs(a - b) for e in entries
                               for a, b in _elements(e, ("std", "exact_std"))]),
        "steps_per_second": number(summary.get("steps_per_second")),
    }


def _standardised(summary: dict, entries: list[dict]) -> tuple[list[float], list[float]]:
    """Every |mean - exact mean| / exact sd and guide sd / exact sd, over sites and elements;
    without an exact posterior, the z and r the report scored against a reference one."""
    both = [(m, s, em, es) for e in entries
            for m, s, em, es in _elements(e, ("mean", "std", "exact_mean", "exact_std"))
            if es > 0]
    z = [abs(m - em) / es for m, _, em, es in both]
    r = [s / es for _, s, _, es in both]
    reference = summary.get("reference")
    scored = reference.get("params") if isinstance(reference, dict) else None
    if not both and isinstance(scored, dict):  # a reference posterior known by its moments
        z = [v for e in scored.values() if isinstance(e, dict)
             for v in [number(e.get("z"))] if v is not None]
        r = [v for e in scored.values() if isinstance(e, dict)
             for v in [number(e.get("r"))] if v is not None]
    return z, r


def _elements(entry: dict, keys: tuple[str, ...]) -> list[tuple[float, ...]]:
    """A posterior entry's values under ``keys``, element by element, where each is a number
    (none where a key is missing: the exact posterior is not known)."""
    if not all(key in entry for key in keys):
        return []
    columns = zip(*(_flatten(entry[key]) for key in keys))
    return [tuple(map(float, row)) for row in columns
            if all(number(v) is not None for v in row)]


def _flatten(value: Any):
    if isinstance(value, dict):
        for item in value.values():
            yield from _flatten(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _flatten(item)
    else:
        yield value


def number(value: Any) -> float | None:
    """A JSON value as a float, None where it is not a number (a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _largest(values: list[float]) -> float | None:
    if not values:
        return None
    return math.nan if any(math.isnan(v) for v in values) else max(values)


def _furthest_from_one(ratios: list[float]) -> float | None:
    """The ratio furthest from 1 on a log scale, where half is as far off as twice; NaN if
    any is."""
    if not ratios:
        return None
    if any(math.isnan(r) for r in ratios):
        return math.nan
    return max(ratios, key=lambda r: abs(math.log(r)) if 0 < r < math.inf else math.inf)


def mean(values: list[float | None]) -> float | None:
    """The mean of the values known, None if none is."""
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def combined(runs: list[Result], key: str) -> float | None:
    """A combination's number over its seeds: the worst seed for the accuracy numbers (one
    seed's bad fit must not hide behind a good one), the se of the mean for a standard error,
    the mean for the rest."""
    values = [r.metrics.get(key) for r in runs]
    known = [v for v in values if v is not None]
    if key == "sd_ratio":
        return _furthest_from_one(known)
    if key in WORST_OF_SEEDS:
        return _largest(known)
    if key.endswith("_se") and known:
        return math.sqrt(sum(v * v for v in known)) / len(known)
    return mean(values)


def untrusted(khat: float | None) -> bool:
    """Whether a k-hat says not to trust the fit: over thresholds.KHAT_TRUSTED, or not a
    number (NaN). A run without a k-hat (None) gets no verdict."""
    return khat is not None and not khat_trusted(khat)
