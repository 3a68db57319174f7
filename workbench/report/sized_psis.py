"""The PSIS diagnostic sized to the data: where running the model over every row for every
guide draw would pass ``WORK`` numbers, each draw's log likelihood is estimated from a random
subset of one plate's rows, and the standard error that adds is reported beside k-hat.

The estimator is the difference estimator with a first-order Taylor control variate around
the draws' mean z0 (Quiroz, Kohn, Villani and Tran 2019; Magnusson, Andersen, Jonasson and
Vehtari 2019 use it to subsample PSIS-LOO)::

    log p(x | z) ~ L(z0) + G(z0) . (z - z0)
                   + N/m sum_{i in S} [l_i(z) - l_i(z0) - g_i(z0) . (z - z0)]

L and G (the whole data's log likelihood and its gradient in z) cost one pass over the data;
the sum runs over m random rows S per draw. The remainder is second order in z - z0, so its
error shrinks as the posterior narrows, which is where the data are big. The rows are split
into ``GROUPS`` random groups: the spread of the group sums gives each log weight's standard
error, and resampling the groups gives k-hat's.

Where no plate can be subsampled (no single plate holds the likelihood, latent sites live in
it, or the model does not index its data by the plate), the diagnostic takes fewer draws
instead and reports k-hat's Monte Carlo standard error (a bootstrap over the draws).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from workbench.errors import one_line

WORK = 2**25  # draws x numbers of the model's sites evaluated in full; above it, sized
SUBSAMPLE_WORK = 2**24  # draws x numbers of the rows of a subsample
MIN_ROWS = 1000  # a subsample has at least this many rows
MIN_DRAWS = 1000  # fewest draws the diagnostic takes when it cannot subsample
GROUPS = 20  # random groups of the subsample's rows: the replicates behind the errors
BOOTSTRAP = 50  # resamples behind k-hat's standard error


@dataclass
class Plate:
    """The plate whose rows are subsampled: its name, size N, dim and numbers a row."""

    name: str
    size: int
    dim: int
    per_row: int


def plate_of(trace: poutine.Trace) -> Plate | str:
    """The plate holding every observed site and no latent or deterministic site, the
    largest if several; else why there is none."""
    from workbench.report import posterior

    observed = posterior.observed_sites(trace)
    if not observed:
        return "the model observes nothing"
    common = None
    for name in observed:
        frames = {(f.name, f.size, f.dim) for f in trace.nodes[name]["cond_indep_stack"]
                  if f.vectorized and f.dim is not None}
        common = frames if common is None else common & frames
    others = {f.name for site_name in {**posterior.latent_sites(trace),
                                       **posterior.deterministic_sites(trace)}
              for f in trace.nodes[site_name]["cond_indep_stack"]}
    subsampled = {name for name, site in trace.nodes.items() if site_is_subsample(site)}
    found = sorted((f for f in common or () if f[0] not in others and f[0] in subsampled),
                   key=lambda f: -f[1])
    if not found:
        return "no plate holds all of the likelihood and no latent site"
    name, size, dim = found[0]
    per_row = sum(trace.nodes[n]["value"].numel() for n in observed) // max(size, 1)
    return Plate(name, size, dim, max(per_row, 1))


def draw_numbers(trace: poutine.Trace) -> int:
    """The numbers one draw of the model computes: its sample sites' (not a plate's
    indices)."""
    return max(1, sum(site["value"].numel() for site in trace.nodes.values()
                      if site["type"] == "sample" and not site_is_subsample(site)
                      and torch.is_tensor(site["value"])))


def fewer_draws(trace: poutine.Trace, num_draws: int, why: str) -> tuple[int, str]:
    """The draws that fit ``WORK`` (at least ``MIN_DRAWS``, none when even those would pass
    eight times ``WORK``) and the line that says so."""
    per_draw = draw_numbers(trace)
    count = min(num_draws, max(MIN_DRAWS, WORK // per_draw))
    if count * per_draw > 8 * WORK:
        return 0, (f"the data are too big for {count} draws of the whole model and cannot be "
                   f"subsampled ({why})")
    return count, (f"PSIS on {count} of {num_draws} draws, sized to the data (cannot "
                   f"subsample rows: {why})")


def draws_khat_se(log_w: torch.Tensor, seed: int = 0) -> float:
    """k-hat's Monte Carlo standard error: its spread over bootstrap resamples of the draws."""
    from workbench.report import posterior

    gen = torch.Generator().manual_seed(seed)
    count = log_w.numel()
    khats = [posterior.psis(log_w[torch.randint(count, (count,), generator=gen)])[0]
             for _ in range(BOOTSTRAP)]
    return _spread(khats)


