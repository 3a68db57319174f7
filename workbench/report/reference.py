"""The guide against a reference posterior, parameter by parameter in the reference's names.

A model may have ``reference_posterior(**data)`` (see ``hookspecs.register_models``)::

    {"params": {name: {"mean": float, "sd": float, ...}},   # e.g. Stan's "beta[2]"
     "sites": {name: (site, index)},                      # where the guide's value is
     "draws": path}                                       # optional, not read here

``section`` reads each parameter's guide mean and sd off the run's posterior summary (its
``pyro.deterministic`` sites included, as ``posterior.summarize`` gives them) and scores them
against the reference: z = |mean - ref mean| / ref sd, r = sd / ref sd, and the same for the
importance-weighted estimates where PSIS gave them. The fit is good when every z <= ``MAX_Z``
and every r lies in ``SD_RATIO`` (workbench/report/thresholds.py); ``lines`` says it on the
terminal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from workbench.report import thresholds
from workbench.rundir.summary import Reference

MAX_LINES = 12


def section(model: Any, data: dict, post: dict) -> dict:
    """``{"reference": ...}`` for summary.json when the model offers a reference posterior,
    else ``{}``; a failure becomes the section's ``reason``, so it never costs the report."""
    method = getattr(model, "reference_posterior", None)
    if method is None:
        return {}
    try:
        reference = method(**data)
        params, sites = dict(reference["params"]), dict(reference.get("sites") or {})
        return {"reference": compare(params, sites, dict(post))}
    except Exception as exc:  # noqa: BLE001 - reported in the section, not raised
        from workbench.errors import one_line

        return {"reference": {"reason": f"the comparison failed: {one_line(exc)}"}}


def compare(params: dict, sites: dict, moments: dict) -> dict:
    """z and r per reference parameter, their extremes and the verdict; parameters that
    cannot be compared go to ``skipped`` with the reason."""
    rows: dict[str, dict] = {}
    skipped: dict[str, str] = {}
    for name, ref in params.items():
        try:
            rows[name] = score(ref, moments, *locate(name, sites, moments))
        except LookupError as exc:
            skipped[name] = str(exc.args[0])
    result: dict[str, Any] = {"params": rows, **extremes(rows.values(), "")}
    if rows and all("iw_z" in row for row in rows.values()):
        result.update(extremes(rows.values(), "iw_"))
    verdict = passes(result) if rows else None
    result["good"] = None if skipped and verdict else verdict
    if skipped:
        result["skipped"] = skipped
    return result


def locate(name: str, sites: dict, moments: dict) -> tuple[str, tuple[int, ...]]:
    """The site and index holding a reference parameter; LookupError with the reason if the
    model has no such site or element."""
    if name not in sites:
        raise LookupError("the reference does not say which site holds it")
    site, index = sites[name]
    if site not in moments:
        raise LookupError(f"the model has no site {site!r}")
    try:
        element(moments[site]["mean"], tuple(index))
    except (IndexError, TypeError):
        raise LookupError(f"site {site!r} has no element {tuple(index)}") from None
    return site, tuple(index)


def score(ref: dict, moments: dict, site: str, index: tuple[int, ...]) -> dict:
    """One parameter's guide moments beside the reference's, with z and r (and iw_z, iw_r
    where the importance-weighted estimates exist)."""
    entry = moments[site]
    ref_mean, ref_sd = float(ref["mean"]), float(ref["sd"])
    if not ref_sd > 0:
        raise LookupError(f"the reference sd is {ref_sd}, so z and r are undefined")
    row = {"mean": element(entry["mean"], index), "std": element(entry["std"], index),
           "ref_mean": ref_mean, "ref_sd": ref_sd}
    row["z"] = abs(row["mean"] - ref_mean) / ref_sd
    row["r"] = row["std"] / ref_sd
    if "iw_mean" in entry and "iw_std" in entry:
        row["iw_z"] = abs(element(entry["iw_mean"], index) - ref_mean) / ref_sd
        row["iw_r"] = element(entry["iw_std"], index) / ref_sd
    return row


