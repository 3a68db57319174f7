"""A model's log density with its enumerated discrete sites summed out: log p(data, z) for
continuous draws z, where the model marks discrete sites ``infer={"enumerate": "parallel"}``
for a loss (TraceEnum_ELBO) to sum out and no guide samples them.

The sum is Pyro's own: the model runs under ``poutine.enum`` (its enumeration dims left of
its plates and of a plate of draws), and the sites' log-density factors are contracted over
those dims by ``pyro.ops.contract.contract_to_tensor``, plate by plate, as TraceEnum_ELBO
builds them (a factor that depends on an enumerated value is masked inside the sum and scaled
outside it).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from pyro import poutine
from pyro.ops import packed
from pyro.ops.contract import contract_to_tensor
from pyro.ops.rings import LogRing
from pyro.poutine.util import site_is_subsample


def enumerated_sites(trace: poutine.Trace) -> list[str]:
    """The sample sites a loss sums out by enumeration, in the order the model samples them."""
    return [name for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and site["infer"].get("enumerate")]


def sequential_sites(trace: poutine.Trace) -> list[str]:
    """The enumerated sites marked ``"sequential"``: each value a run of the model, which
    this module does not sum."""
    return [name for name in enumerated_sites(trace)
            if trace.nodes[name]["infer"]["enumerate"] != "parallel"]


def enumerated_size(trace: poutine.Trace) -> int:
    """How many times larger than the model's own tensors the enumerated run's may grow: the
    product of the enumerated sites' support sizes (1 without any)."""
    size = 1
    for name in enumerated_sites(trace):
        size *= trace.nodes[name]["fn"].enumerate_support(expand=False).shape[0]
    return size


def enumerated(model: Callable, dims: int) -> Callable:
    """The model under ``poutine.enum``, its enumeration dims left of ``dims`` batch dims
    (the model's plate nesting, plus one where a plate of draws surrounds it)."""
    return poutine.enum(model, first_available_dim=-(dims + 1))


