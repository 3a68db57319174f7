"""Whether a model broadcasts over a leading dimension of draws, and its draws evaluated
another way where it does not.

vibench evaluates many draws at once (a loss's particles, the report's guide draws) by
running the model once under a ``pyro.plate`` of draws at dim ``-(nesting + 1)``, left of the
model's own plates. That takes a model whose arithmetic keeps its plates' dims last
(``a[..., g]``, ``(X * beta).sum(-1)``). A model written as plain Pyro for one draw at a time
(``a[g]``, ``X @ beta``) fails there or, worse, mixes the draws up.

``verdict(model, data, nesting)`` finds out once per model (cached): two draws of the model,
each run alone and both at once under a plate of two. The model broadcasts where the run at
once gives each draw's log densities and deterministic values as the lone runs do. Where it
does not, ``replay`` evaluates the model against a vectorised guide trace draw by draw:
``torch.func.vmap`` over one draw's replayed model where that gives the lone runs' numbers
(Pyro's handlers run under vmap with validation off; about as fast as broadcasting), else one
model run per draw, which the report's callers give at most ``LOOP_DRAWS`` draws. ``prior``
draws from the model itself one run at a time (vmap cannot sample Pyro's distributions).
Either returns a trace laid out as the vectorised run's would be (each value and log density
with the draws dim at ``-(nesting + 1)`` of its batch dims), so the report reads both alike.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.util import site_is_subsample
from torch.overrides import TorchFunctionMode

from workbench.errors import one_line

VECTORISED, VMAP, LOOP = "vectorised", "vmap", "loop"
LOOP_DRAWS = 1000  # draws the report evaluates where each is one run of the model
RTOL = 1e-4  # of a site's summed |log density|: draws at once and alone agree within it


@dataclass(frozen=True)
class Verdict:
    """How the model's draws are evaluated: ``method`` VECTORISED (it broadcasts), VMAP or
    LOOP; ``why`` it does not broadcast and ``why_not_vmap``, each one line with the place
    in the model's file."""

    method: str
    nesting: int
    why: str = ""
    why_not_vmap: str = ""

    @property
    def broadcasts(self) -> bool:
        return self.method == VECTORISED

    def draws(self, num_draws: int) -> int:
        """The draws to evaluate where ``num_draws`` are asked for."""
        return min(num_draws, LOOP_DRAWS) if self.method == LOOP else num_draws

    def line(self, name: str) -> str:
        """What the user should know: the model does not broadcast, and where it failed."""
        return f"model {name!r} does not broadcast over a leading dimension of draws: {self.why}"

    def report_cost(self, num_draws: int) -> str:
        """What the report does instead, and what it costs."""
        if self.method == VMAP:
            return ("the report evaluates its draws with torch.func.vmap, one draw's model "
                    "batched (about a broadcasting model's time)")
        return (f"the report runs it once per draw, on {self.draws(num_draws):,} draws instead "
                f"of {num_draws:,} (torch.func.vmap does not apply: {self.why_not_vmap})")


_known: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def verdict(model: Callable, data: dict, nesting: int,
            trace: poutine.Trace | None = None) -> Verdict:
    """The model's verdict: from a run's set-up where it was found, else ``check``-ed now
    (``trace``: the model run once on ``data``, where the caller has it)."""
    with contextlib.suppress(TypeError):  # a model that cannot be a weak key is checked again
        found = _known.get(model)
        if found is not None and found.nesting == nesting:
            return found
    found = check(model, data, nesting, trace)
    with contextlib.suppress(TypeError):
        _known[model] = found
    return found


