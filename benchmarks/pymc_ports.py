"""The hard and development posteriors as PyMC models, for benchmarks/peers_advi.py.

Each port follows its Pyro model in packages/vibench-hardcases or packages/vibench-posteriordb
site for site: the same names, shapes and supports, so that the reference's parameter names
(``beta[2]`` is element 1 of ``beta``) read off a PyMC draw as they read off a Pyro one, and
the two log densities at a reference draw differ by a constant only, which
``peers_advi.py --check`` verifies. A flat prior is ``pm.Flat`` or ``pm.HalfFlat``; an
ordered vector with a Normal prior is a Normal with an ordered transform (PyMC's density
without the Jacobian is the unnormalised Normal on the ordered set, as Stan's); GARCH's
``beta1`` is ``beta1_unit * (1 - alpha1)`` with the same log-Jacobian factor as the Pyro port.
Data are each posterior's data.json as float64 arrays.
"""

from __future__ import annotations

import numpy as np
import pymc as pm
import pytensor.tensor as pt


def funnel10(d):
    v = pm.Normal("v", 0.0, d["v_scale"])
    pm.Normal("x", 0.0, pt.exp(v / 2), shape=int(d["dim"]) - 1)


def banana(d):
    x1 = pm.Normal("x1", 0.0, d["sigma1"])
    pm.Normal("x2", -d["b"] * (x1 ** 2 - d["sigma1"] ** 2), 1.0)


def mixture2(d):
    theta = pm.Normal("theta", 0.0, d["prior_scale"], shape=2)
    parts = [np.log(d["weights"][k])
             + pm.logp(pm.MvNormal.dist(theta + d["offsets"][k], cov=d["covs"][k]), d["y"])
             for k in range(2)]
    pm.Potential("y", pm.math.logsumexp(pt.stack(parts)))


def student_t(d):
    pm.MvStudentT("x", nu=d["df"], mu=d["loc"], chol=np.linalg.cholesky(d["scale"]))


def hier_centred(d):
    group = d["group"].astype("int64")
    mu = pm.Normal("mu", 0.0, 1.5)
    tau = pm.HalfNormal("tau", 1.0)
    beta = pm.Normal("beta", 0.0, 1.0)
    alpha = pm.Normal("alpha", mu, tau, shape=int(d["J"]))
    pm.Bernoulli("y", logit_p=alpha[group] + beta * d["x"], observed=d["y"])


def hier_logistic(d):
    group = d["g"].astype("int64")
    mu = pm.Normal("mu", 0.0, 2.0)
    sigma = pm.HalfNormal("sigma", 1.0)
    beta = pm.Normal("beta", 0.0, 1.0, shape=d["X"].shape[1])
    a = pm.Normal("a", mu, sigma, shape=int(group.max()) + 1)
    pm.Bernoulli("y", logit_p=a[group] + pt.dot(d["X"], beta), observed=d["y"])


GP_JITTER = 1e-3  # as vibench_hardcases.models.GP_JITTER: part of the model


def latent_gp(d):
    x = d["x"]
    amplitude = pm.HalfNormal("amplitude", 1.5)
    lengthscale = pm.InverseGamma("lengthscale", alpha=4.0, beta=6.0)
    mean = pm.Normal("mean", 0.0, 2.0)
    sq_dist = (x[:, None] - x[None, :]) ** 2
    K = amplitude ** 2 * pt.exp(-0.5 * sq_dist / lengthscale ** 2) + GP_JITTER * np.eye(len(x))
    f = pm.MvNormal("f", mu=np.zeros(len(x)), cov=K)
    pm.Poisson("y", pt.exp(mean + f), observed=d["y"])


def kilpisjarvi(d):
    alpha = pm.Normal("alpha", d["pmualpha"], d["psalpha"])
    beta = pm.Normal("beta", d["pmubeta"], d["psbeta"])
    sigma = pm.HalfFlat("sigma")
    pm.Normal("y", alpha + beta * d["x"], sigma, observed=d["y"])


def earnings(d):
    h, m = d["height"], d["male"]
    design = np.stack([np.ones_like(h), h, m, h * m], axis=-1)
    beta = pm.Flat("beta", shape=4)
    sigma = pm.HalfFlat("sigma")
    pm.Normal("log_earn", pt.dot(design, beta), sigma, observed=np.log(d["earn"]))


def nes(d):
    age = np.round(d["age_discrete"])
    design = np.stack([np.ones_like(age), d["real_ideo"], d["race_adj"], age == 2, age == 3,
                       age == 4, d["educ1"], d["gender"], d["income"]], axis=-1).astype(float)
    beta = pm.Flat("beta", shape=9)
    sigma = pm.HalfFlat("sigma")
    pm.Normal("partyid7", pt.dot(design, beta), sigma, observed=d["partyid7"])


def diamonds(d):
    X = d["X"][:, 1:] - d["X"][:, 1:].mean(0)  # brms's centred predictors
    b = pm.Normal("b", 0.0, 1.0, shape=X.shape[1])
    intercept = pm.StudentT("Intercept", nu=3.0, mu=8.0, sigma=10.0)
    sigma = pm.HalfStudentT("sigma", nu=3.0, sigma=10.0)
    pm.Normal("Y", intercept + pt.dot(X, b), sigma, observed=d["Y"])


