"""Make the hard posteriors' data, reference draws and reference summaries (not imported at
run time; vibench reads only the files this writes).

    python make_references.py data [NAME ...]   # synthetic data.json of the real models
    python make_references.py analytic                # funnel10, banana, mixture2, student_t
    nice -n 19 python make_references.py nuts hier_centred --param noncentred
    nice -n 19 python make_references.py nuts latent_gp --param centred --target-accept 0.95
    nice -n 19 python make_references.py nuts hier_logistic --param noncentred

``analytic`` writes, per target, 100,000 exact i.i.d. draws (numpy, fixed seed, float32 in
draws.npz), reference.json (mean and sd analytic; 5/50/95 % quantiles analytic or by 1-d
quadrature and root finding; the draws' own moments beside them) and info.json (how, and the
check of the Pyro model's log density against the analytic one).

``nuts`` runs NumPyro's NUTS on this file's own NumPyro port of a real model (8 chains run one
after another, 2,000 warm-up and 5,000 draws each by default) in float64, and writes the run's
diagnostics (rank-normalised split R-hat, bulk and tail ESS by ArviZ; divergences, step sizes
and tree sizes per chain) to ``nuts_runs/<name>-<param>-<settings>.json`` beside the
posterior's files, with the check of the port's log density against the Pyro model's. With
``--write`` (only when the run passes: R-hat < 1.01, bulk ESS > 4,000, no divergence) its
draws become the reference: draws.npz, reference.json and info.json. The centred and the
non-centred port sample the same posterior (the non-centred one in other coordinates, with
alpha or f as deterministic sites); which run became the reference, and what the other said,
is in info.json.

Needs numpy, scipy, torch and pyro (the Pyro models), and for ``nuts`` numpyro, jax and arviz.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
DATA = HERE / "vibench_hardcases" / "data"

N_EXACT = 100_000  # exact draws per analytic target
QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}

# The analytic targets' constants (their data.json) and the seeds of their exact draws.
FUNNEL = {"v_scale": 3.0, "dim": 10}
BANANA = {"sigma1": 10.0, "b": 0.1}
MIXTURE = {"y": [0.0, 0.0], "prior_scale": 5.0, "weights": [0.7, 0.3],
           "offsets": [[4.0, 2.0], [-4.0, -2.0]],
           "covs": [[[1.0, 0.5], [0.5, 1.0]], [[0.25, -0.1], [-0.1, 0.25]]]}
_T_SCALES = [1.0, 2.0, 0.5, 1.0]
STUDENT = {"df": 3.0, "loc": [0.0, 1.0, -1.0, 2.0],
           # diag(s) R diag(s) with R[i, j] = 0.7^|i - j|: neighbours correlated 0.7
           "scale": [[round(_T_SCALES[i] * _T_SCALES[j] * 0.7 ** abs(i - j), 10) for j in range(4)]
                     for i in range(4)]}
SEEDS = {"funnel10": 101, "banana": 102, "mixture2": 103, "student_t": 104,
         "hier_centred": 201, "latent_gp": 202, "hier_logistic": 203}
REAL = ("hier_centred", "latent_gp", "hier_logistic")  # the models whose references are NUTS's


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    data = sub.add_parser("data", help="write the real models' synthetic data.json")
    data.add_argument("names", nargs="*", metavar="NAME",
                      help=f"of {', '.join(REAL)} (default: all)")
    sub.add_parser("analytic", help="write the analytic targets' files")
    nuts = sub.add_parser("nuts", help="a NumPyro NUTS reference run of a real model")
    nuts.add_argument("name", choices=REAL)
    nuts.add_argument("--param", choices=["centred", "noncentred"], default="centred")
    nuts.add_argument("--chains", type=int, default=8)
    nuts.add_argument("--warmup", type=int, default=2000)
    nuts.add_argument("--samples", type=int, default=5000)
    nuts.add_argument("--target-accept", type=float, default=0.95)
    nuts.add_argument("--max-tree-depth", type=int, default=10)
    nuts.add_argument("--dense", action="store_true", help="a dense mass matrix (default diagonal)")
    nuts.add_argument("--seed", type=int, default=0)
    nuts.add_argument("--write", action="store_true",
                      help="make this run the reference (refused unless it passes)")
    info = sub.add_parser("info", help="rewrite a real model's info.json from its data "
                                       "section, its reference run and its other runs")
    info.add_argument("name", choices=REAL)
    args = parser.parse_args(argv)
    if args.command == "data":
        unknown = [name for name in args.names if name not in REAL]
        if unknown:
            parser.error(f"no real model {unknown[0]!r}; choose from {', '.join(REAL)}")
        for name in args.names or REAL:
            {"hier_centred": write_hier_centred_data, "latent_gp": write_latent_gp_data,
             "hier_logistic": write_hier_logistic_data}[name]()
    elif args.command == "analytic":
        for name in ("funnel10", "banana", "mixture2", "student_t"):
            write_analytic(name)
    elif args.command == "info":
        write_nuts_info(args.name)
    else:
        run_nuts(args)
    return 0


# ------------------------------------------------------------------------------------------
# files


def write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=1) + "\n", encoding="utf-8")


def write_data_json(path: Path, content: dict) -> None:
    """data.json with one line per array."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in content.items()]
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def write_draws(folder: Path, draws: dict) -> None:
    """One float32 array per parameter name, compressed."""
    import numpy as np

    np.savez_compressed(folder / "draws.npz",
                        **{name: np.asarray(value, dtype=np.float32)
                           for name, value in draws.items()})


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for package in ("numpy", "scipy", "torch", "pyro-ppl", "numpyro", "jax", "jaxlib", "arviz"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def provenance() -> dict:
    import subprocess

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {"command": "python " + " ".join(shlex.quote(a) for a in
                                            [f"packages/vibench-hardcases/{Path(sys.argv[0]).name}"]
                                            + sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit_before": commit, "versions": versions(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)"}


# ------------------------------------------------------------------------------------------
# synthetic data


def write_hier_centred_data() -> None:
    """hier_centred: 10 groups of 3 to 10 Bernoulli outcomes, one N(0, 1) covariate."""
    import numpy as np

    rng = np.random.default_rng(SEEDS["hier_centred"])
    truth = {"mu": -0.3, "tau": 0.6, "beta": 0.8}
    sizes = [4, 6, 8, 5, 10, 3, 7, 6, 9, 4]
    alpha = rng.normal(truth["mu"], truth["tau"], len(sizes))
    group = np.repeat(np.arange(len(sizes)), sizes)
    x = np.round(rng.normal(0.0, 1.0, len(group)), 2)
    p = 1 / (1 + np.exp(-(alpha[group] + truth["beta"] * x)))
    y = (rng.uniform(size=len(group)) < p).astype(int)
    folder = DATA / "hier_centred"
    write_data_json(folder / "data.json", {"J": len(sizes), "group": group.tolist(),
                                      "x": x.tolist(), "y": y.tolist()})
    write_data_info(folder, {
        "seed": SEEDS["hier_centred"], "group_sizes": sizes, "truth": truth,
        "true_alpha": alpha.round(4).tolist(),
        "how": "numpy.random.default_rng(seed): alpha ~ Normal(mu, tau) per group, x ~ "
               "Normal(0, 1) rounded to 2 decimals, y ~ Bernoulli(sigmoid(alpha[group] + "
               "beta x)) (make_references.py write_hier_centred_data)"})
    print("wrote", folder / "data.json")


def write_latent_gp_data() -> None:
    """latent_gp: 20 inputs on a jittered grid of (0, 10); f a draw of the GP; Poisson
    counts."""
    import numpy as np
    from vibench_hardcases.models import GP_JITTER

    rng = np.random.default_rng(SEEDS["latent_gp"])
    truth = {"amplitude": 1.0, "lengthscale": 1.5, "mean": 1.0}
    x = np.round(0.25 + 0.5 * np.arange(20) + rng.uniform(-0.2, 0.2, 20), 2)
    K = (truth["amplitude"] ** 2 * np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2
                                           / truth["lengthscale"] ** 2)
         + GP_JITTER * np.eye(len(x)))
    f = np.linalg.cholesky(K) @ rng.normal(size=len(x))
    y = rng.poisson(np.exp(truth["mean"] + f))
    folder = DATA / "latent_gp"
    write_data_json(folder / "data.json", {"x": x.tolist(), "y": y.tolist()})
    write_data_info(folder, {
        "seed": SEEDS["latent_gp"], "truth": truth, "true_f": f.round(4).tolist(),
        "how": "numpy.random.default_rng(seed): x = 0.25 + 0.5 i + Uniform(-0.2, 0.2), i = "
               "0..19, rounded to 2 decimals; f = chol(K) z with the model's kernel (and "
               "jitter) at the true amplitude and lengthscale; y ~ Poisson(exp(mean + f)) "
               "(make_references.py write_latent_gp_data)"})
    print("wrote", folder / "data.json")


def write_hier_logistic_data() -> None:
    """hier_logistic: 2,000 rows of 5 N(0, 1) predictors in 10 groups (row i in group i mod
    10), intercepts around a common one, Bernoulli outcomes: the size of issue 21's newcomer
    model."""
    import numpy as np

    rng = np.random.default_rng(SEEDS["hier_logistic"])
    truth = {"mu": 0.5, "sigma": 0.8}
    rows, predictors, groups = 2000, 5, 10
    a = rng.normal(truth["mu"], truth["sigma"], groups)
    beta = np.round(rng.normal(0.0, 1.0, predictors), 4)
    X = np.round(rng.normal(0.0, 1.0, (rows, predictors)), 3)
    g = np.arange(rows) % groups
    p = 1 / (1 + np.exp(-(a[g] + X @ beta)))
    y = (rng.uniform(size=rows) < p).astype(int)
    folder = DATA / "hier_logistic"
    write_data_json(folder / "data.json", {"X": X.tolist(), "g": g.tolist(), "y": y.tolist()})
    write_data_info(folder, {
        "seed": SEEDS["hier_logistic"], "truth": {**truth, "beta": beta.tolist()},
        "true_a": a.round(4).tolist(),
        "how": "numpy.random.default_rng(seed): a ~ Normal(mu, sigma) per group, beta ~ "
               "Normal(0, 1) rounded to 4 decimals, X ~ Normal(0, 1) rounded to 3 decimals, "
               "g = row mod 10, y ~ Bernoulli(sigmoid(a[g] + X beta)) (make_references.py "
               "write_hier_logistic_data)"})
    print("wrote", folder / "data.json")


def write_data_info(folder: Path, how: dict) -> None:
    """info.json's "data" section (how the data were simulated); the rest of info.json is
    written with the reference (``nuts --write``), which keeps this section."""
    path = folder / "info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info.update({"posterior": folder.name, "kind": "nuts",
                 "data": {**how, **provenance()}})
    write_json(path, info)


