"""The Laplace start for Gaussian autoguides (guide option ``init: laplace``): the posterior's
mode in the guide's unconstrained space, found with L-BFGS, and the Gaussian whose covariance is
the inverse Hessian of the negative log joint there (the Laplace approximation, MacKay 2003,
ch. 27). SVI then starts from what a second-order fit already knows: the location, the scales
and, for a full-rank guide, the correlations, which Adam's per-coordinate steps of size about
``lr`` learn slowly or not at all where the posterior's scales differ by orders of magnitude.

Where the search runs to a constrained site's edge instead (a centred hierarchical model's
scale tau -> 0, where the density grows without bound and there is no mode), the guide keeps
its start and a note says why (``degenerate``).

vibench calls ``initialise(**data)`` once at set-up, after the first loss and gradient have
created the guide's parameters and before training; it overwrites them in place.
"""

from __future__ import annotations

import math
import queue
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro import poutine
from pyro.nn.module import PyroModule
from pyro.poutine.util import site_is_subsample
from torch.distributions import transform_to

from workbench import seams
from workbench.report.gaussians import bijections

MAX_ITER = 500  # L-BFGS iterations from each start
# A descent stops once its evaluations pass STALL_EVALS plus STALL_PER_ITER an iteration: its
# line searches keep failing (a funnel's neck, a region the model refuses), up to 25
# evaluations each. The dev set's converged descents took at most 1.3 an iteration plus 12
# (diamonds 266 for 220 iterations); stalled ones ran to L-BFGS's 626 in 1-120 iterations.
STALL_EVALS = 50
STALL_PER_ITER = 3
RESTARTS = 3  # further starts, uniform in (-2, 2) unconstrained (Stan's, Pyro's init_to_uniform)
NEWTON_STEPS = 5  # Newton steps that polish L-BFGS's answer where the Hessian allows
MAX_HESSIAN_DIM = 2000  # beyond it, the mode only: the Hessian costs a backward pass a dimension
# a potential of this many torch operations or more (a loop unrolled) takes its Hessian's
# rows in one batched pass: each row's cost is mostly the operations' own overhead there, and
# the batch's first use imports sympy (0.25 s), which a shorter potential's Hessians do not
# win back (benchmarks/README.md, "The Laplace Hessian in one batched pass"); once something
# else has imported it, every Hessian is batched (latent_gp's: 25 ms a row at a time, 6 ms)
BATCHED_FROM = 1000
_OPERATIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # potential -> its count
# An unconstrained value beyond it on a constrained site (a scale below exp(-10) = 5e-5 of its
# unit, say) is its support's edge: where a mode search that did not converge went, the
# density grows without bound (a centred hierarchical model's tau -> 0) and there is no mode.
# In float32 a descent into a funnel's neck stalls near log tau = -14 (the group means can no
# longer be told apart), so the edge is drawn short of that.
BOUNDARY = 10.0
# The largest Newton decrement g' H^-1 g (twice the potential a Newton step would still gain) at
# which a start counts as converged: rounding in float32 leaves about this much.
TOLERANCE = {torch.float64: 1e-8, torch.float32: 1e-3}


@dataclass
class Site:
    """Where one latent site lives in the flat unconstrained vector, and how to constrain it."""

    name: str
    shape: torch.Size
    start: int
    transform: torch.distributions.Transform

    @property
    def stop(self) -> int:
        return self.start + math.prod(self.shape)


@dataclass
class Fit:
    """A start's result: the point, its potential (-log joint), the Hessian there, and
    whether the Newton decrement says it is a mode."""

    point: torch.Tensor
    potential: float
    hessian: torch.Tensor | None
    converged: bool


class LaplaceStart:
    """Mixin for a Gaussian autoguide: ``initialise`` puts it at the Laplace approximation."""

    def initialise(self, *args, **kwargs) -> list[str]:
        """Overwrite the guide's location and scale with the Laplace approximation; returns
        notes for the user where it had to fall back."""
        return initialise(self, *args, **kwargs)


