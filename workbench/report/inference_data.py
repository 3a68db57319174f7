"""A run's posterior draws as ArviZ InferenceData, ``posterior.nc`` in the run directory, so
that ArviZ (``az.from_netcdf``, ``az.summary``, ``az.loo``, ``az.plot_ppc``) and any NetCDF
reader take a fit as they take an MCMC run.

The groups follow ArviZ's conventions, dims ``chain`` and ``draw`` first (one chain: a guide
is one fit), a plate's name for the dims it indexes and ``<site>_dim_<i>`` for the others:

- ``posterior``: every latent site and every ``pyro.deterministic`` site, per guide draw
  (not the sites a model marks auxiliary: ``posterior.AUXILIARY``);
- ``posterior_predictive``: each observed site drawn again from the model given each draw;
- ``log_likelihood``: each observed site's log density per observation and draw (``az.loo``),
  the sites a model enumerates summed out where they are each observation's own (else left
  out, ``left_out`` saying why: ``marginal.pointwise``);
- ``observed_data``: the observed values (these and their replicates are integers for a
  discrete likelihood, so ``az.plot_ppc`` draws them as a histogram);
- ``sample_stats``: ``lp`` (log p(x, z)) and ``log_weight`` (log p(x, z) - log q(z)) per draw,
  with the PSIS k-hat of those weights as the attribute ``khat``.

The draws are ``NUM_DRAWS``, fewer where draws x the numbers a draw stores would pass
``MAX_NUMBERS``. Data so big that ``MIN_DRAWS`` draws of their replicated values and
pointwise log-likelihood would pass it get the latent sites and the observed data only (the
model is not run over the whole data once per draw), and the file's ``left_out`` attribute
says so. A minibatch run is drawn over its whole data, under the same rule. Every group's
``num_draws`` attribute is the draw count; the draws come from their own random stream,
seeded by the run's seed, so ``vibench export`` writes what the run's report wrote.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pyro import poutine

from workbench.device import rng_devices
from workbench.report import broadcast, marginal, posterior, thresholds
from workbench.rundir import files
from workbench.rundir.layout import POSTERIOR

NUM_DRAWS = 1000  # guide draws in posterior.nc
MIN_DRAWS = 100  # fewer than this and the per-observation groups are left out
MAX_NUMBERS = 2**23  # numbers posterior.nc may hold (32 MB of float32)
UNPREDICTED = "train.predictive is off"  # left_out's reason for the per-observation groups


def write(run: Any, run_dir: Path, guide: Callable | None = None,
          num_draws: int = NUM_DRAWS) -> Path:
    """Draw from the run's fitted guide (``guide``: the one the report summarised, if it has
    it) and write ``posterior.nc`` in ``run_dir``, whole or not at all; returns its path.
    With ``train.predictive`` off it has no posterior_predictive or log_likelihood group."""
    import pyro

    path = Path(run_dir) / POSTERIOR
    with torch.no_grad(), torch.random.fork_rng(devices=rng_devices(run.device)), \
            posterior.whole_data(run.minibatch):
        torch.manual_seed(run.recipe["seed"])
        if guide is None:
            guide = fitted_guide(run)
        groups, attrs = draw(run.model, guide, run.data, run.nesting, num_draws,
                             predictive=run.recipe["train"].get("predictive", True))
    attrs[""].update({"inference_library": "pyro",
                      "inference_library_version": pyro.__version__,
                      "method": "stochastic variational inference",
                      "guide": run.recipe["guide"]["name"], "seed": run.recipe["seed"]})
    with files.atomic_path(path) as tmp:
        save(groups, attrs, tmp)
    return path


def fitted_guide(run: Any) -> Callable:
    """The guide to draw the posterior from: a Laplace approximation's Gaussian, else the
    run's guide."""
    if hasattr(run.guide, "posterior_guide"):
        with torch.enable_grad():  # the Laplace approximation takes a Hessian
            return run.guide.posterior_guide(**run.data)
    return run.guide


