"""Time to a trustworthy answer: vibench's automatic pipeline against NumPyro's NUTS, whole
process each side, alternated, each scored against the posterior's reference.

Per posterior and round, each side in a fresh process (the order turns each round):

- **vibench**: ``vibench run RECIPE --set guide=auto --threads 1 --out DIR``, the recipe as
  shipped (the default loggers: TensorBoard, with parameter summaries every 500 steps);
  max z and min/max r from its summary.json's ``reference`` section.
- **NUTS**: this script with ``--nuts NAME``: NumPyro's NUTS, 4 chains x (1000 warm-up + 1000
  draws) one after another (``chain_method="sequential"``), in float64 (``enable_x64``: the
  posteriordb references are Stan's, in double precision), one XLA thread; its draws' means and
  sds scored with the same code as vibench's (``workbench.report.reference.compare``).

Before any timing, each NumPyro port's log joint is checked against vibench's Pyro model's at
shared points (reference draws, in the model's constrained space, both float64): the two must
differ by one constant (a flat prior's missing normaliser is allowed) to 1e-6. A port that
fails is reported and not timed.

The ports: posteriordb's kilpisjarvi, earnings, nes, diamonds, garch11, arma11, gauss_mix and
hmm_drive (written here, from the Stan programs); the hard suite's hier_centred, latent_gp and
hier_logistic (the plain-Pyro hierarchical logistic regression;
packages/vibench-hardcases/make_references.py's ports, which made their references) and its
analytic targets funnel10, banana, mixture2 and student_t (written here, from their maths).
A posterior in ``MISSING`` has no port yet and is listed as a miss.

    pip install -e '.[bench]' -e packages/vibench-posteriordb -e packages/vibench-hardcases
    python benchmarks/nuts.py [--posteriors kilpisjarvi,garch11] [--rounds 3] [--quick]

Each side's wall time and CPU time (user + system, the process and its children) are
recorded with the load average as it began: on a shared machine the load stretches the wall
time of each side differently, its CPU time much less, so the target (vibench at most a third
of NUTS, and good) is read off the CPU ratio.

``--one-core`` pins the script to one CPU core, and so both sides and all their threads and
children: NumPyro's process, one XLA thread or not, spends 1.2-1.4 s of CPU a wall second on a
second core where it has one (JAX's own threads), vibench one, so on a multi-core machine the
wall ratio and the CPU ratio part; on one core each side's wall time is what it needs there.

``--quick``: one round, NUTS 2 chains x (500 + 500) (not the comparison the target names; the
table says so).

The compile cache: a pipeline's fits load their compiled steps where a package is cached, and
a run that finds none trains eagerly while a child process packages the step for the next run
(``workbench.compile.background``). After each vibench run the script waits for such a child
to finish, so that none runs beside the next side's timing (its CPU time is not the run's).
``--warm`` first runs vibench untimed on each posterior until a run starts no child (at most
three: a refit's step is packaged by the run after), so the rounds time later runs of a model;
``--cold`` gives every vibench run an empty cache, as a new model's first run; without either,
the cache is as it is (the first round may be cold, the rest warm).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PDB_RECIPES = REPO / "packages" / "vibench-posteriordb" / "recipes"
HARD = REPO / "packages" / "vibench-hardcases"
# name -> (vibench model name, recipe); the model names are the packages' registrations
CASES = {
    "kilpisjarvi": ("pdb_kilpisjarvi", PDB_RECIPES / "pdb_kilpisjarvi.yaml"),
    "earnings": ("pdb_earnings", PDB_RECIPES / "pdb_earnings.yaml"),
    "nes": ("pdb_nes", PDB_RECIPES / "pdb_nes.yaml"),
    "diamonds": ("pdb_diamonds", PDB_RECIPES / "pdb_diamonds.yaml"),
    "garch11": ("pdb_garch11", PDB_RECIPES / "pdb_garch11.yaml"),
    "arma11": ("pdb_arma11", PDB_RECIPES / "pdb_arma11.yaml"),
    "gauss_mix": ("pdb_gauss_mix", PDB_RECIPES / "pdb_gauss_mix.yaml"),
    "hmm_drive": ("pdb_hmm_drive", PDB_RECIPES / "pdb_hmm_drive.yaml"),
    "hier_centred": ("hard_hier_centred", HARD / "recipes" / "hard_hier_centred.yaml"),
    "latent_gp": ("hard_latent_gp", HARD / "recipes" / "hard_latent_gp.yaml"),
    "hier_logistic": ("hard_hier_logistic", HARD / "recipes" / "hard_hier_logistic.yaml"),
    "funnel10": ("hard_funnel10", HARD / "recipes" / "hard_funnel10.yaml"),
    "banana": ("hard_banana", HARD / "recipes" / "hard_banana.yaml"),
    "mixture2": ("hard_mixture2", HARD / "recipes" / "hard_mixture2.yaml"),
    "student_t": ("hard_student_t", HARD / "recipes" / "hard_student_t.yaml"),
}
# the hard suite's analytic targets, ported here from their maths (models.py's docstrings)
ANALYTIC = ("funnel10", "banana", "mixture2", "student_t")
REAL = ("hier_centred", "latent_gp", "hier_logistic")  # make_references.py's NUTS references
HARD_CASES = (*REAL, *ANALYTIC)
MISSING: dict[str, str] = {}  # posteriors with no port yet, and why


# ------------------------------------------------------------------------------------------
# the NumPyro ports (posteriordb's, from the Stan programs; the hard suite's are reused)


def numpyro_port(name: str):
    """The NumPyro model of ``name`` and its data (jax-ready) -> (model, kwargs)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    if name in REAL:
        sys.path.insert(0, str(HARD))
        import make_references

        data = hard_data(name)
        return make_references.numpyro_model(name, "centred"), data
    if name in ANALYTIC:
        return analytic_port(name), {k: jnp.asarray(v) for k, v in hard_data(name).items()}
    data = {k: jnp.asarray(v) for k, v in pdb_data(name).items()}

    def flat(shape=()):  # Stan's implicit flat prior
        return dist.ImproperUniform(dist.constraints.real, (), shape)

    def flat_positive():
        return dist.ImproperUniform(dist.constraints.positive, (), ())

    def flat_unit():
        return dist.ImproperUniform(dist.constraints.unit_interval, (), ())

    def kilpisjarvi(x, y, pmualpha, psalpha, pmubeta, psbeta, **_):
        alpha = numpyro.sample("alpha", dist.Normal(pmualpha, psalpha))
        beta = numpyro.sample("beta", dist.Normal(pmubeta, psbeta))
        sigma = numpyro.sample("sigma", flat_positive())
        numpyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)

    def regression(design, y, size):
        beta = numpyro.sample("beta", flat((size,)))
        sigma = numpyro.sample("sigma", flat_positive())
        numpyro.sample("obs", dist.Normal(design @ beta, sigma), obs=y)

    def earnings(earn, height, male, **_):
        regression(jnp.stack([jnp.ones_like(height), height, male, height * male], -1),
                   jnp.log(earn), 4)

    def nes(partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete, **_):
        age = jnp.round(age_discrete)
        regression(jnp.stack([jnp.ones_like(partyid7), real_ideo, race_adj, 1.0 * (age == 2),
                              1.0 * (age == 3), 1.0 * (age == 4), educ1, gender, income], -1),
                   partyid7, 9)

    def diamonds(Y, X, **_):
        Xc = X[:, 1:] - X[:, 1:].mean(0)
        b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([Xc.shape[1]]).to_event(1))
        intercept = numpyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
        sigma = numpyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0)))
        numpyro.sample("Y", dist.Normal(intercept + Xc @ b, sigma), obs=Y)

    def garch11(y, sigma1, **_):
        import jax

        mu = numpyro.sample("mu", flat())
        alpha0 = numpyro.sample("alpha0", flat_positive())
        alpha1 = numpyro.sample("alpha1", flat_unit())
        unit = numpyro.sample("beta1_unit", flat_unit())
        beta1 = numpyro.deterministic("beta1", unit * (1 - alpha1))
        numpyro.factor("beta1_jacobian", jnp.log1p(-alpha1))  # as the Pyro port: Stan's density

        def recursion(variance, previous_y):
            variance = alpha0 + alpha1 * (previous_y - mu) ** 2 + beta1 * variance
            return variance, variance

        _, rest = jax.lax.scan(recursion, sigma1 ** 2, y[:-1])
        variance = jnp.concatenate([jnp.reshape(sigma1 ** 2, (1,)), rest])
        numpyro.sample("y", dist.Normal(mu, jnp.sqrt(variance)), obs=y)

    def arma11(y, **_):
        import jax

        mu = numpyro.sample("mu", dist.Normal(0.0, 10.0))
        phi = numpyro.sample("phi", dist.Normal(0.0, 2.0))
        theta = numpyro.sample("theta", dist.Normal(0.0, 2.0))
        sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
        previous = jnp.concatenate([jnp.reshape(mu, (1,)), y[:-1]])

        def recursion(error, surprise):  # err[t] = y[t] - mu - phi y[t-1] - theta err[t-1]
            error = surprise - theta * error
            return error, error

        _, errors = jax.lax.scan(recursion, jnp.zeros(()), y - mu - phi * previous)
        numpyro.sample("y", dist.Normal(y - errors, sigma), obs=y)

    def gauss_mix(y, **_):
        mu = numpyro.sample("mu", dist.ImproperUniform(dist.constraints.ordered_vector, (),
                                                       (2,)))
        numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
        theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
        numpyro.sample("y", dist.MixtureSameFamily(
            dist.Categorical(probs=jnp.stack([theta, 1 - theta])), dist.Normal(mu, sigma)),
            obs=y)

    def hmm_drive(u, v, alpha, **_):
        import jax

        theta1 = numpyro.sample("theta1", dist.Dirichlet(alpha[0]))  # transitions from state 1
        theta2 = numpyro.sample("theta2", dist.Dirichlet(alpha[1]))
        ordered = dist.constraints.positive_ordered_vector
        phi = numpyro.sample("phi", dist.ImproperUniform(ordered, (), (2,)))
        lam = numpyro.sample("lambda", dist.ImproperUniform(ordered, (), (2,)))
        prior = dist.Normal(jnp.array([0.0, 3.0]), 1.0)
        numpyro.factor("phi_prior", prior.log_prob(phi).sum())
        numpyro.factor("lambda_prior", prior.log_prob(lam).sum())
        # emission[t, k] = exponential_lpdf(u[t] | phi[k]) + exponential_lpdf(v[t] | lambda[k])
        emission = (jnp.log(phi) - phi * u[:, None]) + (jnp.log(lam) - lam * v[:, None])
        log_theta = jnp.log(jnp.stack([theta1, theta2]))  # [j, k]: from j to k

        def forward(gamma, now):  # Stan's forward algorithm, one observation a step
            gamma = jax.nn.logsumexp(gamma[:, None] + log_theta, axis=0) + now
            return gamma, None

        gamma, _ = jax.lax.scan(forward, emission[0], emission[1:])
        numpyro.factor("forward", jax.nn.logsumexp(gamma))

    models = {"kilpisjarvi": kilpisjarvi, "earnings": earnings, "nes": nes,
              "diamonds": diamonds, "garch11": garch11, "arma11": arma11,
              "gauss_mix": gauss_mix, "hmm_drive": hmm_drive}
    return models[name], data


