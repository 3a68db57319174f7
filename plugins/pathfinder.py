"""Pathfinder (Zhang, Carpenter, Gelman and Vehtari 2022, JMLR 23(306)): variational inference
along an optimisation path. L-BFGS climbs the log joint in the guide's unconstrained space; at
each iterate the L-BFGS history (``history`` pairs) gives an inverse-Hessian estimate, a
diagonal plus a low-rank term, and with it a Gaussian around the iterate's quasi-Newton point.
Each Gaussian's ELBO is estimated from ``draws`` draws and the best one kept: a path's answer.
Multi-path Pathfinder runs ``num_paths`` paths from different starts, pools draws from each
path's best Gaussian and importance-resamples them with Pareto smoothing (PSIS); its k-hat
says how far the Gaussians are from the posterior.

A Gaussian autoguide with ``init: pathfinder`` starts at the mean and covariance of the
importance-weighted draws where k-hat < 0.7 trusts them (a short L-BFGS history leaves the
best Gaussian too narrow along the directions it did not see, as on nes) and the paths do
not sit at separate modes that share the draws (``several_modes``), else at the best
Gaussian of all paths; the ``pathfinder`` guide is a full-rank Gaussian started so. The log
joint climbed sums out the sites a model enumerates (``laplace.potential_fn``). Other
departures from the paper: the Gaussians use the last 20 pairs by default, not 6 (on the
development set, benchmarks/README.md, 12 of 16 Pathfinder-only fits good against 9); the
first path starts from the guide's ``init_loc`` (the others uniformly in (-2, 2), as Stan's
and Pyro's ``init_to_uniform``); the line search is a weak Wolfe bisection, not
More-Thuente's (pairs with s'y <= 1e-12 |y|^2 are dropped, as the paper's Algorithm 3 does);
the ELBO choice uses common random numbers and a second look at the finalists; the pooled
weights divide by the paths' mixture (see the functions).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import torch

from vibench_plugins import laplace
from workbench.device import default_dtype
from workbench.report.thresholds import khat_trusted

NUM_PATHS = 4
MAX_ITER = 1000  # L-BFGS iterations per path at most
HISTORY = 20  # L-BFGS (s, y) pairs the inverse Hessian is built from (the paper's J is 6)
OPTIMISER_HISTORY = 20  # pairs L-BFGS's own steps use, at least (torch's LBFGS: 100)
DRAWS = 10  # draws per iterate for its ELBO estimate (the paper's K)
FINALISTS = 5  # a path's best iterates by that estimate, scored again ...
FINAL_DRAWS = 50  # ... from this many draws
PSIS_DRAWS = 1000
# Below this k-hat the weighted draws' moments are trusted (Yao et al. 2018) and the guide
# takes them, if their effective sample size is MOMENT_ESS times the dimension or more.
MOMENT_ESS = 5  # draws from the paths' best Gaussians, pooled, for PSIS's k-hat
MAX_DENSE_DIM = laplace.MAX_HESSIAN_DIM  # beyond it the guide gets the location and scales
# Two paths sit at different modes when their best Gaussians' means lie more than SEPARATE
# marginal sds apart in some coordinate under each; where two such paths both hold at least
# MODE_SHARE of the weighted draws, the draws' moments would put one Gaussian between them
# (a mixture's two labellings: both means at 0), and the guide starts at the best path's.
SEPARATE = 10.0
MODE_SHARE = 0.1
CURVATURE_EPS = 1e-12  # a pair with s'y <= this |y|^2 is dropped (Algorithm 3)
ARMIJO = 1e-4  # the line search's sufficient decrease ...
WOLFE = 0.9  # ... and curvature constants (Nocedal and Wright's for quasi-Newton)
MAX_HALVINGS = 40  # evaluations per line search at most
# Stop when the potential changes by less than this, relative to its size (a few hundred
# machine epsilons in float64, as laplace.py's L-BFGS: Stan's 1e4 stops in kilpisjarvi's
# valley, 60 sd from the mode, where steps are short but the gradient is not small; in float32
# one epsilon), or the gradient's largest element falls below the second.
RELATIVE_TOLERANCE = {torch.float64: 1e-13, torch.float32: 1.2e-7}
GRADIENT_TOLERANCE = 1e-8


@dataclass
class Gaussian:
    """N(mean, diag(alpha) + beta gamma beta'): the paper's factored inverse Hessian (its
    formula II.2), with what Algorithm 4 samples from."""

    mean: torch.Tensor
    alpha: torch.Tensor
    beta: torch.Tensor  # (d, 2m)
    gamma: torch.Tensor  # (2m, 2m)

    def __post_init__(self):
        scaled = self.beta / self.alpha.sqrt()[:, None]
        self.q, r = torch.linalg.qr(scaled)
        middle = torch.eye(r.shape[0], dtype=r.dtype) + r @ self.gamma @ r.T
        self.tril, info = torch.linalg.cholesky_ex((middle + middle.T) / 2)
        self.valid = info.item() == 0 and bool(torch.isfinite(self.tril).all())
        self.log_det = float(self.alpha.log().sum() + 2 * self.tril.diagonal().log().sum()) \
            if self.valid else math.nan

    def sample(self, count: int, u: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` draws and their log densities under this Gaussian; from the standard
        normal draws ``u`` where given."""
        dimension = self.mean.numel()
        if u is None:
            u = torch.randn(count, dimension, dtype=self.mean.dtype)
        eye = torch.eye(self.tril.shape[0], dtype=u.dtype)
        spread = (u @ self.q) @ (self.tril - eye).T @ self.q.T + u
        draws = self.mean + self.alpha.sqrt() * spread
        log_q = -0.5 * (self.log_det + u.pow(2).sum(-1) + dimension * math.log(2 * math.pi))
        return draws, log_q

    def covariance(self) -> torch.Tensor:
        covariance = torch.diag(self.alpha) + self.beta @ self.gamma @ self.beta.T
        return (covariance + covariance.T) / 2

    def log_prob(self, points: torch.Tensor) -> torch.Tensor:
        """The log density at each row of ``points`` (through the dense covariance)."""
        tril = torch.linalg.cholesky(self.covariance())
        return torch.distributions.MultivariateNormal(self.mean, scale_tril=tril).log_prob(points)

    def marginal_sds(self) -> torch.Tensor:
        """The marginal sds: the square roots of the covariance's diagonal, without it."""
        return (self.alpha + ((self.beta @ self.gamma) * self.beta).sum(1)).clamp(min=0).sqrt()

    def precision_diagonal(self) -> torch.Tensor:
        """diag of the inverse covariance: the conditional variances' inverses, which a
        mean-field guide takes (as laplace.py's); beyond ``MAX_DENSE_DIM`` by Woodbury,
        without the (d, d) matrix."""
        inverse_alpha = 1 / self.alpha
        if self.beta.shape[1] == 0:
            return inverse_alpha
        if self.mean.numel() <= MAX_DENSE_DIM:
            return torch.linalg.inv(self.covariance()).diagonal()
        scaled = self.beta * inverse_alpha[:, None]
        inner = torch.linalg.inv(self.gamma) + self.beta.T @ scaled
        return inverse_alpha - ((scaled @ torch.linalg.inv(inner)) * scaled).sum(-1)


@dataclass
class Path:
    """One path's result: its best Gaussian and that Gaussian's ELBO estimate, the number of
    iterates and of gradient evaluations, and whether L-BFGS stopped by its tolerances."""

    best: Gaussian | None
    elbo: float
    iterations: int
    gradient_evaluations: int
    converged: bool


@dataclass
class Result:
    """Multi-path Pathfinder: every path, the best Gaussian over all, and from the pooled
    draws the PSIS k-hat, the importance-resampled draws (unconstrained) and the weighted
    draws' mean and covariance (where the weights' effective sample size allows)."""

    paths: list[Path]
    best: Gaussian | None
    elbo: float
    khat: float
    draws: torch.Tensor | None
    moments: tuple[torch.Tensor, torch.Tensor] | None = None
    several_modes: bool = False  # paths at separate modes share the weighted draws

    @property
    def gradient_evaluations(self) -> int:
        return sum(path.gradient_evaluations for path in self.paths)


def check_options(num_paths: int, max_iter: int, history: int, draws: int) -> None:
    """One clear line for an option out of range."""
    for name, value in (("num_paths", num_paths), ("max_iter", max_iter),
                        ("history", history), ("draws", draws)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"pathfinder option {name} must be a whole number >= 1, "
                             f"got {value!r}")


def lbfgs_path(potential: Callable, start: torch.Tensor, max_iter: int, history: int
               ) -> tuple[list[torch.Tensor], list[torch.Tensor], int, bool]:
    """L-BFGS (two-loop recursion over ``history`` pairs, weak Wolfe line search) minimising
    ``potential`` from ``start``: the iterates and their gradients, the number of gradient
    evaluations, and whether it stopped by its tolerances (or where no step decreases the
    potential) rather than by ``max_iter``."""
    point = start.detach().clone()
    value, gradient = laplace._value_and_grad(potential, point)
    evaluations = 1
    if not (math.isfinite(value) and torch.isfinite(gradient).all()):
        return [], [], evaluations, False
    points, gradients = [point], [gradient]
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    tolerance = RELATIVE_TOLERANCE.get(point.dtype, 1e-3)
    for _ in range(max_iter):
        direction = -_two_loop(gradient, pairs)
        slope = float(gradient @ direction)
        if not slope < 0:  # not a descent direction: restart from steepest descent
            pairs, direction = [], -gradient
            slope = float(gradient @ direction)
        step = 1.0 if pairs else min(1.0, 1.0 / float(gradient.abs().sum()))
        found, evaluated = _line_search(potential, point, value, direction, slope, step)
        evaluations += evaluated
        if found is None:  # no step decreases it: as close to the mode as this precision gets
            return points, gradients, evaluations, True
        candidate, new_value, new_gradient = found
        s, y = candidate - point, new_gradient - gradient
        if float(s @ y) > CURVATURE_EPS * float(y @ y):
            pairs = [*pairs, (s, y)][-max(history, OPTIMISER_HISTORY):]
        change = abs(value - new_value)
        point, value, gradient = candidate, new_value, new_gradient
        points.append(point)
        gradients.append(gradient)
        if change <= tolerance * max(abs(value), 1.0) \
                or float(gradient.abs().max()) <= GRADIENT_TOLERANCE:
            return points, gradients, evaluations, True
    return points, gradients, evaluations, False


def _line_search(potential: Callable, point: torch.Tensor, value: float,
                 direction: torch.Tensor, slope: float, step: float
                 ) -> tuple[tuple[torch.Tensor, float, torch.Tensor] | None, int]:
    """A weak Wolfe step by bisection and doubling (Lewis and Overton 2013): sufficient
    decrease (Armijo) and a slope along ``direction`` risen to ``WOLFE`` times the first,
    so that a valley's long direction is followed in long steps (backtracking alone takes
    ever shorter ones there, and its tiny decreases end L-BFGS early, far from the mode,
    as on kilpisjarvi). Returns the point, its potential and gradient (the last point with
    sufficient decrease if no Wolfe point turns up), and the number of evaluations."""
    low, high, best = 0.0, math.inf, None
    for evaluated in range(1, MAX_HALVINGS + 1):
        candidate = point + step * direction
        new_value, new_gradient = laplace._value_and_grad(potential, candidate)
        if not (math.isfinite(new_value) and torch.isfinite(new_gradient).all()) \
                or new_value > value + ARMIJO * step * slope:
            high = step
        else:
            best = (candidate, new_value, new_gradient)
            if float(new_gradient @ direction) >= WOLFE * slope:
                return best, evaluated
            low = step
        step = (low + high) / 2 if math.isfinite(high) else 2 * low
    return best, MAX_HALVINGS


def _two_loop(gradient: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]
              ) -> torch.Tensor:
    """H g for the L-BFGS inverse Hessian H of ``pairs`` (Nocedal and Wright, Algorithm 7.4)."""
    q = gradient.clone()
    coefficients = []
    for s, y in reversed(pairs):
        rho = 1 / float(s @ y)
        a = rho * float(s @ q)
        q = q - a * y
        coefficients.append((rho, a))
    if pairs:
        s, y = pairs[-1]
        q = q * (float(s @ y) / float(y @ y))
    for (s, y), (rho, a) in zip(pairs, reversed(coefficients)):
        b = rho * float(y @ q)
        q = q + (a - b) * s
    return q