# ------------------------------------------------------------------------------------------
# the analytic targets


def analytic_target(name: str) -> dict:
    """Per analytic target: its constants, its parameter names, exact draws (a function of a
    numpy Generator), its analytic log density (numpy/scipy, written from the maths, not from
    the Pyro model), and its reference moments and quantiles with how each was computed."""
    import numpy as np
    from scipy import integrate, optimize, stats

    def quantile(cdf, p, lo, hi):
        return optimize.brentq(lambda q: cdf(q) - p, lo, hi, xtol=1e-12)

    if name == "funnel10":
        s, d = FUNNEL["v_scale"], FUNNEL["dim"]

        def draws(rng):
            v = s * rng.standard_normal(N_EXACT)
            x = np.exp(v / 2)[:, None] * rng.standard_normal((N_EXACT, d - 1))
            return {"v": v, **{f"x[{i + 1}]": x[:, i] for i in range(d - 1)}}

        def log_density(p):  # p: name -> float
            v = p["v"]
            x = np.array([p[f"x[{i + 1}]"] for i in range(d - 1)])
            return stats.norm.logpdf(v, 0, s) + stats.norm.logpdf(x, 0, np.exp(v / 2)).sum()

        def x_cdf(q):  # P(x_i <= q) = E_v[Phi(q / exp(v / 2))], by quadrature over v
            return integrate.quad(lambda v: stats.norm.pdf(v, 0, s)
                                  * stats.norm.cdf(q / np.exp(v / 2)), -12 * s, 12 * s,
                                  limit=400, epsabs=1e-12)[0]

        x_q = {k: 0.0 if p == 0.5 else quantile(x_cdf, p, -1e3, 1e3) for k, p in QUANTILES.items()}
        params = {"v": {"mean": 0.0, "sd": s,
                        **{k: float(stats.norm.ppf(p, 0, s)) for k, p in QUANTILES.items()}}}
        for i in range(d - 1):  # Var x_i = E[exp(v)] = exp(s^2 / 2)
            params[f"x[{i + 1}]"] = {"mean": 0.0, "sd": float(np.exp(s ** 2 / 4)), **x_q}
        how = {"mean": "analytic: 0", "sd": "analytic: v 3; x_i sqrt(E[exp(v)]) = exp(9/4)",
               "quantiles": "v analytic (Normal); x_i by quadrature over v of "
                            "Phi(q / exp(v/2)) and root finding (scipy quad, brentq)"}
        special = [{"v": -7.5, **{f"x[{i + 1}]": 0.01 * (i - 4) for i in range(d - 1)}},
                   {"v": 6.0, **{f"x[{i + 1}]": 10.0 * (-1) ** i for i in range(d - 1)}}]
        return dict(constants=FUNNEL, draws=draws, log_density=log_density, params=params,
                    how=how, special=special)

    if name == "banana":
        s1, b = BANANA["sigma1"], BANANA["b"]

        def draws(rng):
            x1 = s1 * rng.standard_normal(N_EXACT)
            x2 = rng.standard_normal(N_EXACT) - b * (x1 ** 2 - s1 ** 2)
            return {"x1": x1, "x2": x2}

        # Haario: N(phi_b(x); 0, diag(s1^2, 1)), phi_b(x) = (x1, x2 + b x1^2 - b s1^2)
        def log_density(p):
            return (stats.norm.logpdf(p["x1"], 0, s1)
                    + stats.norm.logpdf(p["x2"] + b * p["x1"] ** 2 - b * s1 ** 2, 0, 1))

        def x2_cdf(q):  # P(x2 <= q) = E_x1[Phi(q + b (x1^2 - s1^2))]
            return integrate.quad(lambda u: stats.norm.pdf(u, 0, s1)
                                  * stats.norm.cdf(q + b * (u ** 2 - s1 ** 2)), -12 * s1, 12 * s1,
                                  points=[0.0], limit=400, epsabs=1e-12)[0]

        params = {"x1": {"mean": 0.0, "sd": s1,
                         **{k: float(stats.norm.ppf(p, 0, s1)) for k, p in QUANTILES.items()}},
                  # E x2 = -b (E x1^2 - s1^2) = 0; Var x2 = 1 + b^2 Var(x1^2) = 1 + 2 b^2 s1^4
                  "x2": {"mean": 0.0, "sd": float(np.sqrt(1 + 2 * b ** 2 * s1 ** 4)),
                         **{k: quantile(x2_cdf, p, -200, 50) for k, p in QUANTILES.items()}}}
        how = {"mean": "analytic: 0 and 0", "sd": "analytic: x1 10; x2 sqrt(1 + 2 b^2 sigma1^4)",
               "quantiles": "x1 analytic (Normal); x2 by quadrature over x1 of "
                            "Phi(q + b (x1^2 - sigma1^2)) and root finding"}
        special = [{"x1": 25.0, "x2": -52.0}, {"x1": 0.0, "x2": 10.0}, {"x1": -3.0, "x2": 40.0}]
        return dict(constants=BANANA, draws=draws, log_density=log_density, params=params,
                    how=how, special=special)

    if name == "mixture2":
        w, m, S, log_evidence = mixture_posterior()

        def draws(rng):
            k = rng.choice(2, size=N_EXACT, p=w)
            z = rng.standard_normal((N_EXACT, 2))
            L = np.linalg.cholesky(S)
            theta = m[k] + np.einsum("nij,nj->ni", L[k], z)
            return {"theta[1]": theta[:, 0], "theta[2]": theta[:, 1]}

        def log_density(p):  # the normalised posterior, plus the log evidence: the log joint
            t = np.array([p["theta[1]"], p["theta[2]"]])
            return log_evidence + float(np.logaddexp(
                *[np.log(w[k]) + stats.multivariate_normal.logpdf(t, m[k], S[k])
                  for k in range(2)]))

        params = {}
        for i in range(2):
            mean = float(w @ m[:, i])
            var = float(w @ (S[:, i, i] + m[:, i] ** 2)) - mean ** 2

            def cdf(q, i=i):
                return float(w @ stats.norm.cdf((q - m[:, i]) / np.sqrt(S[:, i, i])))

            params[f"theta[{i + 1}]"] = {"mean": mean, "sd": float(np.sqrt(var)),
                                         **{k: quantile(cdf, p, -50, 50)
                                            for k, p in QUANTILES.items()}}
        how = {"posterior": "conjugate per component: component k has covariance S_k = "
                            "(covs_k^-1 + I / prior_scale^2)^-1, mean S_k covs_k^-1 (y - "
                            "offsets_k) and weight proportional to weights_k N(y - offsets_k; "
                            "0, covs_k + prior_scale^2 I)",
               "mean": "analytic: sum_k w_k m_k", "sd": "analytic: sqrt(sum_k w_k (S_k,ii + "
               "m_k,i^2) - mean_i^2)", "quantiles": "analytic marginal CDF (a mixture of "
               "Normal CDFs) and root finding",
               "components": {"weights": w.tolist(), "means": m.tolist(), "covs": S.tolist(),
                              "log_evidence": log_evidence}}
        special = [{"theta[1]": 0.0, "theta[2]": 0.0}, {"theta[1]": 4.0, "theta[2]": 2.0},
                   {"theta[1]": -4.0, "theta[2]": -2.0}]
        return dict(constants=MIXTURE, draws=draws, log_density=log_density, params=params,
                    how=how, special=special)

    if name == "student_t":
        df, loc, scale = STUDENT["df"], np.array(STUDENT["loc"]), np.array(STUDENT["scale"])

        def draws(rng):
            z = rng.standard_normal((N_EXACT, 4)) @ np.linalg.cholesky(scale).T
            x = loc + z / np.sqrt(rng.chisquare(df, N_EXACT) / df)[:, None]
            return {f"x[{i + 1}]": x[:, i] for i in range(4)}

        def log_density(p):
            x = np.array([p[f"x[{i + 1}]"] for i in range(4)])
            return float(stats.multivariate_t.logpdf(x, loc, scale, df=df))

        params = {}
        for i in range(4):
            s = float(np.sqrt(scale[i, i]))  # the marginal is t_df(loc_i, s)
            params[f"x[{i + 1}]"] = {"mean": float(loc[i]), "sd": s * float(np.sqrt(df / (df - 2))),
                                     **{k: float(loc[i] + s * stats.t.ppf(p, df))
                                        for k, p in QUANTILES.items()}}
        how = {"mean": "analytic: loc", "sd": "analytic: sqrt(scale_ii df / (df - 2)) = "
               "sqrt(3 scale_ii)", "quantiles": "analytic: the marginal Student-t's"}
        special = [{f"x[{i + 1}]": 30.0 * (-1) ** i for i in range(4)},
                   {f"x[{i + 1}]": 0.0 for i in range(4)}]
        return dict(constants=STUDENT, draws=draws, log_density=log_density, params=params,
                    how=how, special=special)
    raise KeyError(name)