def site_draws(run: Any, n: int, weigh: bool = False, auxiliary: bool = False
               ) -> tuple[dict, torch.Tensor | None]:
    """``n`` draws of every latent and deterministic site from the run's fitted guide, the
    model replayed against each, as ``{site: tensor (n, ...)}`` on the run's device, from
    torch's random stream; with ``weigh``, also each draw's log importance weight
    log p(x, z) - log q(z) (float64, on the CPU). Not the file's groups: as many draws as
    asked, whatever the data's size (``Fit.sample``, the automatic pipeline's answer). The
    auxiliary sites only with ``auxiliary`` (the guide's whole space, for its density)."""
    from workbench.device import run_context

    with run_context(run.device, run.dtype), torch.no_grad(), \
            posterior.whole_data(run.minibatch):
        guide = fitted_guide(run)
        trace = posterior.site_trace(run.model, **run.data)
        latent = posterior.latent_sites(trace)
        sites = {**latent, **posterior.deterministic_sites(trace)}
        sites = sites if auxiliary else posterior.shown(sites, trace)
        per_draw = posterior.trace_numbers(trace)
        summed = weigh and bool(marginal.enumerated_sites(trace))  # log p sums them out
        way = broadcast.verdict(run.model, run.data, run.nesting, trace) if summed else None
        parts: dict[str, list] = {name: [] for name in sites}
        weights = []
        got = 0
        while got < n:  # a guide that cannot be vectorised gives a tenth of the draws asked
            for k, guide_trace, model_trace in posterior.replayed(
                    run.model, guide, run.data, run.nesting, n - got, per_draw):
                for name, shape in sites.items():
                    parts[name].append(posterior.draws_of(model_trace.nodes[name]["value"], k,
                                                          shape))
                if weigh:
                    log_p = posterior.summed_out(run.model, guide_trace, run.data, k,
                                                 run.nesting, way, latent) if summed \
                        else posterior.log_joint(model_trace, k, run.nesting)
                    weights.append(log_p - posterior.log_joint(guide_trace, k, run.nesting))
                got += k
    draws = {name: torch.cat(values)[:n].detach() for name, values in parts.items()}
    return draws, torch.cat(weights)[:n].detach().double().cpu() if weigh else None


def draw(model: Callable, guide: Callable, data: dict, nesting: int,
         num_draws: int = NUM_DRAWS, auxiliary: bool = False, predictive: bool = True
         ) -> tuple[dict[str, dict], dict[str, dict[str, Any]]]:
    """The groups as ``{group: {variable: (numpy array, dims)}}`` (dims after chain and draw)
    and the attributes of each group (under ``""`` those every group gets); the auxiliary
    sites in ``posterior`` only with ``auxiliary``; the replicated data and the pointwise
    log-likelihood (a draw's cost times the data's size) only with ``predictive``."""
    trace = posterior.site_trace(model, **data)
    latent = posterior.latent_sites(trace)
    latent = latent if auxiliary else posterior.shown(latent, trace)
    derived = posterior.deterministic_sites(trace)
    observed = posterior.observed_sites(trace)
    factors = [name for name in observed if _is_factor(trace.nodes[name])]
    observed = {name: shape for name, shape in observed.items() if name not in factors}
    count, whole = _draw_count(latent, derived, observed, num_draws)
    left_out = [_factor_note(factors)] if factors else []
    if factors and not observed:  # one note for posterior.nc and ppc.png alike, from this
        # line whoever calls (stacklevel 1): Python's default filter shows it once a process
        warnings.warn(f"no posterior predictive check: the model observes nothing but "
                      f"pyro.factor site(s) {', '.join(factors)}, which have no distribution "
                      "to draw data from", stacklevel=1)
    left_out += [] if whole else [
        f"deterministic sites, posterior_predictive, log_likelihood and sample_stats: "
        f"{min(num_draws, MIN_DRAWS)} draws of the data's replicated values and pointwise "
        f"log-likelihood would pass {MAX_NUMBERS} numbers"]
    if whole and observed and not predictive:
        left_out.append(f"posterior_predictive and log_likelihood: {UNPREDICTED}")
    summed = (broadcast.verdict(model, data, nesting, trace), posterior.latent_sites(trace)) \
        if whole and marginal.enumerated_sites(trace) else None
    parts = _collect(model if whole else None, guide, data, nesting, count,
                     {**latent, **(derived if whole else {})},
                     observed if predictive else {}, summed, posterior.trace_numbers(trace),
                     left_out)
    groups = _named(parts, trace, observed, left_out)
    return groups, _attrs(groups, trace, observed, count, left_out)