def element(value: Any, index: tuple[int, ...]) -> float:
    """One number of a summary value (a float, or nested lists in the site's shape)."""
    for i in index:
        if not isinstance(value, list):
            raise IndexError(index)
        value = value[i]
    if isinstance(value, list):
        raise TypeError(f"index {index} names {len(value)} numbers, not one")
    return float(value)


def extremes(rows, prefix: str) -> dict:
    """max z, min r and max r over the rows (``prefix`` "iw_" for the weighted ones); a NaN
    anywhere makes its extremes NaN, which never passes."""
    rows = list(rows)
    if not rows:
        return {f"{prefix}max_z": None, f"{prefix}min_r": None, f"{prefix}max_r": None}
    zs = [row[f"{prefix}z"] for row in rows]
    rs = [row[f"{prefix}r"] for row in rows]
    return {f"{prefix}max_z": _nan_or(max, zs), f"{prefix}min_r": _nan_or(min, rs),
            f"{prefix}max_r": _nan_or(max, rs)}


def passes(result: dict, prefix: str = "") -> bool:
    """Every z <= thresholds.MAX_Z and every r within thresholds.SD_RATIO (False for NaN)."""
    low, high = thresholds.SD_RATIO
    return bool(result[f"{prefix}max_z"] <= thresholds.MAX_Z and low <= result[f"{prefix}min_r"]
                and result[f"{prefix}max_r"] <= high)


def _nan_or(pick: Callable, values: list[float]) -> float:
    return math.nan if any(math.isnan(v) for v in values) else pick(values)


# --------------------------------------------------------------------------------------------
# the terminal


def lines(reference: Reference, limit: int = MAX_LINES) -> list[str]:
    """The report's lines: a parameter a line (up to ``limit``), what was not compared, and
    the verdict."""
    if "params" not in reference:
        return [f"reference: not compared: {reference.get('reason', 'unknown')}"]
    out = []
    rows = list(reference["params"].items())
    for name, row in rows[:limit]:
        line = (f"{name}: {_number(row['mean'], '.4g')} +- {_number(row['std'], '.4g')} "
                f"(reference {_number(row['ref_mean'], '.4g')} +- "
                f"{_number(row['ref_sd'], '.4g')}): z {_number(row['z'])}, r {_number(row['r'])}")
        if "iw_z" in row:
            line += (f"; importance-weighted z {_number(row['iw_z'])}, "
                     f"r {_number(row['iw_r'])}")
        out.append(line)
    if len(rows) > limit:
        out.append(f"reference: {len(rows) - limit} more parameters in summary.json")
    for name, reason in (reference.get("skipped") or {}).items():
        out.append(f"reference: {name} not compared: {reason}")
    out.append(verdict(reference))
    return out


def verdict(reference: Reference) -> str:
    """"reference: max z 0.05, r 0.93-1.04: good" (or off, or incomplete)."""
    if not reference.get("params"):
        return "reference: no parameter compared"
    text = (f"reference: max z {_number(reference['max_z'])}, r {_number(reference['min_r'])}-"
            f"{_number(reference['max_r'])}")
    if "iw_max_z" in reference:
        text += (f" (importance-weighted max z {_number(reference['iw_max_z'])}, r "
                 f"{_number(reference['iw_min_r'])}-{_number(reference['iw_max_r'])})")
    good = reference.get("good")
    skipped = len(reference.get("skipped") or {})
    word = "good" if good else "off" if good is False else f"incomplete ({skipped} not compared)"
    return f"{text}: {word}"


def _number(value: float | None, spec: str = ".2f") -> str:
    """A number as the report shows it; None (what summary.json holds for NaN or infinity)
    as n/a."""
    return "n/a" if value is None else format(value, spec)