def log_density(trace: poutine.Trace, draws: str | None = None, n: int = 1) -> torch.Tensor:
    """log p(data, z) of each draw, the enumerated sites summed out: from a trace of
    ``enumerated(model, ...)``, the draws in the plate named ``draws`` (``n`` of them; shape
    ``(n,)``), or one draw without such a plate (a scalar)."""
    trace.compute_log_prob(lambda name, site: not site_is_subsample(site))
    trace.pack_tensors()
    symbols = trace.plate_to_symbol
    target = frozenset({symbols[draws]}) if draws is not None and draws in symbols \
        else frozenset()
    sum_dims = {site["infer"]["_enumerate_symbol"] for site in trace.nodes.values()
                if site["type"] == "sample" and "_enumerate_symbol" in site["infer"]}
    costs, factors, scales = OrderedDict(), OrderedDict(), set()
    for site in trace.nodes.values():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        ordinal = frozenset(symbols[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        parts = site["packed"]
        if sum_dims.isdisjoint(parts["log_prob"]._pyro_dims):
            costs.setdefault(ordinal, []).append(parts["log_prob"])
            continue
        term = parts["unscaled_log_prob"]
        if "_enumerate_symbol" not in site["infer"]:  # masked inside the sum, scaled outside
            term = packed.scale_and_mask(term, mask=parts["mask"])
        factors.setdefault(ordinal, []).append(term)
        scales.add(_scalar_scale(site))
    total = _contracted(costs, set(), target, symbols.get(draws), n)
    if factors:
        if len(scales) != 1:
            raise ValueError("the enumerated sites do not share one poutine.scale")
        total = total + scales.pop() * _contracted(factors, sum_dims, target,
                                                   symbols.get(draws), n)
    return total if draws is not None else total.reshape(())


def pointwise(trace: poutine.Trace, observed: list[str]) -> dict[str, torch.Tensor] | str:
    """Each ``observed`` site's unscaled log density per observation with the enumerated
    sites it depends on summed out (``az.loo``'s pointwise log-likelihood), from a trace
    ``log_density`` has read; or why there is none. Summed out per observation only where
    those sites are local to it: inside the same plates as it, and depending on nothing
    else that is observed or continuous (an HMM's chain, a global label or a factor couples
    the observations, and the likelihood does not split)."""
    symbols = {site["infer"]["_enumerate_symbol"]: name for name, site in trace.nodes.items()
               if site["type"] == "sample" and "_enumerate_symbol" in site["infer"]}
    found = {}
    for name in observed:
        site = trace.nodes[name]
        group, coupled = _local_group(trace, name, symbols)
        if coupled:
            return (f"{name!r} depends on the summed-out site(s) {', '.join(map(repr, group))} "
                    f"through {coupled!r}, so its likelihood does not split by observation")
        term = site["unscaled_log_prob"]
        dims = {trace.nodes[e]["infer"]["_enumerate_dim"] for e in group}
        if len(dims) < len(group):
            return f"{name!r} depends on summed-out sites that share an enumeration dim"
        for e in group:
            term = term + trace.nodes[e]["unscaled_log_prob"]
        for dim in sorted(dims):
            term = term.logsumexp(dim, keepdim=True) if term.dim() >= -dim else term
        found[name] = term
    return found


def _local_group(trace: poutine.Trace, name: str, symbols: dict[str, str]
                 ) -> tuple[list[str], str]:
    """The enumerated sites observed site ``name`` depends on, directly or through each
    other, and the first site outside them (``name`` aside) that depends on them too, or one
    of them in other plates than ``name``'s ("" where none: they are its alone)."""
    def enum_symbols(site: dict) -> set[str]:
        return set(site["packed"]["log_prob"]._pyro_dims) & set(symbols)

    def plates(site: dict) -> frozenset:
        return frozenset(f.name for f in site["cond_indep_stack"] if f.vectorized)

    sites = {n: s for n, s in trace.nodes.items()
             if s["type"] == "sample" and not site_is_subsample(s) and "packed" in s}
    reached, group = enum_symbols(sites[name]), []
    while True:
        more = [symbols[sym] for sym in reached if symbols[sym] not in group]
        if not more:
            break
        group += more
        for e in more:
            reached |= enum_symbols(sites[e])
    for other, site in sites.items():
        outside = other != name and other not in group
        if outside and enum_symbols(site) & reached:
            return group, other
    wrong = [e for e in group if plates(sites[e]) != plates(sites[name])]
    return group, wrong[0] if wrong else ""


def _contracted(tree: OrderedDict, sum_dims: set, target: frozenset, draws: str | None,
                n: int) -> torch.Tensor:
    """The factors of ``tree`` contracted to the draws' plate (``target``): ``(n,)``."""
    sizes = {dim: size for terms in tree.values() for term in terms
             for dim, size in zip(term._pyro_dims, term.shape)}
    if draws is not None:
        sizes[draws] = n
    if not tree:
        return torch.zeros(n)
    term = contract_to_tensor(tree, sum_dims, target_ordinal=target,
                              ring=LogRing(dim_to_size=sizes))
    return term.reshape(-1).expand(n) if term.numel() == 1 else term.reshape(n)


def _scalar_scale(site: dict) -> float:
    """A site's subsampling scale as one number (enumeration supports no other)."""
    scale = site["scale"]
    if torch.is_tensor(scale) and scale.dim():
        raise ValueError("enumeration supports only a scalar poutine.scale")
    return float(scale)


def init_to_feasible(site: dict) -> torch.Tensor:
    """Pyro's ``init_to_feasible`` for the continuous sites, which fails on a discrete one; a
    site marked for enumeration gets a draw instead (any value: the sum covers them all)."""
    from pyro.infer.autoguide.initialization import init_to_feasible as feasible

    return site["fn"].sample() if site["infer"].get("enumerate") else feasible(site)