def check(model: Callable, data: dict, nesting: int,
          trace: poutine.Trace | None = None) -> Verdict:
    """Run the model on two draws, alone and at once under a plate of two (and under vmap,
    where the plate fails): how its draws are to be evaluated. Costs two to four runs of the
    model; the random streams are as before."""
    from workbench.report.posterior import site_trace

    devices = [t.device.index or 0 for t in data.values()
               if torch.is_tensor(t) and t.device.type == "cuda"][:1]
    with torch.no_grad(), torch.random.fork_rng(devices=devices):
        first = trace if trace is not None else site_trace(model, **data)
        try:
            second = site_trace(model, **data)
        except Exception:  # noqa: BLE001 - a draw the model cannot compute at: the first again
            second = first
        names = _replayable(first)
        if _replayable(second) != names:  # the model's sites change with its draws
            second = first
        alone = [_densities(t, None, nesting) for t in (first, second)]
        draws = {name: torch.stack([first.nodes[name]["value"], second.nodes[name]["value"]])
                 for name in names}
        try:
            with pyro.plate(_plate_name(), 2, dim=-(nesting + 1)):
                both = poutine.trace(poutine.replay(model, trace=to_replay(
                    {n: lay_out(d, nesting, _event_dim(first.nodes[n])) for n, d in
                     draws.items()}, first))).get_trace(**data)
            why = _differs(_densities(both, 2, nesting), alone)
        except Exception as exc:  # noqa: BLE001 - any failure means it does not broadcast
            why = described(exc, model)
        if not why:
            return Verdict(VECTORISED, nesting)
        try:
            at_once = _vmapped(model, data, draws, first, False)
            why_not = _differs(_stacked_densities(at_once), alone)
        except Exception as exc:  # noqa: BLE001 - any failure means vmap does not apply
            why_not = described(exc, model)
    return Verdict(LOOP if why_not else VMAP, nesting, why, why_not)


def replay(model: Callable, guide_trace: poutine.Trace, data: dict, n: int, nesting: int,
           way: Verdict, single: poutine.Trace, predictive: bool = True) -> poutine.Trace:
    """The model replayed against each of the ``n`` draws of a vectorised guide trace, draw
    by draw (vmap, else a loop): a trace laid out as the vectorised replay's. Each sample
    site has its ``value`` (the data for an observed one), ``log_prob`` (its scaled density
    summed within each draw) and ``fn``, which gives each draw's ``sample()`` and pointwise
    ``log_prob`` of the site's value where ``predictive``. ``single``: the model run once."""
    draws = {name: _draws_of(guide_trace.nodes[name]["value"], n, shape)
             for name, shape in _replayable(single).items() if name in guide_trace.nodes}
    out = None
    if way.method == VMAP:
        try:
            out = _vmapped(model, data, draws, guide_trace, predictive)
        except Exception:  # noqa: BLE001 - vmap failed here though the check passed: loop
            out = None
    if out is None:
        out = _looped(model, data, draws, guide_trace, n, predictive)
    return _trace_of(out, single, n, nesting)


def particles_vmapped(model: Callable, single: poutine.Trace, nesting: int,
                      particles: int) -> Callable:
    """The model as a loss's ``particles`` vectorised particles can run it where it does not
    broadcast but vmap applies: each latent site a placeholder of density 0 whose value the guide's
    particles give (by replay), then each particle's whole log joint, one draw's model
    vmapped, as one factor. The particles' plate must sit at dim ``-(nesting + 1)`` (the
    loss's ``max_plate_nesting`` is ``nesting + 1``: the placeholders show none of the
    model's plates for it to guess from). The loss's estimate and gradient are the model's
    own; nothing but the loss runs this (the report replays the model itself)."""
    import pyro.distributions as dist

    latent = _replayable(single)

    def vmapped(**data):
        values = {}
        for name in latent:
            site = single.nodes[name]
            fn = site["fn"]
            with contextlib.ExitStack() as plates:  # in its plates, as the guide's site is
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        plates.enter_context(pyro.plate(frame.name, frame.size, dim=frame.dim))
                values[name] = pyro.sample(name, dist.ImproperUniform(
                    fn.support, fn.batch_shape, fn.event_shape), infer=dict(site["infer"]))
        draws = {name: _draws_of(values[name], particles, shape)
                 for name, shape in latent.items()}
        with poutine.block():  # the loss's handlers (its trace, the particles' plate) see
            out = _vmapped(model, data, draws, single, False)  # only the placeholders
        total = sum(entry["log_prob"] for entry in out.values())
        pyro.factor("_vibench_log_joint", total.reshape(particles, *([1] * nesting)))

    return vmapped