def _is_factor(site: dict) -> bool:
    """Whether an observed site is a ``pyro.factor``: a log density added to the joint, with
    no distribution to draw replicated data from or to read pointwise."""
    return bool(site["infer"].get("is_auxiliary")) and type(site["fn"]).__name__ == "Unit"


def _factor_note(factors: list[str]) -> str:
    """Why posterior.nc leaves the factor sites out."""
    return (f"pyro.factor site(s) {', '.join(factors)} in posterior_predictive, observed_data "
            "and log_likelihood: a factor is a log density with no distribution to draw "
            "data from (lp and the log weights include it)")


def _draw_count(latent: dict, derived: dict, observed: dict, num_draws: int
                ) -> tuple[int, bool]:
    """How many draws posterior.nc holds, and whether they come with the groups that run
    the model over the whole data (the deterministic sites, the replicated data, the
    pointwise log-likelihood and the weights): only if ``MIN_DRAWS`` of them fit
    ``MAX_NUMBERS``."""
    numbers = sum(math.prod(shape) for shape in (*latent.values(), *derived.values()))
    per_obs = sum(math.prod(shape) for shape in observed.values())
    count = min(num_draws, MAX_NUMBERS // (numbers + 2 * per_obs + 2))
    if count >= min(num_draws, MIN_DRAWS):
        return count, True
    numbers = max(1, sum(math.prod(shape) for shape in latent.values()))
    return max(min(num_draws, MAX_NUMBERS // numbers), min(num_draws, MIN_DRAWS)), False


def _collect(model: Callable | None, guide: Callable, data: dict, nesting: int, count: int,
             sites: dict, observed: dict, summed: tuple | None, per_draw: int,
             left_out: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """The draws, group by group, as numpy arrays with the draws first: ``sites`` from the
    guide (and, with the model, the model replayed against it: its deterministic sites, the
    replicated ``observed`` sites, their pointwise log density and each draw's log p(x, z)
    and log weight). Where the model sums sites out by enumeration (``summed``: how its
    draws are evaluated and its latent sites), log p and the pointwise density sum them too,
    or ``left_out`` says why the density does not split by observation."""
    chunks: dict[str, dict[str, list]] = {}

    def add(group: str, name: str, values: torch.Tensor) -> None:
        chunks.setdefault(group, {}).setdefault(name, []).append(_numpy(values))

    for n, guide_trace, model_trace in posterior.replayed(model, guide, data, nesting, count,
                                                          per_draw, predictive=bool(observed)):
        source = guide_trace if model_trace is None else model_trace
        for name, shape in sites.items():
            add("posterior", name, posterior.draws_of(source.nodes[name]["value"], n, shape))
        if model_trace is None:
            continue
        for name, shape in observed.items():
            site = model_trace.nodes[name]
            add("posterior_predictive", name, posterior.draws_of(site["fn"].sample(), n, shape))
        lp, pointwise = _likelihood(model, guide_trace, model_trace, data, n, nesting,
                                    observed, summed)
        if isinstance(pointwise, str):
            if not any(note.startswith("log_likelihood") for note in left_out):
                left_out.append(f"log_likelihood: {pointwise}")
        else:
            for name, values in pointwise.items():
                add("log_likelihood", name, values)
        add("sample_stats", "lp", lp)
        if getattr(guide, "has_density", True):  # a sampler's draws have none (report/draws.py)
            add("sample_stats", "log_weight", lp - posterior.log_joint(guide_trace, n, nesting))
    return {group: {name: np.concatenate(parts) for name, parts in variables.items()}
            for group, variables in chunks.items()}


def _likelihood(model: Callable, guide_trace: Any, model_trace: Any, data: dict, n: int,
                nesting: int, observed: dict, summed: tuple | None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | str]:
    """Each draw's log p(x, z) and each observed site's pointwise log density (draws first),
    from the replayed ``model_trace``; or, where the model sums sites out (``summed``: the
    verdict on its broadcasting and its latent sites), from its enumerated run
    (``posterior.summed_likelihood``), the density perhaps only why it does not split."""
    if summed is not None:
        return posterior.summed_likelihood(model, guide_trace, data, n, nesting, *summed,
                                           observed)
    pointwise = {}
    for name, shape in observed.items():
        site = model_trace.nodes[name]
        batch = shape[:len(shape) - site["fn"].event_dim]
        pointwise[name] = posterior.draws_of(posterior.site_log_prob(site), n, batch)
    return posterior.log_joint(model_trace, n, nesting), pointwise


def _named(parts: dict[str, dict[str, np.ndarray]], trace: poutine.Trace, observed: dict,
           left_out: list[str]) -> dict[str, dict]:
    """The draws with their dims, and the observed data unless it alone passes
    ``MAX_NUMBERS`` (then ``left_out`` says so)."""
    dims = Dims()
    groups: dict[str, dict] = {}
    for group, variables in parts.items():
        groups[group] = {}
        for name, values in variables.items():
            names = [] if group == "sample_stats" else dims.of(name, trace.nodes[name])
            if group == "posterior_predictive":
                values = _integer_if_discrete(values, trace.nodes[name])
            groups[group][name] = (values, names[:values.ndim - 1])
    if sum(math.prod(shape) for shape in observed.values()) > MAX_NUMBERS:
        left_out.append(f"observed_data: more than {MAX_NUMBERS} numbers")
    elif observed:
        groups["observed_data"] = {name: (_integer_if_discrete(_numpy(trace.nodes[name]["value"]),
                                                               trace.nodes[name]),
                                          dims.of(name, trace.nodes[name]))
                                   for name in observed}
    return groups


def _integer_if_discrete(values: np.ndarray, site: dict) -> np.ndarray:
    """A discrete site's values (Bernoulli, Binomial, Poisson, Categorical: floats in Pyro)
    as integers, as ArviZ keeps count data, so ``az.plot_ppc`` draws them as bars: int32,
    the float32's size, or int64 for counts past it. Values that are not all whole numbers
    (a missing one as NaN) stay as they are."""
    if values.dtype.kind != "f" or not site["fn"].support.is_discrete or not values.size:
        return values
    if not (np.isfinite(values).all() and (values == np.rint(values)).all()):
        return values
    wide = np.abs(values).max() >= 2**31
    return values.astype(np.int64 if wide else np.int32)


def _attrs(groups: dict[str, dict], trace: poutine.Trace, observed: dict, count: int,
           left_out: list[str]) -> dict[str, dict[str, Any]]:
    """Each group's attributes: for all, the draw count and what was left out and why; for
    posterior_predictive, its discrete sites; for sample_stats, the PSIS k-hat (a point-mass
    guide's log weights are dropped: it has no density)."""
    drawn = next(iter(groups.get("posterior", {}).values()), None)
    attrs: dict[str, dict[str, Any]] = {"": {"num_draws": count if drawn is None
                                             else len(drawn[0])}}
    if "posterior_predictive" in groups:
        attrs["posterior_predictive"] = {"discrete_sites": ",".join(
            name for name in observed if trace.nodes[name]["fn"].support.is_discrete)}
    if "log_weight" in groups.get("sample_stats", {}):
        stats = _khat(groups["sample_stats"]["log_weight"][0],
                      {name: values for name, (values, _) in groups["posterior"].items()})
        attrs["sample_stats"] = stats
        if "khat_reason" in stats:
            del groups["sample_stats"]["log_weight"]
            left_out.append(f"sample_stats log_weight: {stats['khat_reason']}")
    if left_out:
        attrs[""]["left_out"] = "; ".join(left_out)
    return attrs


def save(groups: dict[str, dict], attrs: dict[str, dict[str, Any]], path: Path) -> None:
    """``draw``'s groups as one NetCDF-4 file with a group each, as ArviZ's
    ``InferenceData.to_netcdf`` writes it: dims chain (one) and draw first with their
    coordinates, except for the observed data; each group with the common attributes, ArviZ's
    (``created_at``, ``arviz_version``) and its own; numbers compressed (zlib level 1 after a
    byte shuffle: as small as its default here, in half the time), except continuous
    replicated data (``_compressible``). Written with h5netcdf
    directly: xarray's import alone cost more than the rest of a small run's report."""
    import h5netcdf

    made = {"created_at": datetime.now(timezone.utc).replace(tzinfo=None).isoformat(),
            "arviz_version": _version("arviz")}
    count = attrs[""]["num_draws"]
    with h5netcdf.File(str(path), "w") as file:
        for group, variables in groups.items():
            sampled = group != "observed_data"
            out = file.create_group(group)
            sizes: dict[str, int] = {"chain": 1, "draw": count} if sampled else {}
            arrays = {}
            for name, (values, names) in variables.items():
                if sampled:
                    values, names = values[None], ["chain", "draw", *names]
                sizes.update(zip(names, values.shape))
                arrays[name] = (values, names)
            out.dimensions = sizes
            if sampled:
                out.create_variable("chain", ("chain",), data=np.array([0]))
                out.create_variable("draw", ("draw",), data=np.arange(count))
            for name, (values, names) in arrays.items():
                values = np.require(values, requirements="C")  # keeps a 0-d array 0-d
                options = ({"compression": "gzip", "compression_opts": 1, "shuffle": True}
                           if _compressible(group, values) else {})
                if values.dtype.kind == "b":  # NetCDF has no bool: xarray's encoding
                    out.create_variable(name, tuple(names), data=values.astype("i1"),
                                        **options).attrs["dtype"] = "bool"
                else:
                    out.create_variable(name, tuple(names), data=values, **options)
            out.attrs.update({**made, **attrs[""], **attrs.get(group, {})})


def _compressible(group: str, values: np.ndarray) -> bool:
    """Whether a variable is worth zlib's time: numbers, not a 0-d one, and not continuous
    replicated data, whose random low bits leave nine tenths of their size (diamonds'
    836 x 5,000: 88%, against 62% for the log likelihood beside them)."""
    if values.dtype.kind not in "biufc" or not values.ndim:
        return False
    return not (group == "posterior_predictive" and values.dtype.kind in "fc")


def ppc_sources(path: Path) -> dict[str, dict[str, Any]]:
    """What ``plots.ppc_figure`` draws, read from posterior.nc: per observed site its values
    (``observed``), every draw's replicated values (``replicated``, draws first) and whether
    its likelihood is discrete. Empty without a posterior_predictive group."""
    import h5netcdf

    with h5netcdf.File(str(path), "r") as file:
        if "posterior_predictive" not in file.groups or "observed_data" not in file.groups:
            return {}  # the data were too big for replicates
        rep, seen = file.groups["posterior_predictive"], file.groups["observed_data"]
        discrete = set(str(rep.attrs.get("discrete_sites", "")).split(","))
        return {name: {"observed": seen.variables[name][...],
                       "replicated": (lambda v: v.reshape(-1, *v.shape[2:]))(
                           rep.variables[name][...]),
                       "discrete": name in discrete}
                for name in rep.variables if name in seen.variables
                and name not in ("chain", "draw")}


def read(path: Path) -> Any:
    """posterior.nc as ArviZ InferenceData."""
    return _arviz().from_netcdf(str(path))


class Dims:
    """Dimension names for the sites' values: a plate's name for the dims it indexes (shared
    by every site in it), ``<site>_dim_<i>`` for the rest, one size per name."""

    def __init__(self) -> None:
        self.sizes: dict[str, int] = {}

    def of(self, name: str, site: dict) -> list[str]:
        value = site["value"]
        shape = tuple(value.shape)
        event_dim = getattr(site["fn"], "event_dim", 0)
        batch = len(shape) - event_dim
        plates = {frame.dim: frame.name for frame in site["cond_indep_stack"]
                  if frame.vectorized and frame.dim is not None}
        names = []
        for i, size in enumerate(shape):
            dim = plates.get(i - batch) if i < batch else None
            if dim is None or self.sizes.setdefault(dim, size) != size:
                dim = f"{name}_dim_{i}"
            names.append(dim)
        return names


def _khat(log_weight: np.ndarray, draws: dict[str, np.ndarray]) -> dict[str, Any]:
    """The PSIS k-hat of the log weights and its reading, or why there is none."""
    flat = [name for name, values in draws.items()
            if len(values) > 1 and (values == values[:1]).all()]
    if flat:
        return {"khat_reason": "the guide is a point mass at " + ", ".join(flat)
                + ": it has no density to weigh draws by"}
    log_w = torch.as_tensor(log_weight, dtype=torch.float64)
    if torch.isnan(log_w).any() or (log_w == math.inf).any() or not torch.isfinite(log_w).any():
        return {"khat": math.nan, "khat_reading": "the log weights are not finite"}
    khat, _ = posterior.psis(log_w)
    return {"khat": khat, "khat_reading": thresholds.khat_reading(khat)}


def _numpy(values: torch.Tensor) -> np.ndarray:
    return values.detach().cpu().numpy()


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "unknown"


def _arviz() -> Any:
    """ArviZ, imported quietly (its import warns of its next major version)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        import arviz

    return arviz