def analytic_port(name: str):
    """The NumPyro model of one of the hard suite's analytic targets, the same density as its
    Pyro model (vibench_hardcases/models.py)."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    def funnel10(v_scale, dim):
        v = numpyro.sample("v", dist.Normal(0.0, v_scale))
        with numpyro.plate("dims", int(dim) - 1):
            numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)))

    def banana(sigma1, b):
        x1 = numpyro.sample("x1", dist.Normal(0.0, sigma1))
        numpyro.sample("x2", dist.Normal(-b * (x1 ** 2 - sigma1 ** 2), 1.0))

    def mixture2(y, prior_scale, weights, offsets, covs):
        theta = numpyro.sample("theta", dist.Normal(jnp.zeros_like(y), prior_scale).to_event(1))
        numpyro.sample("y", dist.MixtureSameFamily(
            dist.Categorical(probs=weights),
            dist.MultivariateNormal(theta[None, :] + offsets, covariance_matrix=covs)), obs=y)

    def student_t(df, loc, scale):
        numpyro.sample("x", dist.MultivariateStudentT(df, loc, jnp.linalg.cholesky(scale)))

    return {"funnel10": funnel10, "banana": banana, "mixture2": mixture2,
            "student_t": student_t}[name]


def pdb_data(name: str) -> dict:
    from vibench_posteriordb import reference

    return reference.load_data(reference.POSTERIORS[CASES[name][0]])


def hard_data(name: str) -> dict:
    import numpy as np
    from vibench_hardcases import reference

    data = dict(reference.load_data(reference.POSTERIORS[CASES[name][0]]))
    if name == "funnel10":
        data["dim"] = int(data["dim"])
    if name == "hier_centred":
        data["J"], data["group"] = int(data["J"]), np.asarray(data["group"], dtype=np.int32)
    return data


# ------------------------------------------------------------------------------------------
# the ports against vibench's models, at shared points


def reference_of(name: str) -> dict:
    """The reference posterior (params, sites) as vibench's model gives it."""
    model = vibench_model(name)
    data = hard_data(name) if name in HARD_CASES else pdb_data(name)
    return model.reference_posterior(**data)