def prior(model: Callable, data: dict, n: int, nesting: int, single: poutine.Trace
          ) -> poutine.Trace:
    """``n`` draws from the model's prior, one run of the model each, laid out as a
    vectorised prior trace's."""
    return _trace_of(_looped(model, data, {}, single, n, False), single, n, nesting)


# --------------------------------------------------------------------------------------------
# where a failure is in the user's model


def described(exc: BaseException, model: Any) -> str:
    """An exception as one line, led by the line of the model's own file that failed
    (``file.py:12 `source```) where the traceback passes through that file; not where that
    line is the model's own ``raise``, whose message says what it means."""
    place = where(exc, model)
    return f"{place}: {one_line(exc)}" if place else one_line(exc)


def where(exc: BaseException, model: Any) -> str:
    """``file.py:LINE `source``` of the last frame in the model's own file (the file that
    defines it) in the exception's traceback or those it was raised from; "" if none, or if
    that frame raised it itself (a ``raise`` statement, the traceback's last frame)."""
    files = _source_files(model)
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames = traceback.extract_tb(exc.__traceback__)
        for index in range(len(frames) - 1, -1, -1):
            frame = frames[index]
            if os.path.realpath(frame.filename) not in files:
                continue
            source = (frame.line or "").strip()
            if index == len(frames) - 1 and source.startswith("raise"):
                return ""
            name = os.path.basename(frame.filename)
            return f"{name}:{frame.lineno}" + (f" `{source}`" if source else "")
        exc = exc.__cause__ or exc.__context__
    return ""


def _source_files(model: Any) -> set[str]:
    found = set()
    for owner in (model, getattr(model, "func", None), getattr(model, "__func__", None),
                  type(model)):
        if owner is None or owner in (type, object):
            continue
        with contextlib.suppress(TypeError, OSError):
            path = inspect.getsourcefile(owner)
            if path and "site-packages" not in path and not path.startswith(
                    os.path.dirname(torch.__file__)):
                found.add(os.path.realpath(path))
    return found


# --------------------------------------------------------------------------------------------
# draw by draw


def lay_out(draws: torch.Tensor, nesting: int, event_dim: int) -> torch.Tensor:
    """Draws shaped ``(n, *shape)`` as a vectorised trace holds them: the draws dim at
    ``-(nesting + 1)`` of the batch dims, ones between it and the site's own batch dims."""
    shape = draws.shape[1:]
    pad = max(nesting - (len(shape) - event_dim), 0)
    return draws.reshape(draws.shape[0], *([1] * pad), *shape)


def _draws_of(value: torch.Tensor, n: int, shape: torch.Size) -> torch.Tensor:
    if value.numel() == n * value.new_empty(shape).numel():
        return value.reshape(n, *shape)
    return value.reshape(1, *shape).expand(n, *shape)


def _plate_name() -> str:
    from workbench.report.posterior import DRAWS_PLATE

    return DRAWS_PLATE


def _replayable(trace: poutine.Trace) -> dict[str, torch.Size]:
    """The sites a replay sets: the latent ones, enumerated ones included."""
    return {name: site["value"].shape for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site_is_subsample(site)}


def _event_dim(site: dict) -> int:
    return getattr(site["fn"], "event_dim", 0)