def initialise(guide, *args, **kwargs) -> list[str]:
    """Find the mode, take the Hessian there and write both into ``guide`` (see the module)."""
    sites = layout(guide)
    check_continuous(guide, args, kwargs)
    dimension = sites[-1].stop
    potential = potential_fn(model_of(guide), sites, args, kwargs)
    start = current_loc(guide, sites)
    fit = find_mode(potential, start, dimension <= MAX_HESSIAN_DIM, sites)
    notes = []
    if fit is None:
        return ["init laplace: no start gave a finite log density; the guide keeps its "
                "default start"]
    why = degenerate(fit, sites)
    if why:
        return [f"init laplace: {why}; the guide keeps its init_loc start"]
    if not fit.converged:
        notes.append(f"init laplace: L-BFGS did not converge from {1 + RESTARTS} starts; the "
                     f"guide starts at the best point found (potential {fit.potential:.4g})")
    covariance, precision_diag, note = curvature(fit.hessian)
    if note:
        notes.append(note)
    write(guide, sites, fit.point, covariance, precision_diag)
    return notes


def layout(guide) -> list[Site]:
    """The guide's latent sites in the order of its flat latent vector (AutoContinuous's
    ``_unpack_latent``), each with its unconstrained shape (full plate sizes) and its
    bijection (``workbench.report.gaussians.bijections``)."""
    sites, start = [], 0
    for name, _, transform in bijections(guide.prototype_trace):
        if hasattr(guide, "_unconstrained_shapes"):
            shape = guide._unconstrained_shapes[name]
        else:
            shape = _leaf(guide.locs, name).shape
        sites.append(Site(name, torch.Size(shape), start, transform))
        start = sites[-1].stop
    return sites


def model_of(guide):
    """The model ``guide`` was made for, as the user wrote it: ``guide.source_model`` where
    vibench's guides keep it, else ``guide.model`` (which an autoguide may wrap in its init
    strategy, drawing at every call). The starts seek its density (``potential_fn`` sums out
    the sites it enumerates), not ``guide.model``'s: under the init strategy a reparameterised
    site (plugins/reparam.py) keeps its initial value whatever its auxiliary site's is."""
    return getattr(guide, "source_model", (guide.model,))[0]


def check_continuous(guide, args: tuple, kwargs: dict, method: str = "laplace") -> None:
    """Refuse a model with discrete latent sites that the potential cannot sum out: their
    values are not the guide's, so the log joint the mode is sought on would be a random
    draw. The Laplace and Pathfinder starts sum out sites marked for parallel enumeration (as
    enum_elbo) in the potential they climb (``potential_fn``)."""
    model = model_of(guide)
    trace = poutine.trace(model).get_trace(*args, **kwargs)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site_is_subsample(site):
            continue
        summed = site["infer"].get("enumerate") == "parallel"
        if (site["infer"].get("enumerate") or site["fn"].support.is_discrete) and not summed:
            raise ValueError(f"init {method!r} needs continuous latent sites; {name!r} is "
                             "discrete")