def mixture_posterior():
    """The mixture's posterior components (numpy, float64): weights, means, covariances, and
    the log evidence log p(y)."""
    import numpy as np
    from scipy import special, stats

    y, tau = np.array(MIXTURE["y"]), MIXTURE["prior_scale"]
    w, c, C = (np.array(MIXTURE[k]) for k in ("weights", "offsets", "covs"))
    S = np.linalg.inv(np.linalg.inv(C) + np.eye(2) / tau ** 2)
    m = np.einsum("kij,kj->ki", S, np.linalg.solve(C, (y - c)[..., None])[..., 0])
    log_w = np.log(w) + np.array([stats.multivariate_normal.logpdf(y - c[k], np.zeros(2),
                                                                   C[k] + tau ** 2 * np.eye(2))
                                  for k in range(2)])
    log_evidence = float(special.logsumexp(log_w))
    return np.exp(log_w - log_evidence), m, S, log_evidence


def pyro_log_density(name: str, points: list[dict], data: dict) -> list[float]:
    """The installed Pyro model's log joint density (float64) at each point (name -> value)."""
    import torch
    from pyro import poutine
    from vibench_hardcases import plugin, reference

    vibench_name = next(k for k, v in reference.POSTERIORS.items() if v == name)
    model = plugin.MODELS[vibench_name]()
    tensors = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in data.items()}
    out = []
    for point in points:
        values = reference.to_sites({k: float(v) for k, v in point.items()}, dtype=torch.float64)
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(**tensors)
        out.append(float(trace.log_prob_sum()))
    return out