def vibench_model(name: str):
    if name in HARD_CASES:
        from vibench_hardcases.plugin import MODELS
    else:
        from vibench_posteriordb.plugin import MODELS
    return MODELS[CASES[name][0]]()


def check_port(name: str, points: int = 5) -> dict:
    """vibench's log joint (float64) minus the port's at ``points`` reference draws: the
    constant between them and the largest deviation from it."""
    import jax
    import numpy as np

    jax.config.update("jax_enable_x64", True)  # the ports' densities in float64, as the models'
    if name in REAL:
        sys.path.insert(0, str(HARD))
        import make_references
        from vibench_hardcases import reference

        draws = reference.load_draws(reference.POSTERIORS[CASES[name][0]])
        rows = np.linspace(0, len(next(iter(draws.values()))) - 1, points).astype(int)
        at = [{k: float(v[i]) for k, v in draws.items()} for i in rows]
        found = make_references.port_checks(name, hard_data(name), at)["centred_port"]
        return {"constant": found["constant"], "deviation": found["max_abs_deviation"]}
    first, second = port_log_densities(name, points)
    diff = np.array(first) - np.array(second)
    return {"constant": float(diff.mean()),
            "deviation": float(np.abs(diff - diff.mean()).max())}


def port_log_densities(name: str, points: int) -> tuple[list[float], list[float]]:
    """Both log joints at ``points`` reference draws of a posteriordb posterior or an
    analytic target, as vibench's model's latent values (the port's sites are the same)."""
    import jax
    import numpy as np
    import torch
    from numpyro.infer.util import log_density
    from pyro import poutine

    jax.config.update("jax_enable_x64", True)
    model = vibench_model(name)
    if name in ANALYTIC:
        from vibench_hardcases import reference

        draws, data = reference.load_draws(reference.POSTERIORS[CASES[name][0]]), hard_data(name)

        def latent(row: dict) -> dict:
            return reference.to_sites(row, dtype=torch.float64)
    else:
        from vibench_posteriordb import reference

        draws, data = reference.load_draws(model.posterior), pdb_data(name)

        def latent(row: dict) -> dict:
            return model.latent_values(row, dtype=torch.float64)
    rows = np.linspace(0, len(next(iter(draws.values()))) - 1, points).astype(int)
    tensors = {k: v if isinstance(v, int) else torch.as_tensor(v, dtype=torch.float64)
               for k, v in data.items()}
    port, jdata = numpyro_port(name)
    first, second = [], []
    for i in rows:
        values = latent({k: np.float64(v[i]) for k, v in draws.items()})
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(**tensors)
        first.append(float(trace.log_prob_sum()))
        jvalues = {k: np.asarray(v.numpy()) for k, v in values.items()}
        second.append(float(log_density(port, (), jdata, jvalues)[0]))
    return first, second


