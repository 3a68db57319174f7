"""What a fitted guide says about each latent site, beside the exact posterior where known."""

from __future__ import annotations

from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from pyro.distributions import Delta
from pyro.poutine.util import site_is_subsample

NUM_DRAWS = 10_000


def latent_sites(trace: poutine.Trace) -> dict[str, torch.Size]:
    """The model's latent sample sites and their shapes, in the order the model samples them;
    not the discrete ones a loss sums out by enumeration, which no guide samples."""
    return {
        name: site["value"].shape
        for name, site in trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site)
        and not site["infer"].get("enumerate")
    }


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


def summarize(
    guide: Callable,
    data: dict[str, Any],
    sites: dict[str, torch.Size],
    nesting: int,
    exact: dict[str, torch.distributions.Distribution] | None = None,
) -> dict[str, dict[str, Any]]:
    """Mean and sd of each latent site under the guide, analytic where the guide allows,
    otherwise from guide draws; with the exact posterior's mean and sd where known."""
    with torch.no_grad():
        moments = _analytic(guide, data, sites) or _sampled(guide, data, sites, nesting)
        summary = {}
        for name, (mean, std, method) in moments.items():
            entry = {"mean": to_plain(mean), "std": to_plain(std), "method": method}
            if exact and name in exact:
                entry["exact_mean"] = to_plain(exact[name].mean)
                entry["exact_std"] = to_plain(exact[name].stddev)
            summary[name] = entry
    return summary


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


def _sampled(guide: Callable, data: dict, sites: dict, nesting: int) -> dict:
    """Each site's mean and sd over draws from the guide, vectorised where the guide allows."""
    try:
        with pyro.plate("_vibench_draws", NUM_DRAWS, dim=-(nesting + 1)):
            trace = poutine.trace(guide).get_trace(**data)
        draws = {name: trace.nodes[name]["value"].reshape(NUM_DRAWS, *shape)
                 for name, shape in sites.items()}
    except (RuntimeError, ValueError, NotImplementedError):
        traces = [poutine.trace(guide).get_trace(**data) for _ in range(NUM_DRAWS // 10)]
        draws = {name: torch.stack([t.nodes[name]["value"] for t in traces]) for name in sites}
    return {name: (d.float().mean(0), d.float().std(0), "sampled") for name, d in draws.items()}


def to_plain(value: torch.Tensor) -> float | list:
    """A tensor as JSON takes it: a float for one number, else nested lists."""
    value = value.detach().cpu()
    return value.item() if value.numel() == 1 and value.dim() == 0 else value.tolist()