def compare_log_densities(a: list[float], b: list[float], what: str) -> dict:
    """Two log densities at the same points agree up to a constant: the constant (mean of
    a - b) and the largest deviation from it."""
    import numpy as np

    diff = np.array(a) - np.array(b)
    constant = float(diff.mean())
    deviation = float(np.abs(diff - constant).max())
    return {"what": what, "points": len(a), "constant": constant,
            "max_abs_deviation": deviation, "agree": deviation < 1e-8,
            "first": list(a), "second": list(b)}


def write_analytic(name: str) -> None:
    import numpy as np

    start = time.time()
    target = analytic_target(name)
    rng = np.random.default_rng(SEEDS[name])
    draws = target["draws"](rng)
    folder = DATA / name
    write_data_json(folder / "data.json", target["constants"])
    write_draws(folder, draws)
    params = target["params"]
    for key, value in draws.items():  # the exact draws' own moments, beside the analytic ones
        n = len(value)
        params[key]["draws_mean"] = float(value.mean())
        params[key]["draws_sd"] = float(value.std(ddof=1))
        params[key]["draws_mean_z"] = (abs(float(value.mean()) - params[key]["mean"])
                                       / (params[key]["sd"] / np.sqrt(n)))
    # the model's log evidence log p(data): 0 where the model's density is the normalised
    # target itself (no observations), log p(y) for the mixture
    log_evidence = target["how"].get("components", {}).get("log_evidence", 0.0)
    write_json(folder / "reference.json", {
        "posterior": name, "kind": "analytic", "draws": "draws.npz", "n_draws": N_EXACT,
        "computed": target["how"], "log_evidence": log_evidence, "params": params})

    # the Pyro model's log density against the analytic one, at 5 exact draws and at a few
    # points far in the tails or between the modes
    points = [{k: float(v[i]) for k, v in draws.items()} for i in range(5)] + target["special"]
    analytic = [float(target["log_density"](p)) for p in points]
    pyro_values = pyro_log_density(name, points, target["constants"])
    check = compare_log_densities(pyro_values, analytic,
                                  "Pyro model log joint (float64) minus the analytic log density")
    check["at"] = points
    write_json(folder / "info.json", {
        "posterior": name, "kind": "analytic",
        "reference": {
            "method": "exact i.i.d. draws (numpy.random.default_rng(seed)); mean and sd "
                      "analytic, quantiles analytic or by quadrature (see reference.json's "
                      "'computed')",
            "n_draws": N_EXACT, "seed": SEEDS[name], "dtype_in_draws_npz": "float32",
            "max_draws_mean_z": max(p["draws_mean_z"] for p in params.values()),
            **provenance(), "wall_s": round(time.time() - start, 1)},
        "checks": {"log_density": check}})
    print(f"{name}: {len(draws)} parameters x {N_EXACT} draws; log density agrees: "
          f"{check['agree']} (max deviation {check['max_abs_deviation']:.2e}, constant "
          f"{check['constant']:.2e})")