def gaussians(points: list[torch.Tensor], gradients: list[torch.Tensor], history: int
              ) -> list[Gaussian]:
    """The paper's Algorithm 3 (diagonal update) and formula II.2 at every iterate after the
    first: the inverse Hessian from the last ``history`` accepted pairs, centred at the
    iterate's quasi-Newton point x - H g."""
    alpha = torch.ones_like(points[0])
    pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
    result = []
    for index in range(1, len(points)):
        s = points[index] - points[index - 1]
        z = gradients[index] - gradients[index - 1]
        b = float(z @ s)
        if b > CURVATURE_EPS * float(z @ z):
            a = float((z * alpha) @ z)
            c = float((s / alpha) @ s)
            inverse = a / (b * alpha) + z.pow(2) / b - a * s.pow(2) / (b * c * alpha.pow(2))
            if bool((inverse > 0).all()) and bool(torch.isfinite(inverse).all()):
                alpha = 1 / inverse
            pairs = [*pairs, (s, z)][-history:]
        point, gradient = points[index], gradients[index]
        if not pairs:
            beta = point.new_zeros(point.numel(), 0)
            gamma = point.new_zeros(0, 0)
        else:
            S = torch.stack([p[0] for p in pairs], 1)
            Z = torch.stack([p[1] for p in pairs], 1)
            StZ = S.T @ Z
            R = torch.triu(StZ)
            minus_inverse = -torch.linalg.inv(R)
            alpha_z = alpha.sqrt()[:, None] * Z
            block = minus_inverse.T @ (alpha_z.T @ alpha_z + torch.diag(StZ.diagonal())) \
                @ minus_inverse
            zeros = torch.zeros_like(R)
            gamma = torch.cat([torch.cat([zeros, minus_inverse], 1),
                               torch.cat([minus_inverse.T, block], 1)], 0)
            beta = torch.cat([alpha[:, None] * Z, S], 1)
        h_gradient = alpha * gradient + beta @ (gamma @ (beta.T @ gradient))
        gaussian = Gaussian(point - h_gradient, alpha.clone(), beta, gamma)
        if gaussian.valid:
            result.append(gaussian)
    return result


