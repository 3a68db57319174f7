"""Hamiltonian Monte Carlo started from a Gaussian fit: the automatic pipeline's ``hmc`` stage
(plugins/stages.py) runs it where no variational answer can be trusted.

The fit already knows where the posterior lies and its scales and correlations, which is what a
sampler's warm-up spends most of its time learning. So the chains start at draws from the fit (in
``groups`` of chains that share a start, for the nested R-hat that judges many short chains:
workbench/report/draws.py), and sample ``x = loc + A u`` with an identity mass in ``u`` (``A`` the
fit's ``scale_tril``: the fit as a dense mass matrix, as NeuTra-HMC uses a flow; Hoffman et al.
2019). Halfway through the warm-up ``loc`` and ``A`` are re-estimated from the chains' own draws
(Stan's dense metric, regularised towards the fit), since a Gaussian fit of a posterior it cannot
follow is often too narrow. All chains move together, one batched evaluation of the model's density
and its gradient per leapfrog step (``pathfinder.batch_potential``), and the warm-up tunes what they
share from all of them at once, as ChEES-HMC does (Hoffman, Radul and Sountsov 2021): the step size
by dual averaging of the chains' harmonic-mean acceptance towards ``target`` (Hoffman and Gelman
2014), the trajectory length T by Adam on log T up the ChEES criterion (the change in the chains'
squared distances from their mean over a transition, which is largest where successive draws are
least correlated). Each transition runs a uniform fraction of T (jitter: no periodic orbits).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

FIRST_LENGTH = 1.0  # the trajectory length the warm-up starts from, in whitened units
ADAM = {"lr": 0.025, "beta1": 0.0, "beta2": 0.95, "clip": 0.35}  # ChEES's, on log T
DIVERGENT = 1000.0  # an energy error beyond it is a divergent transition (Stan's)
MAX_LEAPFROG = 256  # per transition, whatever the step size (a step size tuned to 0)
DUAL_AVERAGING = {"gamma": 0.05, "t0": 10.0, "kappa": 0.75}  # Stan's


@dataclass
class Chains:
    """A run of the sampler: ``points`` (``(chains, draws, d)``, float64) in the fit's
    unconstrained coordinates, after the warm-up, and how it went."""

    points: torch.Tensor
    warmup: int
    step_size: float
    leapfrog: float  # mean leapfrog steps a transition, after the warm-up
    accept: float  # mean acceptance probability after the warm-up
    divergences: int  # after the warm-up
    gradients: int  # batched evaluations of the density's gradient, warm-up included
    seconds: float
    graph: str  # the gradients: "packaged", "traced" (a graph replayed) or "eager" (the model)


def sample(potentials: Callable[[torch.Tensor], torch.Tensor], loc: torch.Tensor,
           scale_tril: torch.Tensor, chains: int, warmup: int, draws: int, seed: int,
           rounds: int = 1, enough: Callable[[torch.Tensor], bool] | None = None,
           target: float = 0.65, tune_length: bool = True, groups: int = 1,
           packaged: Callable | None = None) -> Chains:
    """``chains`` chains of ``draws`` draws after ``warmup`` transitions, started from the
    Gaussian (``loc``, ``scale_tril``); ``potentials`` is -log p (up to a constant) of each row
    of an ``(n, d)`` tensor, differentiable. With ``rounds`` > 1, ``draws`` more at a time
    until ``enough`` says the draws so far (``(chains, n, d)``) are enough, ``rounds`` times
    ``draws`` at most; the step size tuned to an acceptance of ``target``; the chains in
    ``groups`` equal groups (in order), each started at one draw; with ``tune_length`` off,
    each transition runs a uniform fraction of FIRST_LENGTH (no ChEES: the comparison in
    benchmarks/README.md); ``packaged``, ``laplace.value_and_gradient`` of ``potentials`` compiled
    (``workbench.compile.traced.packaged``). Draws in the default dtype, kept in float64."""
    if groups < 1 or chains % groups:
        raise ValueError(f"the chains ({chains}) must split into {groups} equal groups")
    began = time.perf_counter()
    generator = torch.Generator(device=loc.device).manual_seed(seed)
    dtype = torch.get_default_dtype()
    metric = _Metric(loc.to(dtype), scale_tril.to(dtype))
    u = _start(potentials, metric, groups, generator).repeat_interleave(chains // groups, 0)
    gradients = _Gradients(potentials, metric.point(u), packaged)
    value, gradient = _value_and_grad(gradients, metric, u)
    step = _first_step(gradients, metric, u, value, gradient, generator)
    tuner, length = _DualAveraging(step, target), _ChEES(FIRST_LENGTH)
    window = (warmup // 4, warmup // 2)  # the draws the metric is re-estimated from
    kept, accepts, lengths, divergent, evaluations = [], [], [], 0, 0
    for i in range(warmup + draws * rounds):
        tuning = i < warmup
        step = tuner.step if tuning else tuner.final
        jitter = float(torch.rand((), generator=generator, device=u.device))
        steps = max(1, min(MAX_LEAPFROG, math.ceil(
            jitter * (length.value if tuning else length.final) / step)))
        before = u
        u, value, gradient, accept, diverged, proposed = _transition(
            gradients, metric, u, value, gradient, step, steps, generator)
        evaluations += steps
        if tuning:
            tuner.update(_harmonic_mean(accept, diverged))
            if tune_length:
                length.update(before, proposed, accept, diverged, jitter)
            if window[0] <= i < window[1]:
                kept.append(metric.point(u).double())
            if i == window[1] - 1 and window[1] > window[0]:
                u = metric.refit(torch.stack(kept, 1), u)
                value, gradient = _value_and_grad(gradients, metric, u)
                tuner = _DualAveraging(tuner.step, target)
                kept = []
            continue
        kept.append(metric.point(u).double())
        accepts.append(float(accept.mean()))
        lengths.append(steps)
        divergent += int(diverged.sum())
        if (i + 1 - warmup) % draws == 0 and i + 1 < warmup + draws * rounds and \
                enough is not None and enough(torch.stack(kept, 1).cpu()):
            break
    points = torch.stack(kept, 1) if kept else torch.empty(chains, 0, loc.numel())
    return Chains(points.cpu(), warmup, tuner.final, sum(lengths) / max(len(lengths), 1),
                  sum(accepts) / max(len(accepts), 1), divergent, evaluations,
                  time.perf_counter() - began, gradients.how)


class _Metric:
    """x = loc + A u: the chains' coordinates ``u`` and the model's unconstrained ``x``."""

    def __init__(self, loc: torch.Tensor, scale_tril: torch.Tensor):
        self.loc, self.A = loc, scale_tril

    def point(self, u: torch.Tensor) -> torch.Tensor:
        return self.loc + u @ self.A.T

    def refit(self, points: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Re-estimate loc and A from ``points`` (``(chains, n, d)``) as Stan's dense metric
        does (the sample covariance shrunk towards the fit's own scales), and return the
        chains' positions ``u`` in the new coordinates."""
        flat = points.flatten(0, 1).to(self.loc.dtype)
        count, dimension = flat.shape
        if count <= dimension:
            return u
        here = self.point(u)
        covariance = torch.cov(flat.T).reshape(dimension, dimension)
        prior = self.A @ self.A.T
        shrunk = (count / (count + 5.0)) * covariance + (5.0 / (count + 5.0)) * torch.diag(
            prior.diagonal())
        factor, info = torch.linalg.cholesky_ex(shrunk)
        if info.item() != 0 or not torch.isfinite(factor).all():
            return u
        self.loc, self.A = flat.mean(0), factor
        return torch.linalg.solve_triangular(self.A, (here - self.loc).T, upper=False).T