# ------------------------------------------------------------------------------------------
# the NumPyro ports of the real models


def numpyro_model(name: str, param: str):
    """The NumPyro port of a real model, written from its maths (not generated from the Pyro
    model): ``centred`` has the Pyro model's sites and density; ``noncentred`` samples the
    standardised ``alpha_raw`` (or ``f_raw``) and records ``alpha`` (or ``f``) as a
    deterministic site: the same posterior over the Pyro model's sites."""
    import jax.numpy as jnp
    import numpyro
    import numpyro.distributions as dist

    if name == "hier_centred":
        def model(J, group, x, y):
            J = int(J)
            group = jnp.asarray(group, dtype=jnp.int32)
            mu = numpyro.sample("mu", dist.Normal(0.0, 1.5))
            tau = numpyro.sample("tau", dist.HalfNormal(1.0))
            beta = numpyro.sample("beta", dist.Normal(0.0, 1.0))
            if param == "centred":
                alpha = numpyro.sample("alpha", dist.Normal(mu, tau).expand([J]).to_event(1))
            else:
                raw = numpyro.sample("alpha_raw", dist.Normal(0.0, 1.0).expand([J]).to_event(1))
                alpha = numpyro.deterministic("alpha", mu + tau * raw)
            numpyro.sample("y", dist.Bernoulli(logits=alpha[group] + beta * x).to_event(1), obs=y)

        return model

    if name == "latent_gp":
        from vibench_hardcases.models import GP_JITTER

        def model(x, y):
            n = x.shape[0]
            amplitude = numpyro.sample("amplitude", dist.HalfNormal(1.5))
            lengthscale = numpyro.sample("lengthscale", dist.InverseGamma(4.0, 6.0))
            mean = numpyro.sample("mean", dist.Normal(0.0, 2.0))
            K = (amplitude ** 2 * jnp.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / lengthscale ** 2)
                 + GP_JITTER * jnp.eye(n))
            if param == "centred":
                f = numpyro.sample("f", dist.MultivariateNormal(jnp.zeros(n), covariance_matrix=K))
            else:
                raw = numpyro.sample("f_raw", dist.Normal(0.0, 1.0).expand([n]).to_event(1))
                f = numpyro.deterministic("f", jnp.linalg.cholesky(K) @ raw)
            numpyro.sample("y", dist.Poisson(jnp.exp(mean + f)).to_event(1), obs=y)

        return model
    if name == "hier_logistic":
        import numpy as np

        def model(X, g, y):
            groups = int(np.max(np.asarray(g))) + 1
            g = jnp.asarray(g, dtype=jnp.int32)
            mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
            sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
            beta = numpyro.sample("beta", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
            if param == "centred":
                a = numpyro.sample("a", dist.Normal(mu, sigma).expand([groups]).to_event(1))
            else:
                raw = numpyro.sample("a_raw", dist.Normal(0.0, 1.0).expand([groups]).to_event(1))
                a = numpyro.deterministic("a", mu + sigma * raw)
            numpyro.sample("y", dist.Bernoulli(logits=a[g] + X @ beta).to_event(1), obs=y)

        return model
    raise KeyError(name)


# the hierarchical models' non-centred site, its location and its scale
HIERARCHIES = {"hier_centred": ("alpha", "mu", "tau"), "hier_logistic": ("a", "mu", "sigma")}


def flatten(samples: dict, names_of: dict) -> dict:
    """Site -> array (chains, draws, *shape) to parameter name -> array (chains, draws)."""
    import itertools

    import numpy as np

    out = {}
    for site, shape in names_of.items():
        value = np.asarray(samples[site])
        if shape == ():
            out[site] = value
            continue
        for index in itertools.product(*(range(n) for n in shape)):
            out[f"{site}[{','.join(str(i + 1) for i in index)}]"] = value[(Ellipsis,) + index]
    return out


def site_shapes(name: str, data: dict) -> dict:
    if name == "hier_logistic":
        import numpy as np

        return {"mu": (), "sigma": (), "beta": (np.shape(data["X"])[1],),
                "a": (int(np.max(data["g"])) + 1,)}
    if name == "hier_centred":
        return {"mu": (), "tau": (), "beta": (), "alpha": (int(data["J"]),)}
    return {"amplitude": (), "lengthscale": (), "mean": (), "f": (len(data["x"]),)}


def port_checks(name: str, data: dict, points: list[dict]) -> dict:
    """The ports' log densities against the Pyro model's at the same points (parameter name ->
    value): the centred port up to a constant; the non-centred port, at the standardised
    values of the same points, equals the centred density plus the log-Jacobian of
    raw -> alpha (J log tau) or raw -> f (sum log diag chol K), up to a constant."""
    import jax.numpy as jnp
    import numpy as np
    from numpyro.infer.util import log_density
    from vibench_hardcases.models import GP_JITTER

    jdata = {k: jnp.asarray(v) for k, v in data.items()}
    if name == "hier_centred":
        jdata["J"] = int(data["J"])
    shapes = site_shapes(name, data)
    vector = HIERARCHIES[name][0] if name in HIERARCHIES else "f"

    def sites(point):
        out = {}
        for site, shape in shapes.items():
            out[site] = (jnp.asarray(point[site]) if not shape else
                         jnp.asarray([point[f"{site}[{i + 1}]"] for i in range(shape[0])]))
        return out

    centred, noncentred, jacobian = [], [], []
    for point in points:
        values = sites(point)
        centred.append(float(log_density(numpyro_model(name, "centred"), (), jdata, values)[0]))
        if name in HIERARCHIES:
            site, loc, scale = HIERARCHIES[name]
            raw = (values[site] - values[loc]) / values[scale]
            log_jac = float(shapes[site][0] * jnp.log(values[scale]))
        else:
            x = np.asarray(data["x"])
            K = (float(values["amplitude"]) ** 2
                 * np.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / float(values["lengthscale"]) ** 2)
                 + GP_JITTER * np.eye(len(x)))
            L = np.linalg.cholesky(K)
            raw = jnp.asarray(np.linalg.solve(L, np.asarray(values["f"])))
            log_jac = float(np.log(np.diag(L)).sum())
        nc_values = {k: v for k, v in values.items() if k != vector}
        nc_values[f"{vector}_raw"] = raw
        noncentred.append(float(log_density(numpyro_model(name, "noncentred"), (), jdata,
                                            nc_values)[0]))
        jacobian.append(log_jac)
    pyro_values = pyro_log_density(name, points, data)
    return {
        "centred_port": compare_log_densities(
            pyro_values, centred, "Pyro model log joint minus the centred NumPyro port's "
            "(both float64)"),
        "noncentred_port": compare_log_densities(
            [c + j for c, j in zip(centred, jacobian)], noncentred,
            "centred port + log-Jacobian of raw -> " + vector + " minus the non-centred port"),
    }