def subsampled(model: Callable, guide: Callable, data: dict, nesting: int,
               trace: poutine.Trace, num_draws: int) -> dict[str, Any] | str:
    """``posterior.diagnostics``' result with each draw's likelihood estimated from a
    subset of rows, or why the rows cannot be subsampled."""
    from workbench.report import posterior

    plate = plate_of(trace)
    if isinstance(plate, str):
        return plate
    rows = max(MIN_ROWS, SUBSAMPLE_WORK // (num_draws * plate.per_row))
    if rows * 2 > plate.size:
        return f"plate {plate.name!r} is too small to subsample"
    sites = posterior.latent_sites(trace)
    derived = posterior.deterministic_sites(trace)
    device = next(iter(trace.nodes[n]["value"].device for n in sites), torch.device("cpu"))
    if any(not trace.nodes[n]["value"].is_floating_point() for n in sites):
        return "a latent site is discrete (no gradient for the control variate)"
    # The guide's draws first: their mean is the control variate's centre.
    guide_traces = _guide_traces(guide, data, nesting, num_draws, trace, rows, plate)
    if isinstance(guide_traces, dict):
        return guide_traces
    missing = [name for name in sites if name not in guide_traces[0][1].nodes]
    if missing:
        return {"khat": None, "reason": "the guide does not sample " + ", ".join(
            repr(name) for name in missing)}
    draws = {name: torch.cat([t.nodes[name]["value"].reshape(n, *shape)
                              for n, t in guide_traces]) for name, shape in sites.items()}
    centre = {name: d.double().mean(0).to(d.dtype) for name, d in draws.items()}
    indices = torch.randperm(plate.size, device=device)[:rows]  # after the draws: the same
    groups = list(indices.chunk(GROUPS))  # draws as the whole-data diagnostic's, seed for seed
    observed = set(posterior.observed_sites(trace))
    anchor = _anchor(model, data, plate, centre, groups, derived, observed)
    if isinstance(anchor, str):
        return anchor
    terms = _subset_terms(model, data, nesting, plate, indices, groups, guide_traces,
                          observed, derived)
    if isinstance(terms, str):
        return terms
    log_rest, log_q, per_group, derived_parts = terms
    total, gradient, group_totals, group_gradients = anchor
    shift = torch.cat([(d - centre[name]).reshape(num_draws, -1).double()
                       for name, d in draws.items()], 1).cpu()
    # (draws, groups): what the control variate leaves, second order in the shift
    remainder = per_group - group_totals - shift @ group_gradients.T
    base = log_rest + total + shift @ gradient - log_q
    scale = plate.size / rows
    draws.update(derived_parts)
    result = posterior.weighed(base + scale * remainder.sum(1), draws, sites, num_draws)
    if result.get("khat") is None:
        return result
    return _with_errors(result, base, remainder, plate, rows)


def _guide_traces(guide: Callable, data: dict, nesting: int, num_draws: int,
                  trace: poutine.Trace, rows: int, plate: Plate) -> list | dict[str, Any]:
    """The guide's ``num_draws`` draws as ``(count, trace)`` chunks (each vectorised, small
    enough for the subset's model to run on), or the diagnostic's result saying why not."""
    from workbench.report import posterior

    chunk = max(1, min(num_draws, posterior.MAX_ELEMENTS // max(
        posterior.trace_numbers(trace) * rows // plate.size, 1)))
    guide_traces = []
    try:
        for start in range(0, num_draws, chunk):
            n = min(chunk, num_draws - start)
            with pyro.plate(posterior.DRAWS_PLATE, n, dim=-(nesting + 1)):
                guide_traces.append((n, poutine.trace(guide).get_trace(**data)))
    except (RuntimeError, ValueError, NotImplementedError, IndexError) as exc:
        return {"khat": None, "reason": f"the guide cannot be run vectorised over "
                                        f"{num_draws} draws: {one_line(exc)}"}
    return guide_traces


def _subset_terms(model: Callable, data: dict, nesting: int, plate: Plate,
                  indices: torch.Tensor, groups: list, guide_traces: list, observed: set[str],
                  derived: dict) -> tuple | str:
    """The model replayed on the subset's rows against each guide draw: per draw, the log
    density of everything but the likelihood, log q, each group's likelihood (unscaled), and
    the deterministic sites' values; or why the model cannot run on a subset of rows."""
    from workbench.report import posterior

    rows = len(indices)
    rows_model = _rows(model, plate, indices)
    per_draw = plate.per_row * rows  # the likelihood's numbers a draw: the largest tensors
    log_rest, log_q, per_group, derived_parts = [], [], [], {name: [] for name in derived}
    try:
        for n, guide_trace in guide_traces:
            log_q.append(posterior.log_joint(guide_trace, n, nesting).double().cpu())
            for m, part in posterior.draw_slices(guide_trace, n, nesting, per_draw):
                with pyro.plate(posterior.DRAWS_PLATE, m, dim=-(nesting + 1)):
                    model_trace = poutine.trace(
                        poutine.replay(rows_model, trace=part)).get_trace(**data)
                rest, likelihood = _split_terms(model_trace, m, rows, plate, nesting, observed)
                log_rest.append(rest)
                per_group.append(torch.stack([
                    group.sum(1) for group in likelihood.split([len(g) for g in groups], 1)],
                    1))
                for name, shape in derived.items():
                    derived_parts[name].append(
                        model_trace.nodes[name]["value"].reshape(m, *shape))
    except (RuntimeError, ValueError, NotImplementedError, IndexError) as exc:
        return f"the model cannot be run on a subset of rows: {one_line(exc)}"
    return (torch.cat(log_rest), torch.cat(log_q), torch.cat(per_group),
            {name: torch.cat(parts) for name, parts in derived_parts.items()})


def _split_terms(model_trace: poutine.Trace, n: int, rows: int, plate: Plate, nesting: int,
                 observed: set[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """A replayed subset trace's log density as ``(n,)`` for everything but the likelihood
    and ``(n, rows)`` for each row's likelihood (unscaled), both float64 on the CPU."""
    from workbench.report import posterior

    posterior.compute_log_prob(model_trace)
    # the sums are made on the CPU: the model's device is the default one here
    rest = torch.zeros(n, dtype=torch.float64, device="cpu")
    likelihood = None
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if name in observed:
            # log_prob is scaled by N/m: each row's own term, unscaled.
            part = _per_row(site["log_prob"] * (rows / plate.size), n, rows, nesting,
                            plate.dim)
            likelihood = part if likelihood is None else likelihood + part
        else:
            rest += posterior._per_draw(site["log_prob"], n, nesting).double().cpu()
    return rest, likelihood


def _with_errors(result: dict[str, Any], base: torch.Tensor, remainder: torch.Tensor,
                 plate: Plate, rows: int) -> dict[str, Any]:
    """``result`` with the standard errors subsampling adds: each log weight's and the
    ELBO's from the spread of the group sums, k-hat's from resampling the groups."""
    from workbench.report import posterior

    scale = plate.size / rows
    correction = 1.0 - rows / plate.size
    log_w_se = scale * (GROUPS * remainder.var(1) * correction).sqrt()
    gen = torch.Generator().manual_seed(0)
    khats = []
    for _ in range(BOOTSTRAP):
        counts = torch.bincount(torch.randint(GROUPS, (GROUPS,), generator=gen, device="cpu"),
                                minlength=GROUPS).double()
        khats.append(posterior.psis(base + scale * remainder @ counts)[0])
    elbo_extra = scale * math.sqrt(GROUPS * float(remainder.mean(0).var()) * correction)
    result["elbo_se"] = math.hypot(result["elbo_se"], elbo_extra)
    khat_se = _spread(khats)  # nan where k-hat is infinite in the resamples
    weight_se = float(log_w_se.median())
    result.update({
        "khat_se": khat_se, "log_weight_se": weight_se,
        "plate": plate.name, "rows": rows, "of_rows": plate.size,
        "sized": (f"PSIS on {rows} of {plate.size} rows of plate {plate.name!r}, sized to "
                  f"the data (difference estimator): "
                  + (f"k-hat +- {khat_se:.2f}, " if math.isfinite(khat_se) else "")
                  + f"each log weight +- {weight_se:.2g}"),
    })
    return result


def _anchor(model: Callable, data: dict, plate: Plate, centre: dict, groups: list,
            derived: dict, observed: set[str]) -> tuple | str:
    """At the centre z0: the whole data's log likelihood and its gradient in the latent
    values, and each group's; or why the model cannot be subsampled (it does not index its
    data by the plate, or a deterministic site sees the rows)."""

    def likelihood(indices: torch.Tensor | None) -> tuple[float, torch.Tensor, dict]:
        values = {name: value.detach().clone().requires_grad_() for name, value in
                  centre.items()}
        run = poutine.condition(model, data=values)
        if indices is not None:
            run = _rows(run, plate, indices)
        with torch.enable_grad():
            model_trace = poutine.trace(run).get_trace(**data)
            total = sum(site["fn"].log_prob(site["value"]).sum() for name, site in
                        model_trace.nodes.items() if name in observed)
            grads = torch.autograd.grad(total, list(values.values()), allow_unused=True)
        flat = torch.cat([(torch.zeros_like(v) if g is None else g).reshape(-1).double()
                          for v, g in zip(values.values(), grads)])
        return float(total), flat.cpu(), model_trace

    try:
        total, gradient, whole = likelihood(None)
        parts = [likelihood(g) for g in groups]
    except (RuntimeError, ValueError, NotImplementedError, IndexError) as exc:
        return f"the model cannot be run on a subset of rows: {one_line(exc)}"
    first, indices = parts[0][2], groups[0]
    for name in observed:
        full = whole.nodes[name]["value"]
        dim = full.dim() + plate.dim - (whole.nodes[name]["fn"].event_dim or 0) \
            if full.dim() else 0
        seen = first.nodes[name]["value"]
        if seen.shape[dim] != len(indices) or not torch.equal(
                full.index_select(dim, indices), seen):
            return f"the model does not index its data by plate {plate.name!r}"
    for name in derived:
        if not torch.equal(whole.nodes[name]["value"], first.nodes[name]["value"]):
            return f"deterministic site {name!r} depends on the rows"
    return (total, gradient, torch.tensor([p[0] for p in parts], dtype=torch.float64,
                                          device="cpu"),
            torch.stack([p[1] for p in parts]))


def _rows(model: Callable, plate: Plate, indices: torch.Tensor) -> Callable:
    """The model with the plate's batch fixed to ``indices``."""
    from workbench.data.minibatch import Minibatch

    rows = Minibatch(plate.name, plate.size, len(indices), indices.device, plate.dim)
    rows.indices = indices
    return rows(model)


def _per_row(log_prob: torch.Tensor, n: int, rows: int, nesting: int, dim: int
             ) -> torch.Tensor:
    """A site's log density in a vectorised trace as ``(n, rows)``: summed over every dim
    but the draws' (at ``-(nesting + 1)``) and the plate's."""
    dims = nesting + 1
    log_prob = log_prob.reshape((1,) * (dims - log_prob.dim()) + log_prob.shape)
    moved = log_prob.movedim((-dims, dim), (0, 1))
    flat = moved.expand(n, rows, *moved.shape[2:]).reshape(n, rows, -1)
    return (flat[..., 0] if flat.shape[-1] == 1 else flat.sum(-1)).double().cpu()


def _spread(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return math.nan
    mean = sum(finite) / len(finite)
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))