def batch_potential(model, sites: list[laplace.Site], args: tuple, kwargs: dict,
                    potential: Callable, grad: bool = False
                    ) -> Callable[[torch.Tensor], torch.Tensor]:
    """The potential of each row of an ``(n, d)`` tensor: in one trace of the model under a
    plate of n draws where its first evaluation agrees with ``potential`` row by row (as
    Pyro's vectorised particles); else, for a model that does not broadcast over such a
    plate, its run on one point mapped over the rows by ``torch.func.vmap`` (``potential``'s
    ``plain``), where that agrees; else one trace a row; differentiable with ``grad``. After
    its first call its ``rowwise`` says which (True: a row at a time)."""
    from pyro import poutine

    from workbench.report import marginal
    from workbench.report.posterior import log_joint, plate_nesting

    single = poutine.trace(model).get_trace(*args, **kwargs)
    nesting, summed = plate_nesting(single), bool(marginal.enumerated_sites(single))

    def vectorised(points: torch.Tensor) -> torch.Tensor:
        count = points.shape[0]
        values, log_jacobian = {}, 0.0
        for site in sites:
            event = site.transform.domain.event_dim
            pad = nesting - (len(site.shape) - event)
            shape = (count,) + (1,) * pad + tuple(site.shape)
            unconstrained = points[:, site.start:site.stop].reshape(shape)
            values[site.name] = site.transform(unconstrained)
            log_jacobian = log_jacobian + site.transform.log_abs_det_jacobian(
                unconstrained, values[site.name]).reshape(count, -1).sum(-1)
        conditioned = poutine.condition(model, data=values)
        with pyro.plate("_pathfinder_draws", count, dim=-(nesting + 1)):
            trace = poutine.trace(marginal.enumerated(conditioned, nesting + 1) if summed
                                  else conditioned).get_trace(*args, **kwargs)
        log_p = marginal.log_density(trace, "_pathfinder_draws", count) if summed \
            else log_joint(trace, count, nesting)
        return -(log_p + log_jacobian)

    def one_by_one(points: torch.Tensor) -> torch.Tensor:
        if not len(points):
            return points.new_zeros(0)
        return torch.stack([potential(point) for point in points])

    plain = getattr(potential, "plain", None)

    def mapped(points: torch.Tensor) -> torch.Tensor:  # the model run as if on one point
        return torch.func.vmap(plain)(points)

    chosen: list[Callable] = []

    def batched(points: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(grad):
            if chosen:
                try:
                    return chosen[0](points)
                except (RuntimeError, ValueError, NotImplementedError, IndexError):
                    return one_by_one(points)  # a draw the model refuses: inf for it alone
            exact = one_by_one(points[:2])
            for way in (vectorised, mapped) if plain is not None else (vectorised,):
                try:
                    together = way(points)
                    agrees = together.shape == (points.shape[0],) and torch.allclose(
                        together[:2].to(exact.dtype), exact, rtol=1e-4, atol=1e-4,
                        equal_nan=True)
                except (RuntimeError, ValueError, NotImplementedError, IndexError):
                    agrees = False
                if agrees:
                    chosen.append(way)
                    batched.rowwise = False
                    return together
            chosen.append(one_by_one)
            batched.rowwise = True
            return torch.cat([exact, one_by_one(points[2:])])

    batched.rowwise = None
    return batched


def elbo(potentials: Callable, gaussian: Gaussian, draws: int, u: torch.Tensor | None = None
         ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """The ELBO of ``gaussian`` from ``draws`` draws (from ``u`` where given; -inf where any
    draw's density is not finite), with the draws and their log weights log p - log q;
    ``potentials`` evaluates a batch of points."""
    points, log_q = gaussian.sample(draws, u)
    log_p = -potentials(points).to(log_q.dtype)
    log_w = log_p - log_q
    value = float(log_w.mean()) if bool(torch.isfinite(log_w).all()) else -math.inf
    return value, points, log_w


def single_path(potential: Callable, potentials: Callable, start: torch.Tensor, max_iter: int,
                history: int, draws: int) -> Path:
    """Single-path Pathfinder (the paper's Algorithm 1) from ``start``: ``potential`` for
    L-BFGS, ``potentials`` (batched) for the ELBOs. Every iterate's ELBO is estimated from
    the same ``draws`` standard normal draws (common random numbers), so that neighbouring
    iterates differ by their Gaussians rather than by their draws; the ``FINALISTS`` best
    are scored again from ``FINAL_DRAWS`` common draws, and the best of these is the path's
    (a departure: the paper keeps the first maximum, which with a few draws is often an
    iterate whose ELBO estimate was lucky)."""
    points, gradients, evaluations, converged = lbfgs_path(potential, start, max_iter, history)
    u = torch.randn(draws, start.numel(), dtype=start.dtype)
    scored = [(elbo(potentials, gaussian, draws, u)[0], index, gaussian) for index, gaussian
              in enumerate(gaussians(points, gradients, history) if points else [])]
    finalists = sorted((item for item in scored if math.isfinite(item[0])),
                       key=lambda item: item[:2], reverse=True)[:FINALISTS]
    best, best_elbo = None, -math.inf
    u = torch.randn(FINAL_DRAWS, start.numel(), dtype=start.dtype)
    for _, _, gaussian in finalists:
        value = elbo(potentials, gaussian, FINAL_DRAWS, u)[0]
        if value > best_elbo:
            best, best_elbo = gaussian, value
    return Path(best, best_elbo, max(len(points) - 1, 0), evaluations, converged)


def multi_path(potential: Callable, potentials: Callable, starts: list[torch.Tensor],
               max_iter: int, history: int, draws: int, psis_draws: int = PSIS_DRAWS
               ) -> Result:
    """Multi-path Pathfinder (Algorithm 2): a path from each start, ``psis_draws`` draws
    shared among the paths' best Gaussians, Pareto-smoothed importance weights over the pool
    and a resample of it. Where the dimension allows (the dense covariances), a draw's weight
    divides by the equal mixture of the paths' Gaussians, not by its own path's alone (the
    paper's): the balance heuristic (Veach and Guibas 1995), whose weights stay bounded
    wherever some path covers the posterior. The best Gaussian is the one whose ELBO from these
    fresh draws is highest: the path's own estimate, a maximum over its iterates, is biased up."""
    from workbench.report.posterior import psis

    paths = [single_path(potential, potentials, start, max_iter, history, draws)
             for start in starts]
    usable = [path for path in paths if path.best is not None and math.isfinite(path.elbo)]
    if not usable:
        return Result(paths, None, -math.inf, math.inf, None)
    pooled, log_w, fresh = [], [], []
    share = max(psis_draws // len(usable), 1)
    for path in usable:
        value, points, weights = elbo(potentials, path.best, share)
        pooled.append(points)
        log_w.append(weights)
        fresh.append(value)
    index = max(range(len(usable)), key=lambda i: (fresh[i], usable[i].elbo))
    best, best_elbo = usable[index].best, fresh[index]
    points, log_w = torch.cat(pooled), torch.cat(log_w)
    if len(usable) > 1 and points.shape[1] <= MAX_DENSE_DIM:
        log_p = log_w + torch.cat([path.best.log_prob(p) for path, p in zip(usable, pooled)])
        try:
            mixture = torch.stack([path.best.log_prob(points) for path in usable])
            log_w = log_p - (torch.logsumexp(mixture, 0) - math.log(len(usable)))
        except RuntimeError:  # a covariance whose dense form rounds to indefinite
            pass
    owner = torch.cat([torch.full((len(p),), i) for i, p in enumerate(pooled)])
    finite = torch.isfinite(log_w)
    points, log_w, owner = points[finite], log_w[finite], owner[finite.cpu()]
    if log_w.numel() == 0:
        return Result(paths, best, best_elbo, math.inf, None)
    khat, smoothed = psis(log_w)
    weights = torch.softmax(smoothed, 0).to(points.dtype)
    chosen = torch.multinomial(weights, log_w.numel(), replacement=True)
    shares = torch.zeros(len(usable), dtype=weights.dtype).index_add_(0, owner,
                                                                      weights.cpu())
    return Result(paths, best, best_elbo, khat, points[chosen.to(points.device)],
                  _moments(points, weights), several_modes(usable, shares))


def several_modes(paths: list[Path], shares: torch.Tensor) -> bool:
    """Whether two of the ``paths`` sit at separate modes (``SEPARATE``) and each holds at
    least ``MODE_SHARE`` of the weighted draws (``shares``, per path)."""
    held = [path.best for path, share in zip(paths, shares.tolist()) if share >= MODE_SHARE]
    for i, first in enumerate(held):
        for second in held[i + 1:]:
            apart = (first.mean - second.mean).abs()
            if all(float((apart / g.marginal_sds()).max()) > SEPARATE for g in (first, second)):
                return True
    return False


def _moments(points: torch.Tensor, weights: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The weighted draws' mean and covariance, where their effective sample size is at least
    ``MOMENT_ESS`` times the dimension and the covariance is positive definite."""
    dimension = points.shape[1]
    if dimension > MAX_DENSE_DIM or 1 / float(weights.pow(2).sum()) < MOMENT_ESS * dimension:
        return None
    mean = weights @ points
    centred = points - mean
    covariance = (weights[:, None] * centred).T @ centred
    covariance = (covariance + covariance.T) / 2
    if torch.linalg.cholesky_ex(covariance)[1].item() != 0:
        return None
    return mean, covariance


def _cast(value, dtype: torch.dtype):
    """``value`` (tensors in tuples, lists and dicts) with floating tensors in ``dtype``:
    Pathfinder runs in float64 where the model allows, since a float32 log joint of many
    observations rounds off the last digits L-BFGS and the ELBO comparisons need."""
    if torch.is_tensor(value):
        return value.to(dtype) if value.is_floating_point() else value
    if isinstance(value, (tuple, list)):
        return type(value)(_cast(item, dtype) for item in value)
    if isinstance(value, dict):
        return {key: _cast(item, dtype) for key, item in value.items()}
    return value


class PathfinderStart:
    """Mixin for a Gaussian autoguide: ``initialise`` puts it where Pathfinder says.
    The options live in ``pathfinder_options`` (num_paths, max_iter, history, draws)."""

    pathfinder_options: dict = {}

    def initialise(self, *args, **kwargs) -> list[str]:
        """Run multi-path Pathfinder and write its answer into the guide; returns notes for
        the user on what it found."""
        return initialise(self, *args, **self.pathfinder_options, data_kwargs=kwargs)


def initialise(guide, *args, num_paths: int = NUM_PATHS, max_iter: int = MAX_ITER,
               history: int = HISTORY, draws: int = DRAWS, data_kwargs: dict | None = None
               ) -> list[str]:
    """Pathfinder from the guide's start and ``num_paths - 1`` uniform starts; write its
    answer's mean and as much of its covariance as the family holds into ``guide``."""
    sites = laplace.layout(guide)
    answer, notes = approximate(guide, sites, args, data_kwargs or {}, num_paths, max_iter,
                                history, draws)
    if answer is not None:
        mean, covariance, precision_diag = answer
        laplace.write(guide, sites, mean, covariance, precision_diag)
    return notes


def approximate(guide, sites: list[laplace.Site], args: tuple, kwargs: dict,
                num_paths: int = NUM_PATHS, max_iter: int = MAX_ITER, history: int = HISTORY,
                draws: int = DRAWS, first: torch.Tensor | None = None
                ) -> tuple[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None,
                           list[str]]:
    """Multi-path Pathfinder for ``guide``'s model: its answer as (mean, covariance or None
    beyond MAX_DENSE_DIM, precision diagonal) in the guide's dtype, or None, and notes. The
    first path starts at ``first`` (default: the guide's location now)."""
    check_options(num_paths, max_iter, history, draws)
    laplace.check_continuous(guide, args, kwargs, method="pathfinder")
    model = laplace.model_of(guide)  # the sites it enumerates summed out
    if first is None:
        first = laplace.current_loc(guide, sites)
    result = None
    for dtype in dict.fromkeys([torch.float64, first.dtype]):
        wide_args, wide_kwargs = _cast((args, kwargs), dtype)
        try:
            with default_dtype(dtype):
                potential = laplace.potential_fn(model, sites, wide_args, wide_kwargs)
                start = first.to(dtype)
                potential(start)  # a model that holds tensors of its own dtype refuses float64
                starts = [start] + [torch.rand_like(start) * 4 - 2 for _ in range(num_paths - 1)]
                potentials = batch_potential(model, sites, wide_args, wide_kwargs, potential)
                result = multi_path(potential, potentials, starts, max_iter, history, draws)
            break
        except RuntimeError:
            if dtype == first.dtype:
                raise
    guide.pathfinder_result = result
    if result.best is None:
        return None, [f"pathfinder: no path found a Gaussian with a finite ELBO in {num_paths} "
                f"paths ({result.gradient_evaluations} gradient evaluations); the guide keeps "
                "its default start"]
    best = result.best
    dense = best.mean.numel() <= MAX_DENSE_DIM
    if result.moments is not None and khat_trusted(result.khat) and not result.several_modes:
        mean, covariance = result.moments
        precision_diag = torch.linalg.inv(covariance).diagonal()
        source = "the importance-weighted draws' mean and covariance"
    else:
        mean, covariance = best.mean, best.covariance() if dense else None
        precision_diag = best.precision_diagonal()
        source = "the best path's Gaussian" + (
            " (the paths found several modes, which one Gaussian cannot hold)"
            if result.several_modes else "")
    dtype = first.dtype
    answer = (mean.to(dtype), None if covariance is None else covariance.to(dtype),
              precision_diag.to(dtype))
    notes = [f"pathfinder: {num_paths} path{'s' * (num_paths > 1)}, "
             f"{result.gradient_evaluations} gradient evaluations, ELBO {result.elbo:.4g}, "
             f"PSIS k-hat {result.khat:.2f}; the guide starts at {source}"]
    stopped = sum(not path.converged for path in result.paths)
    if stopped:
        notes.append(f"pathfinder: {stopped} of {num_paths} paths stopped before L-BFGS "
                     f"converged (max_iter {max_iter} or a failed line search)")
    if not dense:
        notes.append(f"pathfinder: more than {MAX_DENSE_DIM} unconstrained dimensions, so "
                     "the guide gets the location and the conditional scales only")
    return answer, notes