def potential_fn(model, sites: list[Site], args: tuple,
                 kwargs: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """-log p(data, z) as a function of the flat unconstrained z, with the log-Jacobian of
    each site's bijection, so its mode and Hessian are those of the density the guide fits;
    the model's enumerated sites summed out (``workbench.report.marginal``). Its ``plain``
    is the same without the refusals below (no Python branch on a value): what
    ``torch.func.vmap`` can map over many points (pathfinder.batch_potential)."""
    nesting = _enumerated_nesting(model, args, kwargs)

    def plain(flat: torch.Tensor) -> torch.Tensor:
        values, log_jacobian = {}, 0.0
        for site in sites:
            unconstrained = flat[site.start:site.stop].reshape(site.shape)
            values[site.name] = site.transform(unconstrained)
            log_jacobian = log_jacobian + site.transform.log_abs_det_jacobian(
                unconstrained, values[site.name]).sum()
        log_p = _log_joint(poutine.condition(model, data=values), nesting, args, kwargs)
        return -(log_p + log_jacobian)

    def potential(flat: torch.Tensor) -> torch.Tensor:
        try:
            value = plain(flat)
        except (ValueError, torch.linalg.LinAlgError):  # a parameter the model's validation
            return flat.new_tensor(math.inf)  # refuses, a covariance no longer one (a long step)
        # a density that is no number there (NaN, or +inf in a funnel's neck) is no mode:
        # +inf keeps L-BFGS's line search out (its bracket cannot hold a NaN)
        return value if torch.isfinite(value) else flat.new_tensor(math.inf)

    potential.plain = plain
    return potential


def _enumerated_nesting(model, args: tuple, kwargs: dict) -> int | None:
    """The model's plate nesting where it marks sites for enumeration, else None; found on a
    fork of the random streams, so that the run's own draws stay as they were."""
    from workbench.device import rng_devices
    from workbench.report.marginal import enumerated_sites
    from workbench.report.posterior import plate_nesting, site_trace

    tensors = [t for t in (*args, *kwargs.values()) if torch.is_tensor(t)]
    with torch.random.fork_rng(devices=rng_devices(tensors[0].device) if tensors else []):
        try:
            trace = site_trace(model, *args, **kwargs)
        except Exception:  # noqa: BLE001 - the potential's own runs say what fails
            return None
    return plate_nesting(trace) if enumerated_sites(trace) else None


def _log_joint(model, nesting: int | None, args: tuple, kwargs: dict) -> torch.Tensor:
    """log p(data, z) of a model whose latent values are conditioned, summed over its
    enumerated sites where ``nesting`` says it has some."""
    if nesting is None:
        return poutine.trace(model).get_trace(*args, **kwargs).log_prob_sum()
    from workbench.report import marginal

    summing = marginal.enumerated(model, nesting)
    return marginal.log_density(poutine.trace(summing).get_trace(*args, **kwargs))


def current_loc(guide, sites: list[Site]) -> torch.Tensor:
    """The guide's location now (its init_loc strategy's), as one flat unconstrained vector."""
    with torch.no_grad():
        if hasattr(guide, "_unconstrained_shapes"):
            return _leaf(guide, "loc").detach().clone()
        return torch.cat([_leaf(guide.locs, site.name).detach().reshape(-1) for site in sites])


def find_mode(potential: Callable, start: torch.Tensor, with_hessian: bool,
              sites: list[Site] | None = None) -> Fit | None:
    """The mode by L-BFGS (strong Wolfe line search) from ``start``, then from random starts
    while none converges; the best converged fit, else the lowest finite one. Given the
    ``sites``, no restart follows a descent that ran to a support's edge (``degenerate``): the
    density grows without bound there, so the lowest point found is no mode either way."""
    fits = []
    for attempt in range(1 + RESTARTS):
        point = start if attempt == 0 else torch.rand_like(start) * 4 - 2
        fit = descend(potential, point, with_hessian)
        if fit is not None:
            fits.append(fit)
            if fit.converged or (sites is not None and degenerate(fit, sites)):
                break
    converged = [fit for fit in fits if fit.converged]
    return min(converged or fits, key=lambda fit: fit.potential, default=None)


def descend(potential: Callable, start: torch.Tensor, with_hessian: bool) -> Fit | None:
    """L-BFGS from one start, then a few Newton steps where the Hessian is positive definite
    (they fix what L-BFGS leaves along badly scaled directions, such as kilpisjarvi's)."""
    return _polished(potential, _lbfgs(lambda x: _evaluated(potential, x), start),
                     with_hessian)


def descend_together(potentials: Callable, potential: Callable, starts: list[torch.Tensor],
                     with_hessian: bool) -> list[Fit | None]:
    """``descend`` from each of ``starts``, their L-BFGS searches side by side: each runs in
    a thread of its own, and each round of the evaluations they ask for is one batched run of
    the model (``potentials``, the potential of each row of an ``(n, d)`` tensor:
    pathfinder.batch_potential) in this thread, which alone runs the model (Pyro's handlers
    are one stack for all threads); then each search's Newton polish here, one by one. A
    model that does not broadcast over the rows (``potentials.rowwise``) gains nothing: one
    search after another, as ``descend``."""
    potentials(starts[0].expand(2, -1))  # it learns which way the model runs
    if potentials.rowwise or len(starts) < 2:
        return [descend(potential, start, with_hessian) for start in starts]
    ends = _Lockstep(potentials).run(starts)
    return [_polished(potential, end, with_hessian) for end in ends]


def value_and_gradient(potentials: Callable, x: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The potential of each row of ``x`` (``potentials``: as pathfinder.batch_potential's)
    and its gradient there, by autograd (inf and a zero gradient where the model refuses a
    row)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = potentials(x)
        finite = torch.isfinite(value)
        total = torch.where(finite, value, 0.0).sum()
        gradient = (torch.autograd.grad(total, x, allow_unused=True)[0]
                    if total.requires_grad else None)  # None: no row's point was finite
    gradient = torch.zeros_like(x) if gradient is None else gradient
    return torch.where(finite, value, torch.inf).detach(), gradient


def _evaluated(potential: Callable, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``potential`` at the flat point ``x`` and its gradient (zero where it is no number)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        value = potential(x)
        if not torch.isfinite(value):
            return value.detach(), torch.zeros_like(x)
        (gradient,) = torch.autograd.grad(value, x)
    return value.detach(), gradient


def _lbfgs(evaluate: Callable, start: torch.Tensor) -> torch.Tensor:
    """Where L-BFGS (strong Wolfe line search) from ``start`` ends, ``evaluate`` giving the
    potential and its gradient at a point; the lowest point it evaluated where it stalled."""
    point = start.detach().clone().requires_grad_(True)
    with seams.no_dynamo_import():  # made without importing torch._dynamo (a second or more)
        optimizer = torch.optim.LBFGS([point], lr=1.0, max_iter=MAX_ITER, history_size=20,
                                      tolerance_grad=1e-12, tolerance_change=1e-14,
                                      line_search_fn="strong_wolfe")

    evals, lowest = 0, [math.inf, None]  # the lowest point evaluated, for a stalled descent

    def closure() -> torch.Tensor:
        nonlocal evals
        evals += 1
        if evals > STALL_EVALS + STALL_PER_ITER * optimizer.state[point].get("n_iter", 0):
            raise _Stalled
        value, point.grad = evaluate(point.detach())
        if torch.isfinite(value) and (found := float(value)) < lowest[0]:
            lowest[:] = found, point.detach().clone()
        return value

    try:
        optimizer.step(closure)
    except _Stalled:  # stopped inside a line search: its trial point is no iterate
        point = lowest[1] if lowest[1] is not None else point
    except (RuntimeError, ValueError, IndexError):  # a line search into a region the model
        pass  # refuses (torch's strong Wolfe search can fail with an IndexError there too)
    return point.detach()


def _polished(potential: Callable, point: torch.Tensor, with_hessian: bool) -> Fit | None:
    """The fit where L-BFGS ended at ``point``: with the Hessian, after Newton steps while it
    is positive definite and they gain, and whether it converged (the Newton decrement within
    TOLERANCE); None where the potential or its gradient is no number there."""
    value, gradient = _value_and_grad(potential, point)
    if not (math.isfinite(value) and torch.isfinite(gradient).all()):
        return None
    if not with_hessian:
        return Fit(point, value, None, True)
    hessian = _hessian(potential, point)
    for _ in range(NEWTON_STEPS):
        step = _newton_step(hessian, gradient)
        if step is None:
            break
        decrement = float(gradient @ step)
        if decrement <= TOLERANCE.get(point.dtype, 1e-3):
            return Fit(point, value, hessian, True)
        candidate = point - step
        new_value, new_gradient = _value_and_grad(potential, candidate)
        if not (math.isfinite(new_value) and new_value <= value):
            break
        point, value, gradient = candidate, new_value, new_gradient
        hessian = _hessian(potential, point)
    step = _newton_step(hessian, gradient)
    converged = step is not None and float(gradient @ step) <= TOLERANCE.get(point.dtype, 1e-3)
    return Fit(point, value, hessian, converged)


class _Lockstep:
    """L-BFGS searches side by side, their evaluations batched: each search runs in a thread
    of its own, one thread at a time (a torch operation lets go of Python's lock, and
    threads taking it in turn at each would cost more than the batching saves), until it
    asks for an evaluation; once every search still running has asked, this thread runs the
    model on all their points at once and hands each its value and gradient in turn."""

    CANCELLED = None  # an answer that ends the search where it is (a stop signal here)

    def __init__(self, potentials: Callable):
        self.potentials = potentials
        self.asked: queue.SimpleQueue = queue.SimpleQueue()  # (search, point or None: done)
        self.answers: list[queue.SimpleQueue] = []

    def run(self, starts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Where each search from ``starts`` ended."""
        ends: list[torch.Tensor | BaseException | None] = [None] * len(starts)
        self.answers = [queue.SimpleQueue() for _ in starts]

        def search(i: int) -> None:
            try:
                ends[i] = _lbfgs(lambda x: self.evaluate(i, x), starts[i])
            except BaseException as exc:  # noqa: BLE001 - raised in this thread, below
                ends[i] = exc
            finally:
                self.asked.put((i, None))

        threads = [threading.Thread(target=search, args=(i,), daemon=True)
                   for i in range(len(starts))]
        asked: dict[int, torch.Tensor] = {}
        try:
            for thread in threads:  # each runs to its first evaluation before the next starts
                thread.start()
                self._next(asked)
            while asked:
                answers = self._answers(asked)
                asked = {}
                for i, answer in answers.items():  # each runs to its next evaluation in turn
                    self.answers[i].put(answer)
                    self._next(asked)
        finally:  # a stop signal here: the searches stop at their next evaluation
            for answers in self.answers:
                answers.put(self.CANCELLED)
        for thread in threads:
            thread.join()
        for end in ends:
            if isinstance(end, BaseException):
                raise end
        return ends

    def _answers(self, asked: dict[int, torch.Tensor]) -> dict[int, tuple | Exception]:
        """Each search's value and gradient at the point it asked for, by one batched run;
        where that raises, a run a point, and a point's own error is its search's answer
        (it ends that search, as it would end a search run alone)."""
        order = sorted(asked)
        try:
            values, gradients = value_and_gradient(
                self.potentials, torch.stack([asked[i] for i in order]))
            return {i: (values[row], gradients[row]) for row, i in enumerate(order)}
        except (RuntimeError, ValueError, IndexError):
            pass
        answers: dict[int, tuple | Exception] = {}
        for i in order:
            try:
                values, gradients = value_and_gradient(self.potentials, asked[i][None])
                answers[i] = (values[0], gradients[0])
            except (RuntimeError, ValueError, IndexError) as exc:
                answers[i] = exc
        return answers

    def _next(self, asked: dict[int, torch.Tensor]) -> None:
        """Wait for the running search's next evaluation (or its end)."""
        i, point = self.asked.get()
        if point is not None:
            asked[i] = point

    def evaluate(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Search ``i``'s potential and gradient at ``x``, from the next batched run."""
        self.asked.put((i, x))
        answer = self.answers[i].get()
        if answer is self.CANCELLED:
            raise _Stalled  # the search ends where it is
        if isinstance(answer, Exception):
            raise answer
        return answer


class _Stalled(Exception):
    """A descent's line searches keep failing: its evaluations far outrun its iterations."""


def degenerate(fit: Fit, sites: list[Site]) -> str:
    """Why the point a mode search found is no mode to start from, or "": it did not
    converge and a constrained site went to its support's edge (a funnel's neck, where the
    density is unbounded). A flat direction alone (a singular Hessian) is no reason: the
    other coordinates' mode still helps, and ``curvature`` notes the rest."""
    if fit.converged:
        return ""
    for site in sites:
        values = fit.point[site.start:site.stop]
        if _identity(site.transform) or not len(values):
            continue
        worst = int(values.abs().argmax())
        if float(values[worst].abs()) > BOUNDARY:
            edge = site.transform(values.reshape(site.shape)).reshape(-1)
            at = (f"{float(edge[worst]):.2g}" if len(edge) == len(values)
                  else f"unconstrained {float(values[worst]):.3g}")
            return (f"no mode: the search ran to the edge of {site.name}'s support "
                    f"({at}), where the density grows without bound (a "
                    "degenerate mode, as at a centred hierarchical model's tau -> 0)")
    return ""


def _identity(transform) -> bool:
    """Whether ``transform`` (biject_to's for a site's support) is the identity: a real site."""
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) \
        and not transform.parts


def _value_and_grad(potential: Callable, point: torch.Tensor) -> tuple[float, torch.Tensor]:
    """``_evaluated`` as a number, and a gradient of NaNs where the potential is none."""
    value, gradient = _evaluated(potential, point)
    if not torch.isfinite(value):
        return math.inf, torch.full_like(point, math.nan)
    return value.item(), gradient


def _hessian(potential: Callable, point: torch.Tensor) -> torch.Tensor:
    """The potential's Hessian at ``point``, a double backward a row; for a long potential
    (``BATCHED_FROM`` operations or more), or once sympy is imported, its rows in one batched
    double backward (vmap over the basis vectors), unless vmap cannot batch an operation."""
    with seams.no_dynamo_import():  # a double backward would import it (0.5 s)
        return _hessian_rows(potential, point.detach())


def _hessian_rows(potential: Callable, point: torch.Tensor) -> torch.Tensor:
    if "sympy" in sys.modules or _operations(potential, point) >= BATCHED_FROM:
        try:
            with warnings.catch_warnings():  # vmap's note on an operation it loops over
                warnings.simplefilter("ignore", UserWarning)
                hessian = torch.autograd.functional.hessian(potential, point, vectorize=True)
            return (hessian + hessian.T) / 2
        except Exception:  # noqa: BLE001 - the same Hessian, a row at a time
            pass
    hessian = torch.autograd.functional.hessian(potential, point)
    return (hessian + hessian.T) / 2


def _operations(potential: Callable, point: torch.Tensor) -> int:
    """The torch operations one evaluation of ``potential`` runs, counted once per
    potential."""
    if potential not in _OPERATIONS:
        with seams.Counting() as counted, torch.no_grad():
            potential(point)
        _OPERATIONS[potential] = counted.ops
    return _OPERATIONS[potential]


def _newton_step(hessian: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor | None:
    """H^-1 g, or None where H is not positive definite (no Newton step to a maximum)."""
    cholesky, info = torch.linalg.cholesky_ex(hessian)
    if info.item() != 0 or not torch.isfinite(hessian).all():
        return None
    return torch.cholesky_solve(gradient[:, None], cholesky)[:, 0]


def curvature(hessian: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                     str]:
    """The covariance (inverse Hessian) where the Hessian is positive definite, else the
    Hessian's diagonal where that is positive, else neither; with a note on any fallback."""
    if hessian is None:
        return None, None, (f"init laplace: more than {MAX_HESSIAN_DIM} unconstrained "
                            "dimensions, so only the location is set; the scale stays init_scale")
    diagonal = hessian.diagonal()
    cholesky, info = torch.linalg.cholesky_ex(hessian)
    if info.item() == 0:
        covariance = torch.cholesky_inverse(cholesky)
        return (covariance + covariance.T) / 2, diagonal, ""
    if (diagonal > 0).all():
        return None, diagonal, ("init laplace: the Hessian at the mode is not positive "
                                "definite; the scale comes from its diagonal")
    return None, None, ("init laplace: the Hessian at the mode is not positive definite, nor "
                        "its diagonal; the scale stays init_scale")


def write(guide, sites: list[Site], mode: torch.Tensor, covariance: torch.Tensor | None,
          precision_diag: torch.Tensor | None) -> None:
    """Overwrite the guide's parameters in place: its location with the mode, its scales with
    the Laplace Gaussian's (as much of it as the family holds)."""
    from pyro.infer.autoguide import (
        AutoDiagonalNormal,
        AutoLowRankMultivariateNormal,
        AutoMultivariateNormal,
        AutoNormal,
    )

    positive = transform_to(guide.scale_constraint)
    with torch.no_grad():
        if isinstance(guide, AutoNormal):
            for site in sites:
                _leaf(guide.locs, site.name).copy_(mode[site.start:site.stop].reshape(site.shape))
            if precision_diag is not None:
                scale = precision_diag.rsqrt()
                for site in sites:
                    _leaf(guide.scales, site.name).copy_(
                        positive.inv(scale[site.start:site.stop].reshape(site.shape)))
            return
        _leaf(guide, "loc").copy_(mode)
        if isinstance(guide, AutoDiagonalNormal) and precision_diag is not None:
            _leaf(guide, "scale").copy_(positive.inv(precision_diag.rsqrt()))
        elif isinstance(guide, AutoMultivariateNormal):
            _write_full_rank(guide, positive, covariance, precision_diag)
        elif isinstance(guide, AutoLowRankMultivariateNormal):
            _write_low_rank(guide, positive, covariance, precision_diag)


def _write_full_rank(guide, positive, covariance, precision_diag) -> None:
    """scale * scale_tril (unit diagonal) = the Cholesky factor of the covariance; with only
    a diagonal, independent scales."""
    if covariance is not None:
        tril, info = torch.linalg.cholesky_ex(covariance)
        if info.item() == 0:
            scale = tril.diagonal()
            _leaf(guide, "scale").copy_(positive.inv(scale))
            _leaf(guide, "scale_tril").copy_(tril / scale[:, None])
            return
    if precision_diag is not None:
        _leaf(guide, "scale").copy_(positive.inv(precision_diag.rsqrt()))
        _leaf(guide, "scale_tril").copy_(torch.diag_embed(torch.ones_like(precision_diag)))


def _write_low_rank(guide, positive, covariance, precision_diag) -> None:
    """Pyro's covariance is diag(s) (C C' + I) diag(s): take the covariance's top ``rank``
    principal directions (probabilistic PCA, Tipping and Bishop 1999) for C and the rest of
    each variance for s, so every marginal variance is the Laplace one."""
    if covariance is None:
        if precision_diag is not None:
            spread = (1 + guide.cov_factor.pow(2).sum(-1)).sqrt()
            _leaf(guide, "scale").copy_(positive.inv(precision_diag.rsqrt() / spread))
        return
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    rank = guide.rank
    rest = eigenvalues[rank:]
    floor = rest.mean() if len(rest) else eigenvalues[-1] / 2
    factor = eigenvectors[:, :rank] * (eigenvalues[:rank] - floor).clamp(min=0).sqrt()
    variance = covariance.diagonal()
    residual = (variance - factor.pow(2).sum(-1)).clamp(min=1e-6 * variance)
    scale = residual.sqrt()
    _leaf(guide, "scale").copy_(positive.inv(scale))
    _leaf(guide, "cov_factor").copy_(factor / scale[:, None])


def _leaf(module: PyroModule, name: str) -> torch.Tensor:
    """The unconstrained tensor behind a (dotted) parameter of ``module``, a PyroParam or a
    plain ``nn.Parameter``: the one the parameter store holds, so writing it in place is what
    the optimiser then steps."""
    *path, last = name.split(".")
    for part in path:
        module = getattr(module, part)
    params = dict(module.named_parameters(recurse=False))
    return params.get(f"{last}_unconstrained", params.get(last))