def run_nuts(args) -> None:
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1")
    import arviz as az
    import jax
    import numpy as np
    import numpyro
    from numpyro.infer import MCMC, NUTS

    numpyro.enable_x64()
    numpyro.set_host_device_count(1)
    folder = DATA / args.name
    data = json.loads((folder / "data.json").read_text())
    jdata = {k: np.asarray(v, dtype=np.int32 if k in ("group", "g") else np.float64)
             for k, v in data.items()}
    if args.name == "hier_centred":
        jdata["J"] = int(data["J"])
    model = numpyro_model(args.name, args.param)
    kernel = NUTS(model, target_accept_prob=args.target_accept, max_tree_depth=args.max_tree_depth,
                  dense_mass=args.dense)
    mcmc = MCMC(kernel, num_warmup=args.warmup, num_samples=args.samples, num_chains=args.chains,
                chain_method="sequential", progress_bar=False)
    start = time.time()
    mcmc.run(jax.random.PRNGKey(args.seed), extra_fields=("diverging", "num_steps", "accept_prob",
                                                          "adapt_state.step_size"), **jdata)
    wall = time.time() - start
    samples = mcmc.get_samples(group_by_chain=True)
    extra = mcmc.get_extra_fields(group_by_chain=True)
    shapes = site_shapes(args.name, data)
    draws = flatten(samples, shapes)  # name -> (chains, draws)
    idata = az.from_dict(posterior={k: v for k, v in draws.items()})
    rhat = az.rhat(idata)  # rank-normalised split R-hat
    ess_bulk, ess_tail = az.ess(idata, method="bulk"), az.ess(idata, method="tail")
    mcse_mean, mcse_sd = az.mcse(idata, method="mean"), az.mcse(idata, method="sd")
    params = {}
    for key, value in draws.items():
        flat = value.reshape(-1)
        params[key] = {"mean": float(flat.mean()), "sd": float(flat.std(ddof=1)),
                       **{k: float(np.quantile(flat, p)) for k, p in QUANTILES.items()},
                       "rhat": float(rhat[key]), "ess_bulk": float(ess_bulk[key]),
                       "ess_tail": float(ess_tail[key]), "mcse_mean": float(mcse_mean[key]),
                       "mcse_sd": float(mcse_sd[key])}
    divergences = np.asarray(extra["diverging"]).sum(axis=1).tolist()
    steps = np.asarray(extra["num_steps"])
    diagnostics = {
        "max_rhat": max(p["rhat"] for p in params.values()),
        "min_ess_bulk": min(p["ess_bulk"] for p in params.values()),
        "min_ess_tail": min(p["ess_tail"] for p in params.values()),
        "divergences": int(sum(divergences)), "divergences_per_chain": divergences,
        "step_size_per_chain": np.asarray(extra["adapt_state.step_size"])[:, -1].tolist(),
        "mean_accept_prob_per_chain": np.asarray(extra["accept_prob"]).mean(axis=1).tolist(),
        "mean_leapfrog_steps_per_chain": steps.mean(axis=1).tolist(),
        "max_leapfrog_steps": int(steps.max()),
        "draws_at_max_tree_depth": int((steps >= 2 ** args.max_tree_depth - 1).sum()),
    }
    diagnostics["passes"] = bool(diagnostics["max_rhat"] < 1.01
                                 and diagnostics["min_ess_bulk"] > 4000
                                 and diagnostics["divergences"] == 0)
    # the log-density checks at 5 reference draws spread over the run
    n = args.chains * args.samples
    points = [{k: float(v.reshape(-1)[i]) for k, v in draws.items()}
              for i in np.linspace(0, n - 1, 5).astype(int)]
    checks = port_checks(args.name, data, points)
    checks["at"] = points
    run = {"posterior": args.name, "parameterisation": args.param,
           "settings": {"sampler": "numpyro.infer.NUTS", "chains": args.chains,
                        "chain_method": "sequential", "warmup": args.warmup,
                        "samples": args.samples, "target_accept_prob": args.target_accept,
                        "max_tree_depth": args.max_tree_depth,
                        "mass_matrix": "dense" if args.dense else "diagonal",
                        "init": "init_to_uniform (radius 2, unconstrained), per chain",
                        "seed": args.seed, "dtype": "float64 (numpyro.enable_x64)"},
           **provenance(), "wall_s": round(wall, 1), "diagnostics": diagnostics,
           "checks": checks, "params": params}
    out = folder / "nuts_runs" / (f"{args.name}-{args.param}-accept{args.target_accept}-"
                                  f"{args.chains}x{args.warmup}+{args.samples}"
                                  f"{'-dense' if args.dense else ''}-seed{args.seed}.json")
    write_json(out, run)
    print(f"{args.name} {args.param}: {wall:.0f} s; max R-hat {diagnostics['max_rhat']:.4f}, "
          f"min bulk ESS {diagnostics['min_ess_bulk']:.0f}, min tail ESS "
          f"{diagnostics['min_ess_tail']:.0f}, divergences {divergences}; log-density checks "
          f"{checks['centred_port']['max_abs_deviation']:.1e} and "
          f"{checks['noncentred_port']['max_abs_deviation']:.1e}; passes: "
          f"{diagnostics['passes']}; wrote {out}")
    if args.write:
        if not diagnostics["passes"]:
            raise SystemExit("refused to write the reference: the run does not pass")
        write_draws(folder, {k: v.reshape(-1) for k, v in draws.items()})
        write_json(folder / "reference.json", {
            "posterior": args.name, "kind": "nuts", "draws": "draws.npz", "n_draws": n,
            "n_chains": args.chains, "run": f"nuts_runs/{out.name}",
            "computed": {"all": "from the pooled NUTS draws (chains concatenated in order); "
                                "rhat, ess_bulk, ess_tail, mcse by ArviZ"},
            "params": params})
        print("wrote the reference:", folder / "reference.json")
        write_nuts_info(args.name)