def to_replay(values: dict[str, torch.Tensor], source: poutine.Trace) -> poutine.Trace:
    """A trace for ``poutine.replay`` holding ``values``, each with its site's infer in
    ``source`` (replay hands it on, as from a guide's trace)."""
    trace = poutine.Trace()
    for name, value in values.items():
        trace.add_node(name, type="sample", name=name, value=value, is_observed=False,
                       infer=dict(source.nodes[name]["infer"]))
    return trace


def _one_draw(model: Callable, data: dict, source: poutine.Trace,
              predictive: bool) -> Callable[[dict], dict]:
    """What one draw gives: per sample site its scaled log density summed (``log_prob``),
    its ``value`` (latent and deterministic sites) and, where ``predictive``, an observed
    site's pointwise unscaled density (``pointwise``) and a draw from it (``sample``)."""

    def one(draw: dict) -> dict:
        drawn = to_replay(draw, source)
        trace = poutine.trace(poutine.replay(model, trace=drawn)).get_trace(**data)
        out = {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            raw = site["fn"].log_prob(site["value"])
            entry = {"log_prob": torch.as_tensor(
                scale_and_mask(raw, site["scale"], site["mask"])).sum()}
            if not site["is_observed"] or site["infer"].get("_deterministic"):
                entry["value"] = site["value"]
            elif predictive:
                entry["pointwise"] = raw
                entry["sample"] = site["fn"].sample()
            out[name] = entry
        return out

    return one


def _vmapped(model: Callable, data: dict, draws: dict[str, torch.Tensor],
             source: poutine.Trace, predictive: bool) -> dict:
    """``_one_draw`` over every draw (each ``(n, *shape)``) at once, by torch.func.vmap,
    with Pyro's and torch's validation off (their checks branch on values)."""
    with pyro.validation_enabled(False), _BatchedBernoulli():
        return torch.func.vmap(_one_draw(model, data, source, predictive),
                               randomness="different")(draws)


class _BatchedBernoulli(TorchFunctionMode):
    """A Bernoulli's log density from logits is ``-binary_cross_entropy_with_logits``, which
    torch.func.vmap batches at about three times the op's own cost; inside this mode that
    loss (unweighted, unreduced) is ``logaddexp(0, l) - y l``, the same to rounding, which
    batches at the elementwise ops' cost."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.binary_cross_entropy_with_logits and len(args) == 2 \
                and kwargs.get("reduction") == "none" and all(
                    kwargs.get(key) is None
                    for key in ("weight", "pos_weight", "size_average", "reduce")):
            logits, target = args
            return torch.addcmul(torch.logaddexp(logits.new_zeros(()), logits), logits, target,
                                 value=-1)
        return func(*args, **kwargs)


def _looped(model: Callable, data: dict, draws: dict[str, torch.Tensor],
            source: poutine.Trace, n: int, predictive: bool) -> dict:
    """``_one_draw`` for each of ``n`` draws in turn, stacked, with validation off as in
    ``_vmapped``: the values are the prior's or a guide's own draws (a third of a
    non-broadcasting model's prior draws went to checking them)."""
    one = _one_draw(model, data, source, predictive)
    with pyro.validation_enabled(False):
        outs = [one({name: d[i] for name, d in draws.items()}) for i in range(n)]
    if any(out.keys() != outs[0].keys() for out in outs):
        raise ValueError("the model's sample sites change from draw to draw")
    return {name: {key: torch.stack([out[name][key] for out in outs]) for key in entry}
            for name, entry in outs[0].items()}


def _trace_of(out: dict, single: poutine.Trace, n: int, nesting: int) -> poutine.Trace:
    """The per-draw results as a vectorised trace: see ``replay``."""
    trace = poutine.Trace()
    for name, entry in out.items():
        own = single.nodes.get(name)
        event_dim = _event_dim(own) if own is not None else 0
        observed = own["is_observed"] if own is not None else "value" not in entry
        if "value" in entry:
            value = lay_out(entry["value"], nesting, event_dim)
        elif own is not None:
            value = own["value"]
        else:
            value = None
        log_prob = entry["log_prob"].reshape(n, *([1] * nesting))
        fn = Drawn(event_dim, lay_out(entry["sample"], nesting, event_dim)
                   if "sample" in entry else None,
                   lay_out(entry["pointwise"], nesting, 0) if "pointwise" in entry else None)
        trace.add_node(name, type="sample", name=name, fn=fn, value=value,
                       is_observed=observed, args=(), kwargs={}, scale=1.0, mask=None,
                       infer=dict(own["infer"]) if own is not None else {},
                       cond_indep_stack=own["cond_indep_stack"] if own is not None else (),
                       log_prob=log_prob, unscaled_log_prob=log_prob,
                       log_prob_sum=log_prob.sum(), done=True)
    return trace


class Drawn:
    """A site's distribution in a trace evaluated draw by draw: what the report asks of one,
    each draw's ``sample()`` and the pointwise ``log_prob`` of the site's own value."""

    def __init__(self, event_dim: int, sample: torch.Tensor | None,
                 pointwise: torch.Tensor | None):
        self.event_dim = event_dim
        self._sample = sample
        self._pointwise = pointwise

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:
        if self._sample is None or len(sample_shape):
            raise NotImplementedError("this site was evaluated without its replicates")
        return self._sample

    def log_prob(self, value: Any) -> torch.Tensor:
        """The site's pointwise log density at its own value (``value``, which it ignores)."""
        if self._pointwise is None:
            raise NotImplementedError("this site was evaluated without its pointwise density")
        return self._pointwise


# --------------------------------------------------------------------------------------------
# the comparison


def _densities(trace: poutine.Trace, n: int | None, nesting: int) -> dict[str, tuple]:
    """Per sample site: its scaled log density per draw (``(n,)``; a scalar for a lone run),
    the sum of its terms' sizes (the comparison's scale) and its value where deterministic."""
    from workbench.report.posterior import _per_draw

    found = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        log_prob = torch.as_tensor(scale_and_mask(site["fn"].log_prob(site["value"]),
                                                  site["scale"], site["mask"]))
        total = log_prob.sum() if n is None else _per_draw(log_prob, n, nesting)
        found[name] = (total, float(log_prob.abs().sum()),
                       site["value"] if site["infer"].get("_deterministic") else None)
    return found


def _stacked_densities(out: dict) -> dict[str, tuple]:
    return {name: (entry["log_prob"], 0.0, entry["value"] if "value" in entry else None)
            for name, entry in out.items()}


def _differs(both: dict[str, tuple], alone: list[dict[str, tuple]]) -> str:
    """Why the draws at once (``both``) are not the lone runs' (``alone``); "" if they are."""
    if set(both) != set(alone[0]):
        extra = sorted(set(both) ^ set(alone[0]))
        return (f"with draws at once it has other sample sites ({', '.join(extra)}) than "
                "with one draw")
    for name, (total, _, value) in both.items():
        expected = torch.stack([torch.as_tensor(a[name][0]) for a in alone]).double()
        scale = max(a[name][1] for a in alone) + 1.0
        got = torch.as_tensor(total).double().reshape(-1)
        if got.shape != expected.shape or not _close(got, expected, RTOL * scale):
            return (f"its log density at site {name!r} for two draws at once is not each "
                    "draw's alone (it mixes the draws)")
        if value is not None and alone[0][name][2] is not None:  # a deterministic site
            lone = torch.stack([a[name][2] for a in alone]).double()
            if value.numel() not in (lone.numel(), lone[0].numel()) or not _close(
                    _draws_of(value.double(), len(lone), lone.shape[1:]), lone,
                    RTOL * (float(lone.abs().max()) + 1.0) if lone.numel() else 0.0):
                return (f"its deterministic site {name!r} for two draws at once is not each "
                        "draw's alone (it mixes the draws)")
    return ""


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> bool:
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    return bool((same | ((a - b).abs() <= tolerance)).all())

