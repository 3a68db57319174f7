"""Check the ports against posteriordb's reference posteriors with Pyro's NUTS.

For each posterior: one NUTS chain (pyro.infer.MCMC with NUTS) in float64 on the port, then
per Stan parameter z = |mean - ref mean| / ref sd and r = sd / ref sd, with the chain's
effective sample size. A port is right when every z < 0.15 and 0.85 < r < 1.15, which a
chain of 1,000 draws meets with room for its Monte Carlo error.

The metric (NUTS's inverse mass matrix) is by default the inverse Hessian of the potential
at the posterior mode, in unconstrained space, found on the port itself before sampling and
kept fixed; warm-up adapts the step size. Stan's windowed adaptation, which starts from the
identity (``--adapt``), cannot learn kilpisjarvi's near-singular covariance (its
regularisation swamps a slope variance of 6e-5 at correlation -0.99999) and spends minutes
at the maximum tree depth. The metric changes how fast NUTS mixes, not what it samples.

    python packages/vibench-posteriordb/check_ports.py                # all eight
    python packages/vibench-posteriordb/check_ports.py pdb_garch11    # one (or several)
    python packages/vibench-posteriordb/check_ports.py --warmup 300 --samples 500 pdb_diamonds

It imports the package from beside this file, so it runs without installing it, and prints
one Markdown table per posterior with the wall time of its chain (stdout).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

Z_MAX, R_RANGE = 0.15, (0.85, 1.15)


def main(argv=None) -> int:
    from vibench_posteriordb import reference

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help="posteriors to check (default: all): "
                             f"{', '.join(reference.POSTERIORS)}")
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--adapt", action="store_true",
                        help="Stan's windowed adaptation of a dense metric from the identity, "
                             "instead of the fixed metric from the mode's Hessian")
    parser.add_argument("--starts", type=int, default=4,
                        help="random starts of the mode search, besides the reference mean")
    parser.add_argument("--no-jit", action="store_true",
                        help="no JIT compilation of the potential (default: compiled, 2-4x faster)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--progress", action="store_true", help="show NUTS's progress bar")
    args = parser.parse_args(argv)
    unknown = [name for name in args.names if name not in reference.POSTERIORS]
    if unknown:
        parser.error(f"unknown posterior {unknown[0]!r}; choose from "
                     f"{', '.join(reference.POSTERIORS)}")

    import torch

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(args.threads)
    metric = "dense metric adapted from the identity" if args.adapt else \
        "fixed dense metric from the mode's Hessian"
    print(f"NUTS, 1 chain, {args.warmup} warm-up + {args.samples} draws, {metric}, float64, "
          f"{'eager' if args.no_jit else 'JIT-compiled'} potential, seed {args.seed}, "
          f"{args.threads} torch thread(s)", flush=True)
    failed = [name for name in args.names or reference.POSTERIORS if not check(name, args)]
    print(f"\n{'all ports pass' if not failed else 'outside the bounds: ' + ', '.join(failed)}")
    return 1 if failed else 0


def check(name: str, args) -> bool:
    import pyro
    import torch
    from pyro.infer import MCMC, NUTS
    from pyro.ops.stats import effective_sample_size
    from vibench_posteriordb import plugin, reference

    model = plugin.MODELS[name]()
    data = {key: torch.as_tensor(value) for key, value in
            reference.load_data(model.posterior).items()}
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    start = time.perf_counter()
    options = dict(full_mass=True, jit_compile=not args.no_jit, ignore_jit_warnings=True)
    if args.adapt:
        kernel, initial, note = NUTS(model, **options), None, "random start (init_to_uniform)"
    else:
        initial, inverse_mass, note = laplace(model, data, args.starts)
        kernel = FixedMetricNUTS(model, inverse_mass, adapt_mass_matrix=False, **options)
    mcmc = MCMC(kernel, num_samples=args.samples, warmup_steps=args.warmup, num_chains=1,
                initial_params=initial, disable_progbar=not args.progress)
    mcmc.run(**data)
    seconds = time.perf_counter() - start
    divergences = sum(len(v) for v in mcmc.diagnostics()["divergences"].values())
    ref = model.reference_posterior(**data)
    values = reference.from_sites(site_values(model, data, mcmc.get_samples()), ref["sites"])

    print(f"\n### {name} ({model.posterior}): {seconds:.0f} s, {divergences} divergences\n")
    print(f"NUTS started at the {note}.\n")
    print("| parameter | ref mean | mean | z | ref sd | sd | r | ESS |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    ok = True
    for stan_name, stats in ref["params"].items():
        x = values[stan_name].double()
        mean, sd = float(x.mean()), float(x.std())
        z = abs(mean - stats["mean"]) / stats["sd"]
        r = sd / stats["sd"]
        ess = float(effective_sample_size(x[None, :], chain_dim=0, sample_dim=1))
        miss = z >= Z_MAX or not R_RANGE[0] < r < R_RANGE[1]
        ok = ok and not miss
        print(f"| {stan_name}{' **(miss)**' if miss else ''} | {_num(stats['mean'])} | "
              f"{_num(mean)} | {z:.3f} | {_num(stats['sd'])} | {_num(sd)} | {r:.3f} | "
              f"{ess:.0f} |", flush=True)
    return ok


def laplace(model, data, starts: int = 4):
    """The posterior mode in unconstrained space and the inverse Hessian of the potential
    there (sites in sorted order, as NUTS packs a dense metric), with a line saying where
    the mode search started.

    The mode is the lowest found from the reference posterior's mean and from ``starts``
    random points (init_to_uniform). The hidden Markov model has local modes (one with its
    second state unused, 62 nats above the main one) where most random starts end; the
    reference mean only adds a candidate, the potential picks the winner, and NUTS then
    samples the port's own posterior whatever the start.
    """
    import pyro
    import torch
    from pyro.infer.mcmc.util import initialize_model

    init, potential_fn, transforms, _ = initialize_model(model, model_kwargs=data)
    names = sorted(init)
    shapes = [init[name].shape for name in names]
    sizes = [init[name].numel() for name in names]

    def unpack(flat):
        return {name: part.reshape(shape) for name, part, shape in
                zip(names, flat.split(sizes), shapes)}

    def potential(flat):
        return potential_fn(unpack(flat))

    def pack(unconstrained):
        return torch.cat([unconstrained[name].reshape(-1) for name in names]).detach()

    params = model.reference_posterior(**data)["params"]
    means = {name: stats["mean"] for name, stats in params.items()}
    at_mean = model.latent_values(means, torch.get_default_dtype())
    candidates = {"the reference mean": pack({k: transforms[k](v) for k, v in at_mean.items()})}
    for i in range(starts):
        init, _, _, _ = initialize_model(model, model_kwargs=data)  # a fresh init_to_uniform
        candidates[f"random start {i + 1}"] = pack(init)
    modes = {}
    with pyro.validation_enabled(False):  # a trial point may overflow: it is then refused
        for start, x in candidates.items():
            x = _minimise(potential, x)
            modes[start] = float(potential(x)), x
    start = min(modes, key=lambda k: modes[k][0])
    x = modes[start][1]
    others = sorted({round(value, 2) for value, _ in modes.values()} - {round(modes[start][0], 2)})
    if others:
        note = (f"mode (potential {modes[start][0]:.2f}) found from {start}; other starts "
                f"ended at {', '.join(f'{v:.2f}' for v in others)}")
    else:
        note = (f"mode (potential {modes[start][0]:.2f}), where every start ended (the "
                f"reference mean and {starts} random)")
    hessian = torch.autograd.functional.hessian(potential, x)
    hessian = (hessian + hessian.T) / 2
    values, vectors = torch.linalg.eigh(hessian)
    values = values.clamp(min=values.abs().max() * 1e-12)  # keep it positive definite
    inverse = (vectors / values) @ vectors.T
    return unpack(x), {tuple(names): (inverse + inverse.T) / 2}, note


def _minimise(f, x, iterations: int = 500):
    """Levenberg-Marquardt with exact Hessians (at most a few dozen dimensions here): Newton
    steps, damped towards scaled gradient steps until they lower f, so that it neither
    overshoots far from the mode nor stalls on near-singular curvature near it."""
    import torch
    from torch.autograd.functional import hessian, jacobian

    value, damping = f(x), 1e-3
    for _ in range(iterations):
        gradient, curvature = jacobian(f, x), hessian(f, x)
        scale = torch.diag(curvature.diagonal().abs().clamp(min=1e-12))
        while True:
            try:
                factor = torch.linalg.cholesky(curvature + damping * scale)
                trial = x - torch.cholesky_solve(gradient.unsqueeze(-1), factor).squeeze(-1)
                trial_value = f(trial)
                if torch.isfinite(trial_value) and trial_value <= value:
                    break
            except (RuntimeError, ValueError):  # not positive definite, or outside the support
                pass
            damping *= 10
            if damping > 1e15:
                return x
        done = value - trial_value <= 1e-12 * (1 + abs(float(value)))
        x, value, damping = trial, trial_value, max(damping / 10, 1e-12)
        if done:
            break
    return x


def _fixed_metric_nuts():
    from pyro.infer import NUTS

    class FixedMetricNUTS(NUTS):
        """NUTS with a given inverse mass matrix (not adapted); the step size adapts."""

        def __init__(self, model, inverse_mass_matrix, **kwargs):
            super().__init__(model, **kwargs)
            self._given_inverse_mass = inverse_mass_matrix

        def _initialize_adapter(self):
            super()._initialize_adapter()
            self.mass_matrix_adapter.inverse_mass_matrix = self._given_inverse_mass
            if self._adapter.adapt_step_size:  # a reasonable step size for this metric
                self._adapter.reset_step_size_adaptation(self._initial_params)

    return FixedMetricNUTS


def FixedMetricNUTS(model, inverse_mass_matrix, **kwargs):  # noqa: N802 (a class, made lazily)
    return _fixed_metric_nuts()(model, inverse_mass_matrix, **kwargs)


def site_values(model, data, samples) -> dict:
    """Every latent and deterministic site's value at each posterior draw, from one trace of
    the model conditioned on the draws in a plate left of its own plates."""
    import pyro
    from pyro import poutine
    from pyro.poutine.util import site_is_subsample

    n = len(next(iter(samples.values())))
    first = {site: value[0] for site, value in samples.items()}
    trace = poutine.trace(poutine.condition(model, first)).get_trace(**data)
    nesting = max((-frame.dim for site in trace.nodes.values() if site["type"] == "sample"
                   for frame in site["cond_indep_stack"]), default=0)
    shapes = {name: site["value"].shape for name, site in trace.nodes.items()
              if site["type"] == "sample" and not site_is_subsample(site)
              and (name in samples or site.get("infer", {}).get("_deterministic"))}
    batched = {site: value.reshape((n,) + (1,) * nesting + value.shape[1:])
               for site, value in samples.items()}
    with pyro.plate("draws", n, dim=-nesting - 1):
        trace = poutine.trace(poutine.condition(model, batched)).get_trace(**data)
    return {name: trace.nodes[name]["value"].reshape((n,) + shape)
            for name, shape in shapes.items()}


def _num(x: float) -> str:
    return f"{x:.4g}" if x == 0 or 1e-3 <= abs(x) < 1e5 else f"{x:.3e}"


if __name__ == "__main__":
    sys.exit(main())