def _linear_recurrence(c, a, n):
    """x[0] = c[0], x[t] = c[t] + a x[t-1]: x = W c with W[t, s] = a^(t-s) for s <= t."""
    lag = np.subtract.outer(np.arange(n), np.arange(n))
    weights = pt.where(lag >= 0, a ** np.clip(lag, 0, None).astype(float), 0.0)
    return pt.dot(weights, c)


def arma11(d):
    y = d["y"]
    mu = pm.Normal("mu", 0.0, 10.0)
    phi = pm.Normal("phi", 0.0, 2.0)
    theta = pm.Normal("theta", 0.0, 2.0)
    sigma = pm.HalfCauchy("sigma", 2.5)
    previous = pt.concatenate([pt.stack([mu]), y[:-1]])
    err = _linear_recurrence(y - mu - phi * previous, -theta, len(y))
    pm.Normal("y", y - err, sigma, observed=y)


def garch11(d):
    y = d["y"]
    mu = pm.Flat("mu")
    alpha0 = pm.HalfFlat("alpha0")
    alpha1 = pm.Uniform("alpha1", 0.0, 1.0)
    beta1_unit = pm.Uniform("beta1_unit", 0.0, 1.0)
    beta1 = pm.Deterministic("beta1", beta1_unit * (1 - alpha1))
    pm.Potential("beta1_jacobian", pt.log1p(-alpha1))
    shock = alpha0 + alpha1 * (y[:-1] - mu) ** 2
    start = pt.stack([pt.as_tensor(float(d["sigma1"]) ** 2)])
    variance = _linear_recurrence(pt.concatenate([start, shock]), beta1, len(y))
    pm.Normal("y", mu, pt.sqrt(variance), observed=y)


def gauss_mix(d):
    ordered = pm.distributions.transforms.ordered
    mu = pm.Normal("mu", 0.0, 2.0, shape=2, transform=ordered)
    sigma = pm.HalfNormal("sigma", 2.0, shape=2)
    theta = pm.Beta("theta", 5.0, 5.0)
    pm.NormalMixture("y", w=pt.stack([theta, 1 - theta]), mu=mu, sigma=sigma,
                     observed=d["y"])


def _log_matmul(a, b):
    """The (log, +) product of stacks of matrices: log(exp(a) @ exp(b))."""
    return _lse(a[..., :, :, None] + b[..., None, :, :], axis=-2)


def _lse(x, axis):
    """logsumexp over one axis, dropping it."""
    top = pt.max(x, axis=axis, keepdims=True)
    return pt.squeeze(top, axis=axis) + pt.log(pt.sum(pt.exp(x - top), axis=axis))


def hmm_drive(d):
    u, v, alpha = d["u"], d["v"], d["alpha"]
    theta1 = pm.Dirichlet("theta1", alpha[0])
    theta2 = pm.Dirichlet("theta2", alpha[1])
    tr = pm.distributions.transforms
    positive_ordered = tr.Chain([tr.log, tr.ordered]) if hasattr(tr, "Chain") else \
        tr.ChainedTransform([tr.log, tr.ordered])
    phi = pm.Normal("phi", [0.0, 3.0], 1.0, shape=2, transform=positive_ordered)
    lam = pm.Normal("lambda", [0.0, 3.0], 1.0, shape=2, transform=positive_ordered)
    emission = (pt.log(phi) - phi * u[:, None] + pt.log(lam) - lam * v[:, None])
    log_theta = pt.log(pt.stack([theta1, theta2]))  # [j, k]: from j to k
    m = log_theta[None] + emission[1:, None, :]
    n = len(u) - 1
    while n > 1:  # the (log, +) product of the steps, pairwise
        even = n - n % 2
        product = _log_matmul(m[0:even:2], m[1:even:2])
        m = pt.concatenate([product, m[even:]]) if n % 2 else product
        n = even // 2 + n % 2
    gamma = _lse(emission[0][:, None] + m[0], axis=0)
    pm.Potential("forward", _lse(gamma, axis=0))


PORTS = {
    "hard_funnel10": funnel10, "hard_banana": banana, "hard_mixture2": mixture2,
    "hard_student_t": student_t, "hard_hier_centred": hier_centred, "hard_latent_gp": latent_gp,
    "hard_hier_logistic": hier_logistic,
    "pdb_kilpisjarvi": kilpisjarvi, "pdb_earnings": earnings, "pdb_nes": nes,
    "pdb_diamonds": diamonds, "pdb_arma11": arma11, "pdb_garch11": garch11,
    "pdb_gauss_mix": gauss_mix, "pdb_hmm_drive": hmm_drive,
}


# Starting points where PyMC's default (a Normal's mean) is not inside an ordered support.
INITVALS = {"pdb_gauss_mix": {"mu": [-1.0, 1.0]},
            "pdb_hmm_drive": {"phi": [0.5, 3.0], "lambda": [0.5, 3.0]}}


def build(name: str, data: dict, start: bool = True) -> pm.Model:
    """The PyMC model of posterior ``name`` on ``data`` (data.json as float64 arrays), with
    its starting point where it needs one (``start``; a model with one cannot have its value
    transforms removed, which the ports' check does)."""
    with pm.Model() as model:
        PORTS[name](data)
    for site, value in INITVALS.get(name, {}).items() if start else ():
        model.set_initval(model[site], np.array(value))
    return model