class _Gradients:
    """``laplace.value_and_gradient`` at each chain's point. Where the model runs all chains in one
    batch, a graph of its torch operations replays it: ``packaged`` (compiled by an earlier
    run: ``workbench.compile.traced``) where given, else traced once from ``potentials``
    (Pyro's bookkeeping runs once); either only where it agrees with ``potentials`` at two
    sets of points. Else ``potentials`` itself through autograd, as for the chains a call of
    the graph fails on (a covariance no longer one: the model's own run then says inf)."""

    def __init__(self, potentials: Callable, points: torch.Tensor,
                 packaged: Callable | None = None):
        from workbench.compile.traced import traced

        self.potentials, self.graph, self.how = potentials, None, "eager"
        self.safe: torch.Tensor | None = None  # the last points the graph passed
        if getattr(potentials, "rowwise", None) is not False:
            return
        wider = points + 0.1 * points.std(0, keepdim=True).nan_to_num()
        for how, graph in (("packaged", lambda: packaged),
                           ("traced", lambda: traced(self.eager, [points])[0])):
            graph = graph()
            if graph is not None and all(self._agrees(graph, p) for p in (points, wider)):
                self.graph, self.how = graph, how
                return

    def eager(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from vibench_plugins.laplace import value_and_gradient

        return value_and_gradient(self.potentials, x)

    def _agrees(self, graph: Callable, x: torch.Tensor) -> bool:
        """Whether ``graph`` gives the model's values and gradients at ``x``: to rounding, or
        within four times what the model's own change when ``x`` moves by its dtype's
        resolution (a compiled graph sums in another order, and a density built on a
        Cholesky factor, as a Gaussian process's, turns float32's rounding into 0.01 nats)."""
        wanted = self.eager(x)
        nudge = torch.randn(x.shape, generator=torch.Generator(x.device).manual_seed(0),
                            dtype=x.dtype, device=x.device)
        moved = self.eager(x + torch.finfo(x.dtype).eps * x.abs() * nudge)
        try:
            found = tuple(graph(x))
        except RuntimeError:
            return False
        return all(
            a.shape == b.shape and (torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True)
                                    or bool(((a - b).abs() <= 4 * (c - b).abs().max()).all()))
            for a, b, c in zip(found, wanted, moved))

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graph is not None:
            try:
                found = tuple(self.graph(x))
            except RuntimeError as exc:  # torch's own LinAlgError among them
                found = self._around(x, exc)
            else:
                self.safe = x  # every row of it passes: a stand-in for a failing row
            if found is not None:
                return found
        return self.eager(x)

    def _around(self, x: torch.Tensor, error: RuntimeError
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Where the graph fails at ``x`` (a chain whose covariance is no longer one), the
        graph's values for the other rows, with the failing rows at the last points it
        passed, and the model's own for the failing rows alone. The rows are those torch's
        error names (a batched Cholesky's "batch element 3": a hint, kept only where the
        graph then passes) or found by halving. None where there is no such point yet or the
        failure is no few rows'. A call that fails costs a packaged graph 5 ms, one that
        passes 0.2: so the hint first."""
        if self.safe is None:
            return None
        most = max(1, len(x) // 4)

        def run(rows: list[int]) -> tuple | RuntimeError:
            mixed = x.clone()
            mixed[rows] = self.safe[rows]
            try:
                return tuple(self.graph(mixed))
            except RuntimeError as exc:
                return exc

        bad: list[int] = []
        found: tuple | RuntimeError = error
        while isinstance(found, RuntimeError) and len(bad) < most:
            named = _failing_row(found, len(x))
            if named is None or named in bad:
                break
            bad.append(named)
            found = run(bad)
        if isinstance(found, RuntimeError):  # no hint, or a wrong one: halve
            bad = self._halving(x, run, most)
            found = run(bad) if bad else found
        if isinstance(found, RuntimeError):
            return None
        value, gradient = (t.clone() for t in found)
        value[bad], gradient[bad] = self.eager(x[bad])
        return value, gradient

    @staticmethod
    def _halving(x: torch.Tensor, run: Callable, most: int) -> list[int]:
        """The rows of ``x`` the graph fails on, found by halving (``run`` of some rows at
        their safe points); none where that finds no row's failure or more than ``most``."""
        everyone = list(range(len(x)))
        bad, suspects = [], [everyone]
        while suspects:
            rows = suspects.pop()
            if len(rows) == 1:
                bad += rows
                continue
            halves = (rows[:len(rows) // 2], rows[len(rows) // 2:])
            # the half is at x, every other row at its safe point
            failing = [half for half in halves
                       if isinstance(run([r for r in everyone if r not in half]), RuntimeError)]
            if not failing or len(bad) + len(suspects) + len(failing) > most:
                return []
            suspects += failing
        return bad


def _failing_row(error: RuntimeError, rows: int) -> int | None:
    """The row a batched operation's error names ("(Batch element 3): ..."), if any."""
    import re

    named = re.search(r"[Bb]atch element (\d+)", str(error))
    return int(named[1]) if named and int(named[1]) < rows else None


def _value_and_grad(gradients: _Gradients, metric: _Metric, u: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The potential of each chain at ``u`` and its gradient in ``u`` (inf and 0 where the
    model refuses the point)."""
    value, gradient = gradients(metric.point(u))
    gradient = gradient @ metric.A  # x = loc + A u
    bad = ~torch.isfinite(gradient).all(-1) | ~torch.isfinite(value)
    return torch.where(bad, torch.inf, value), torch.where(bad[:, None], 0.0, gradient)


def _start(potentials: Callable, metric: _Metric, chains: int, generator: torch.Generator
           ) -> torch.Tensor:
    """``chains`` starts: draws from the fit where the model's density is finite there
    (redrawn up to ten times), else the fit's location."""
    u = torch.randn(chains, metric.loc.numel(), generator=generator, dtype=metric.loc.dtype,
                    device=metric.loc.device)
    for _ in range(10):
        with torch.no_grad():
            bad = ~torch.isfinite(potentials(metric.point(u)))
        if not bad.any():
            return u
        u = torch.where(bad[:, None], torch.randn(u.shape, generator=generator, dtype=u.dtype,
                                                  device=u.device), u)
    return torch.where(bad[:, None], 0.0, u)


def _first_step(gradients: _Gradients, metric: _Metric, u: torch.Tensor, value: torch.Tensor,
                gradient: torch.Tensor, generator: torch.Generator) -> float:
    """A first step size: halved or doubled until one leapfrog step's acceptance crosses one
    half (Hoffman and Gelman's heuristic), from 1 / d^(1/4), the scale at which a standard
    normal's acceptance holds in d dimensions."""
    step = 1.0 / metric.loc.numel() ** 0.25
    direction = None
    for _ in range(20):
        momentum = torch.randn(u.shape, generator=generator, dtype=u.dtype, device=u.device)
        *_, accept = _leapfrog(gradients, metric, u, momentum, value, gradient, step, 1)
        above = float(accept.mean()) > 0.5
        if direction is None:
            direction = above
        if above != direction:
            break
        step = step * 2 if above else step / 2
    return step


def _transition(gradients: _Gradients, metric: _Metric, u: torch.Tensor, value: torch.Tensor,
                gradient: torch.Tensor, step: float, steps: int, generator: torch.Generator):
    """One HMC transition of every chain: a fresh momentum, ``steps`` leapfrog steps, a
    Metropolis correction; the new state, each chain's acceptance probability, which chains
    diverged, and the proposal (its position and momentum) whether accepted or not."""
    momentum = torch.randn(u.shape, generator=generator, dtype=u.dtype, device=u.device)
    new_u, new_value, new_gradient, new_momentum, energy, accept = _leapfrog(
        gradients, metric, u, momentum, value, gradient, step, steps)
    take = torch.rand(accept.shape, generator=generator, dtype=u.dtype,
                      device=u.device) < accept
    diverged = ~(energy < DIVERGENT)
    proposed = (new_u, new_momentum)
    u = torch.where(take[:, None], new_u, u)
    value = torch.where(take, new_value, value)
    gradient = torch.where(take[:, None], new_gradient, gradient)
    return u, value, gradient, accept, diverged, proposed


def _leapfrog(gradients: _Gradients, metric: _Metric, u: torch.Tensor, momentum: torch.Tensor,
              value: torch.Tensor, gradient: torch.Tensor, step: float, steps: int):
    """``steps`` leapfrog steps of size ``step``; the end point, its potential, gradient and
    momentum, each chain's energy error and acceptance probability (0 where it is no
    number)."""
    start_energy = value + 0.5 * (momentum ** 2).sum(-1)
    p = momentum - 0.5 * step * gradient
    for i in range(steps):
        u = u + step * p
        value, gradient = _value_and_grad(gradients, metric, u)
        p = p - (step if i < steps - 1 else 0.5 * step) * gradient
    error = value + 0.5 * (p ** 2).sum(-1) - start_energy
    error = torch.where(torch.isnan(error), torch.inf, error)
    accept = torch.exp(-error.clamp(min=0.0))
    return u, value, gradient, p, error, accept


def _harmonic_mean(accept: torch.Tensor, diverged: torch.Tensor) -> float:
    """The chains' harmonic-mean acceptance, divergent ones counted as 0 (ChEES's: a chain
    that rarely moves pulls the step size down more than an arithmetic mean lets it)."""
    accept = torch.where(diverged, 0.0, accept)
    if not bool((accept > 0).all()):
        return 0.0
    return float(1.0 / (1.0 / accept).mean())


class _ChEES:
    """The trajectory length T, tuned up the ChEES criterion by Adam on log T (Hoffman,
    Radul and Sountsov 2021, with their settings ``ADAM``); ``final`` is its running average
    over the warm-up, weighted towards the later steps as dual averaging's."""

    def __init__(self, length: float):
        self.log_value, self.log_average, self.count = math.log(length), math.log(length), 0
        self.second = 0.0

    @property
    def value(self) -> float:
        return math.exp(self.log_value)

    @property
    def final(self) -> float:
        return math.exp(self.log_average)

    def update(self, before: torch.Tensor, proposed: tuple, accept: torch.Tensor,
               diverged: torch.Tensor, jitter: float) -> None:
        """One step up the criterion from a transition: each chain's start ``before``, its
        proposal's position and momentum, acceptance and divergence, and the jitter (the
        fraction of T it ran)."""
        position, momentum = proposed
        weight = torch.where(diverged | ~torch.isfinite(position).all(-1), 0.0, accept)
        if not float(weight.sum()) > 0:
            return
        safe = torch.where(weight[:, None] > 0, position, 0.0)
        centre = (weight[:, None] * safe).sum(0) / weight.sum()
        ahead, behind = safe - centre, before - before.mean(0)
        change = (ahead ** 2).sum(-1) - (behind ** 2).sum(-1)
        gradients = jitter * self.value * change * (ahead * torch.where(
            weight[:, None] > 0, momentum, 0.0)).sum(-1)
        gradient = float((weight * gradients).sum() / weight.sum())
        if not math.isfinite(gradient):
            return
        self.count += 1
        self.second = ADAM["beta2"] * self.second + (1 - ADAM["beta2"]) * gradient ** 2
        corrected = self.second / (1 - ADAM["beta2"] ** self.count)
        move = ADAM["lr"] * gradient / (math.sqrt(corrected) + 1e-12)
        self.log_value += max(-ADAM["clip"], min(ADAM["clip"], move))
        eta = self.count ** -0.5
        self.log_average = eta * self.log_value + (1 - eta) * self.log_average


class _DualAveraging:
    """Nesterov's dual averaging of log step size towards an acceptance of ``target``
    (Hoffman and Gelman 2014, algorithm 5); ``final`` is the averaged step size the draws
    use."""

    def __init__(self, step: float, target: float):
        self.mu, self.step, self.target = math.log(10 * step), step, target
        self.count, self.h, self.log_average = 0, 0.0, math.log(step)

    def update(self, accept: float) -> None:
        gamma, t0, kappa = (DUAL_AVERAGING[k] for k in ("gamma", "t0", "kappa"))
        self.count += 1
        weight = 1.0 / (self.count + t0)
        self.h = (1 - weight) * self.h + weight * (self.target - accept)
        log_step = self.mu - math.sqrt(self.count) / gamma * self.h
        eta = self.count ** -kappa
        self.log_average = eta * log_step + (1 - eta) * self.log_average
        self.step = math.exp(log_step)

    @property
    def final(self) -> float:
        return math.exp(self.log_average)