# ------------------------------------------------------------------------------------------
# each side, in its own process


def nuts_child(name: str, chains: int, warmup: int, draws: int) -> None:
    """Run NUTS on ``name`` and print its score as one JSON line (the ``--nuts`` process)."""
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1")
    import jax
    import numpy as np
    import numpyro
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    model, data = numpyro_port(name)
    mcmc = MCMC(NUTS(model), num_warmup=warmup, num_samples=draws, num_chains=chains,
                chain_method="sequential", progress_bar=False)
    mcmc.run(jax.random.PRNGKey(0), extra_fields=("diverging",), **data)
    samples = {k: np.asarray(v) for k, v in mcmc.get_samples().items()}
    moments = {site: {"mean": value.mean(0).tolist(), "std": value.std(0, ddof=1).tolist()}
               for site, value in samples.items()}
    print(json.dumps({**score(name, moments),
                      "divergences": int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())}))


def score(name: str, moments: dict) -> dict:
    """max z, min r, max r and the verdict, by vibench's own reference scoring."""
    from workbench.report.reference import compare

    ref = reference_of(name)
    result = compare(dict(ref["params"]), dict(ref["sites"]), moments)
    return {k: result[k] for k in ("max_z", "min_r", "max_r", "good")}


def timed(command: list[str], env: dict) -> tuple[dict, subprocess.CompletedProcess]:
    """The command's wall and CPU seconds (user + system of it and its children: the load
    stretches the wall time far more than the CPU time) and the load average as it began."""
    load = os.getloadavg()[0]
    start, used = time.perf_counter(), children_cpu()
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    return {"wall": time.perf_counter() - start, "cpu": children_cpu() - used,
            "load": load}, result


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_vibench(name: str, out: Path, env: dict, cold: bool = False) -> dict:
    vibench = shutil.which("vibench") or f"{sys.executable} -m workbench"
    run_dir = out / f"{name}-{time.time_ns()}"
    if cold:
        env = {**env, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="cold_cache_")}
    times, result = timed([*vibench.split(), "run", str(CASES[name][1]), "--set", "guide=auto",
                           "--threads", "1", "--out", str(run_dir)], env)
    times["child"] = "in the background" in result.stderr  # a step packaged for later runs
    wait_for_background(env)
    if cold:
        shutil.rmtree(env["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)
    summary_path = run_dir / "summary.json"
    if not summary_path.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**times, "failed": f"exit {result.returncode}: {tail[0]}"}
    ref = json.loads(summary_path.read_text()).get("reference") or {}
    return {**times, **{k: ref.get(k) for k in ("max_z", "min_r", "max_r", "good")}}


def wait_for_background(env: dict) -> None:
    """Wait until no child compiles a step for later runs in ``env``'s cache, nor waits for
    its turn to (the waiting slots first: a waiting child takes the folder's lock before it
    lets its slot go)."""
    import fcntl

    from workbench.compile import background, package_cache

    folder = Path(env.get("TORCHINDUCTOR_CACHE_DIR") or package_cache.cache_dir())
    for name in (*background.WAITING, background.ANY):
        lock = folder / package_cache.FOLDER / f"{name}{background.LOCK}"
        if lock.exists():
            with open(lock, "rb") as handle:
                fcntl.flock(handle, fcntl.LOCK_EX)


def warm_up(name: str, out: Path, env: dict) -> int:
    """Untimed vibench runs until one starts no background compile (at most three); how many."""
    for i in range(1, 4):
        if not run_vibench(name, out, env)["child"]:
            return i
    return 3


def run_nuts(name: str, quick: bool, env: dict) -> dict:
    sizes = ["2", "500", "500"] if quick else ["4", "1000", "1000"]
    times, result = timed([sys.executable, __file__, "--nuts", name, *sizes], env)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        return {**times, "failed": f"exit {result.returncode}: {tail[0]}"}
    return {**times, **json.loads(result.stdout.strip().splitlines()[-1])}


# ------------------------------------------------------------------------------------------
# the table


def _accuracy(side: dict) -> str:
    if "failed" in side:
        return f"failed: {side['failed']}"
    if side.get("max_z") is None:
        return "no reference section"
    verdict = {True: "good", False: "off"}.get(side.get("good"), "?")
    return (f"{side['max_z']:.2f} / {side['min_r']:.2f}-{side['max_r']:.2f} ({verdict})")


def _span(xs: list[float]) -> str:
    return f"{min(xs):.0f}-{max(xs):.0f}" if len(xs) > 1 else f"{xs[0]:.0f}"


def row(name: str, sides: dict[str, list[dict]]) -> str:
    v = [s["wall"] for s in sides["vibench"]]
    n = [s["wall"] for s in sides["nuts"]]
    ratios = [a / b for a, b in zip(v, n)]
    cpu = [a["cpu"] / b["cpu"] for a, b in zip(sides["vibench"], sides["nuts"])]
    # by CPU: on a shared machine a side stopped or crowded for minutes stretches its wall time
    met = all(r <= 1 / 3 for r in cpu) and all(s.get("good") for s in sides["vibench"])
    divergences = sides["nuts"][-1].get("divergences", "-")
    return (f"| {name} | {_span(v)} | {_span(n)} | {min(ratios):.2f}-{max(ratios):.2f}x | "
            f"{min(cpu):.2f}-{max(cpu):.2f}x | "
            f"{_accuracy(sides['vibench'][-1])} | {_accuracy(sides['nuts'][-1])} | "
            f"{divergences} | {'yes' if met else 'no'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--posteriors", default=",".join(CASES),
                        help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="one round, NUTS 2 chains x (500 + 500)")
    parser.add_argument("--out", type=Path, default=None, help="vibench's run directories")
    cache = parser.add_mutually_exclusive_group()
    cache.add_argument("--warm", action="store_true",
                       help="first run vibench untimed until its compiled steps are cached")
    cache.add_argument("--cold", action="store_true",
                       help="every vibench run with an empty compile cache")
    parser.add_argument("--one-core", action="store_true",
                        help="pin the script, and so both sides, to one CPU core")
    parser.add_argument("--nuts", nargs=4, metavar=("NAME", "CHAINS", "WARMUP", "DRAWS"),
                        help=argparse.SUPPRESS)  # the NUTS side's own process
    args = parser.parse_args(argv)
    if args.nuts:
        nuts_child(args.nuts[0], *map(int, args.nuts[1:]))
        return 0
    names = args.posteriors.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown posterior {unknown[0]!r}; choose from {', '.join(CASES)}")
    rounds = 1 if args.quick else args.rounds
    if args.one_core:  # inherited by every child: each side's process, its threads, its children
        os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    out = args.out or Path(tempfile.mkdtemp(prefix="nuts_bench_"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lines = []
    for name in names:
        check = check_port(name)
        print(f"{name}: port vs vibench's log joint at 5 reference draws: constant "
              f"{check['constant']:.2e}, max deviation {check['deviation']:.2e}", flush=True)
        if check["deviation"] > 1e-6:
            lines.append(f"| {name} | port disagrees with vibench's model: not timed ||||||||")
            continue
        if args.warm:
            print(f"  warmed up: {warm_up(name, out, env)} untimed vibench run(s)", flush=True)
        sides: dict[str, list[dict]] = {"vibench": [], "nuts": []}
        for i in range(rounds):
            for side in (("vibench", "nuts") if i % 2 == 0 else ("nuts", "vibench")):
                found = (run_vibench(name, out, env, args.cold) if side == "vibench"
                         else run_nuts(name, args.quick, env))
                sides[side].append(found)
                extra = (f", {found['divergences']} divergences" if "divergences" in found
                         else "")
                if found.get("child"):
                    extra += ", a step packaged in the background after it"
                print(f"  round {i + 1} {side}: {found['wall']:.1f} s, CPU {found['cpu']:.1f} s, "
                      f"load {found['load']:.1f}, {_accuracy(found)}{extra}", flush=True)
        lines.append(row(name, sides))
    nuts = "2 chains x (500 + 500), --quick" if args.quick else "4 chains x (1000 + 1000)"
    cache = "warm" if args.warm else "empty each run" if args.cold else "as found"
    cores = ", both sides pinned to one core" if args.one_core else ""
    print(f"\nwhole process each side, {rounds} round(s) alternated; NUTS {nuts}, sequential, "
          f"float64; vibench --set guide=auto --threads 1, compile cache {cache}{cores}\n")
    print("| posterior | vibench s | NUTS s | vibench/NUTS | CPU vibench/NUTS | "
          "vibench max z / r | NUTS max z / r | NUTS divergences | target met (CPU <= 1/3, good) |")
    print("|---|---:|---:|---:|---:|---|---|---:|---|")
    print("\n".join(lines))
    for what, why in MISSING.items():
        print(f"| {what} | not run: {why} ||||||||")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