def write_nuts_info(name: str) -> None:
    """info.json of a real model: how its data were made (kept from ``data``), the reference
    run (settings, provenance, diagnostics, the log-density checks of the ports) and every
    other run in nuts_runs/, each compared with the reference (largest z = |mean - ref mean| /
    ref sd, range of sd / ref sd over the parameters)."""
    folder = DATA / name
    reference = json.loads((folder / "reference.json").read_text())
    info = json.loads((folder / "info.json").read_text())
    chosen = json.loads((folder / reference["run"]).read_text())
    others = []
    for path in sorted((folder / "nuts_runs").glob("*.json")):
        if path.name == Path(reference["run"]).name:
            continue
        run = json.loads(path.read_text())
        zs = {k: abs(run["params"][k]["mean"] - r["mean"]) / r["sd"]
              for k, r in reference["params"].items()}
        rs = {k: run["params"][k]["sd"] / r["sd"] for k, r in reference["params"].items()}
        worst = max(zs, key=zs.get)
        others.append({"run": f"nuts_runs/{path.name}", "parameterisation": run["parameterisation"],
                       "settings": run["settings"], "command": run["command"],
                       "date": run["date"], "wall_s": run["wall_s"],
                       "diagnostics": run["diagnostics"],
                       "against_reference": {"max_z": zs[worst], "max_z_param": worst,
                                             "min_sd_ratio": min(rs.values()),
                                             "max_sd_ratio": max(rs.values())}})
    d = chosen["diagnostics"]
    info.update({
        "posterior": name, "kind": "nuts",
        "reference": {
            "method": f"NumPyro NUTS on make_references.py's {chosen['parameterisation']} port "
                      "(the same posterior as the Pyro model's; a non-centred port samples "
                      "standardised values and records the model's sites as deterministic "
                      "ones)",
            "run": reference["run"], "parameterisation": chosen["parameterisation"],
            "settings": chosen["settings"], "command": chosen["command"], "date": chosen["date"],
            "versions": chosen["versions"], "machine": chosen["machine"],
            "git_commit_before": chosen["git_commit_before"], "wall_s": chosen["wall_s"],
            "n_draws": reference["n_draws"], "dtype_in_draws_npz": "float32",
            "diagnostics": d},
        "checks": {k: v for k, v in chosen["checks"].items() if k != "at"},
        "checks_at": chosen["checks"].get("at"),
        "other_runs": others,
    })
    write_json(folder / "info.json", info)
    print("wrote", folder / "info.json")


if __name__ == "__main__":
    raise SystemExit(main())
