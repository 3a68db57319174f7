"""The posteriordb plugin package (packages/vibench-posteriordb), in process and fast.

The package is put on sys.path and its plugin module registered with a pluggy manager of
vibench's own hook specs, as an installed plugin would be. For each posterior: the model
traces on its data set, its latent sites are what the Stan names map to, and its log joint
density at 20 reference draws (evaluated in one batch, as vectorised ELBO particles are)
moves from draw to draw exactly as a direct numpy transcription of the Stan program's log
density does. That transcription is written here, independently of the port, loop by loop
as Stan writes it, so a porting mistake (a prior on the wrong scale, a missing Jacobian,
an off-by-one in a recursion) shows up as a mismatch. No MCMC here: the package's
check_ports.py runs NUTS against the reference posteriors.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pluggy
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_value
from pyro.poutine.util import site_is_subsample

from workbench import hookspecs
from workbench.compile import compiled_step
from workbench.config import recipe as recipes
from workbench.plugins.registry import collect, make_plugin_manager
from workbench.report.posterior import site_trace
from workbench.train.runner import Run
from workbench.train.tensors import load_data

PACKAGE = Path(__file__).resolve().parents[1] / "packages" / "vibench-posteriordb"
if str(PACKAGE) not in sys.path:
    sys.path.insert(0, str(PACKAGE))

from vibench_posteriordb import plugin, reference  # noqa: E402

NAMES = list(reference.POSTERIORS)
DRAWS = np.arange(20) * 500 + 7  # 20 reference draws, two from each of the 10 chains


@pytest.fixture(scope="module")
def registry():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name="vibench_posteriordb")
    found = collect(pm)
    assert not found.problems, found.problems
    return found


@pytest.fixture(scope="module")
def full_registry():
    """vibench's own plugins, as installed, and this package's."""
    pm, problems = make_plugin_manager()
    if not pm.is_registered(plugin):  # unless the package is installed too
        pm.register(plugin, name="vibench_posteriordb")
    found = collect(pm, problems)
    assert not found.problems, found.problems
    return found


def setup(registry, name, dtype=torch.float64):
    """The model, its data set's tensors (as vibench makes them) and 20 reference draws."""
    model = registry.get("model", name).build({})
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        data, _ = load_data(registry, {"dataset": {"name": name}}, model, name,
                            torch.device("cpu"))
    finally:
        torch.set_default_dtype(previous)
    draws = reference.load_draws(model.posterior)
    return model, data, {key: value[DRAWS].astype(np.float64) for key, value in draws.items()}


def plate_nesting(trace) -> int:
    return max((-frame.dim for site in trace.nodes.values() if site["type"] == "sample"
                for frame in site["cond_indep_stack"]), default=0)


def latent_trace(model, data, values):
    """The model traced with its latent sites set to ``values`` but still latent."""
    return poutine.trace(InitMessenger(init_to_value(values=values, fallback=None))(model)
                         ).get_trace(**data)


def batched_log_joint(model, data, draws, dtype=torch.float64):
    """The log joint density at each draw, from one trace with the draws in a plate left of
    the model's own plates (as vectorised particles are)."""
    import pyro

    n = len(next(iter(draws.values())))
    first = model.latent_values({k: v[0] for k, v in draws.items()}, dtype)
    nesting = plate_nesting(poutine.trace(poutine.condition(model, first)).get_trace(**data))
    values = {site: value.reshape((n,) + (1,) * nesting + value.shape[1:])
              for site, value in model.latent_values(draws, dtype).items()}
    with pyro.plate("draws", n, dim=-nesting - 1):
        trace = poutine.trace(poutine.condition(model, values)).get_trace(**data)
    total = torch.zeros(n, dtype=torch.float64)
    for site in trace.nodes.values():
        if site["type"] == "sample" and not site_is_subsample(site):
            log_prob = site["fn"].log_prob(site["value"])
            assert log_prob.shape[0] == n, (site["name"], log_prob.shape)
            total = total + log_prob.reshape(n, -1).sum(-1).double()
    return total


def log_joint(model, data, draw, dtype=torch.float64):
    values = model.latent_values(draw, dtype)
    return poutine.trace(poutine.condition(model, values)).get_trace(**data).log_prob_sum()


# ---- the Stan programs' log densities, transcribed directly (constants kept or not: only
# differences between draws are compared) ----

def normal_lpdf(x, mu, sigma):
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * math.log(2 * math.pi)


def student_t_lpdf(x, nu, mu, s):
    return (math.lgamma((nu + 1) / 2) - math.lgamma(nu / 2) - 0.5 * math.log(nu * math.pi)
            - math.log(s) - (nu + 1) / 2 * np.log1p(((x - mu) / s) ** 2 / nu))


def stan_kilpisjarvi(d, p):
    lp = normal_lpdf(p["alpha"], d["pmualpha"], d["psalpha"])
    lp += normal_lpdf(p["beta"], d["pmubeta"], d["psbeta"])
    for n in range(len(d["y"])):
        lp += normal_lpdf(d["y"][n], p["alpha"] + p["beta"] * d["x"][n], p["sigma"])
    return lp


def stan_earnings(d, p):
    beta = [p[f"beta[{i}]"] for i in range(1, 5)]
    lp = 0.0
    for n in range(len(d["earn"])):
        mean = (beta[0] + beta[1] * d["height"][n] + beta[2] * d["male"][n]
                + beta[3] * d["height"][n] * d["male"][n])
        lp += normal_lpdf(math.log(d["earn"][n]), mean, p["sigma"])
    return lp


def stan_nes(d, p):
    beta = [p[f"beta[{i}]"] for i in range(1, 10)]
    lp = 0.0
    for n in range(len(d["partyid7"])):
        age = d["age_discrete"][n]
        mean = (beta[0] + beta[1] * d["real_ideo"][n] + beta[2] * d["race_adj"][n]
                + beta[3] * (age == 2) + beta[4] * (age == 3) + beta[5] * (age == 4)
                + beta[6] * d["educ1"][n] + beta[7] * d["gender"][n] + beta[8] * d["income"][n])
        lp += normal_lpdf(d["partyid7"][n], mean, p["sigma"])
    return lp


def stan_diamonds(d, p):
    X = d["X"]
    means = X[:, 1:].mean(axis=0)
    Xc = X[:, 1:] - means
    b = np.stack([p[f"b[{i}]"] for i in range(1, X.shape[1])], axis=-1)  # draws x Kc
    lp = normal_lpdf(b, 0.0, 1.0).sum(-1)
    lp += student_t_lpdf(p["Intercept"], 3, 8, 10)
    lp += student_t_lpdf(p["sigma"], 3, 0, 10) + math.log(2)  # - student_t_lccdf(0 | 3, 0, 10)
    mean = p["Intercept"][:, None] + b @ Xc.T  # normal_id_glm_lpdf(Y | Xc, Intercept, b, sigma)
    return lp + normal_lpdf(d["Y"], mean, p["sigma"][:, None]).sum(-1)


def stan_arma11(d, p):
    y, mu, phi, theta, sigma = d["y"], p["mu"], p["phi"], p["theta"], p["sigma"]
    lp = normal_lpdf(mu, 0, 10) + normal_lpdf(phi, 0, 2) + normal_lpdf(theta, 0, 2)
    lp += -np.log1p((sigma / 2.5) ** 2)  # cauchy(0, 2.5), up to a constant
    nu = mu + phi * mu
    err = y[0] - nu
    lp += normal_lpdf(err, 0, sigma)
    for t in range(1, len(y)):
        nu = mu + phi * y[t - 1] + theta * err
        err = y[t] - nu
        lp += normal_lpdf(err, 0, sigma)
    return lp


def stan_garch11(d, p):
    y, mu, alpha0, alpha1, beta1 = d["y"], p["mu"], p["alpha0"], p["alpha1"], p["beta1"]
    sigma = np.full_like(mu, d["sigma1"])
    lp = normal_lpdf(y[0], mu, sigma)
    for t in range(1, len(y)):
        sigma = np.sqrt(alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * sigma**2)
        lp += normal_lpdf(y[t], mu, sigma)
    # The port's latent is beta1_unit = beta1 / (1 - alpha1): its density over (alpha1,
    # beta1_unit) is Stan's over (alpha1, beta1) times |d beta1 / d beta1_unit| = 1 - alpha1.
    return lp + np.log1p(-alpha1)


def stan_gauss_mix(d, p):
    lp = 0.0
    for k in (1, 2):
        lp += normal_lpdf(p[f"sigma[{k}]"], 0, 2) + normal_lpdf(p[f"mu[{k}]"], 0, 2)
    theta = p["theta"]
    lp += 4 * np.log(theta) + 4 * np.log1p(-theta)  # beta(5, 5), up to a constant
    for n in range(len(d["y"])):
        lp += np.logaddexp(np.log(theta) + normal_lpdf(d["y"][n], p["mu[1]"], p["sigma[1]"]),
                           np.log1p(-theta) + normal_lpdf(d["y"][n], p["mu[2]"], p["sigma[2]"]))
    return lp


def stan_hmm_drive(d, p):
    K, u, v, alpha = 2, d["u"], d["v"], d["alpha"]
    theta = [[p[f"theta{j}[{k}]"] for k in (1, 2)] for j in (1, 2)]  # theta[j][k]
    phi = [p["phi[1]"], p["phi[2]"]]
    lam = [p["lambda[1]"], p["lambda[2]"]]
    lp = 0.0
    for k in range(K):  # dirichlet_lpdf(theta[k] | alpha[k, :]')
        lp += math.lgamma(alpha[k].sum()) - sum(math.lgamma(a) for a in alpha[k])
        lp += sum((alpha[k][j] - 1) * np.log(theta[k][j]) for j in range(K))
    lp += normal_lpdf(phi[0], 0, 1) + normal_lpdf(phi[1], 3, 1)
    lp += normal_lpdf(lam[0], 0, 1) + normal_lpdf(lam[1], 3, 1)

    def exponential_lpdf(y, rate):
        return np.log(rate) - rate * y

    gamma = [exponential_lpdf(u[0], phi[k]) + exponential_lpdf(v[0], lam[k]) for k in range(K)]
    for t in range(1, len(u)):
        gamma = [np.logaddexp(*[gamma[j] + np.log(theta[j][k]) + exponential_lpdf(u[t], phi[k])
                                + exponential_lpdf(v[t], lam[k]) for j in range(K)])
                 for k in range(K)]
    return lp + np.logaddexp(*gamma)


STAN = {
    "pdb_kilpisjarvi": stan_kilpisjarvi, "pdb_earnings": stan_earnings, "pdb_nes": stan_nes,
    "pdb_diamonds": stan_diamonds, "pdb_arma11": stan_arma11, "pdb_garch11": stan_garch11,
    "pdb_gauss_mix": stan_gauss_mix, "pdb_hmm_drive": stan_hmm_drive,
}


def numpy_data(data):
    return {key: value.numpy().astype(np.float64) for key, value in data.items()}


# ---- the tests ----

def test_every_posterior_has_a_model_and_a_data_set(registry):
    assert registry.names("model") == sorted(NAMES)
    assert registry.names("dataset") == sorted(NAMES)
    for name in NAMES:
        for kind in ("model", "dataset"):
            component = registry.get(kind, name)
            assert component.plugin == "vibench_posteriordb"
            assert component.description.endswith("."), component.description
            assert not component.options


@pytest.mark.parametrize("name", NAMES)
def test_latent_sites_are_what_the_stan_names_map_to(registry, name):
    model, data, draws = setup(registry, name)
    ref = model.reference_posterior(**data)
    assert set(ref["params"]) == set(draws) == set(ref["sites"])
    assert Path(ref["draws"]).is_file()
    for stats in ref["params"].values():
        assert set(stats) == {"mean", "sd", "q05", "q50", "q95"}
    draw = {key: value[0] for key, value in draws.items()}
    values = model.latent_values(draw, torch.float64)
    trace = latent_trace(model, data, values)  # fails if a latent site has no value
    latent = {n: s for n, s in trace.nodes.items()
              if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)}
    assert set(latent) == set(values)
    for site_name, site in latent.items():
        assert site["value"].shape == values[site_name].shape, site_name
        assert site["value"].shape == site["fn"].shape(), site_name
    # vibench first traces the model as it is (no values given): flat-prior sites must then
    # draw a starting point inside their support, with a log density of zero.
    prior = poutine.trace(model).get_trace(**data)
    for site_name, site in latent.items():
        fn, value = prior.nodes[site_name]["fn"], prior.nodes[site_name]["value"]
        assert value.shape == site["value"].shape, site_name
        assert bool(fn.support.check(value).all()), site_name
        if isinstance(fn, dist.ImproperUniform):
            assert float(fn.log_prob(value)) == 0.0
    # Each Stan name reads back its own value from the traced sites (sample or deterministic):
    # the map's sites exist, its indices fit and every element of a site has a name.
    traced = {n: s["value"] for n, s in trace.nodes.items() if s["type"] == "sample"}
    got = reference.from_sites(traced, ref["sites"])
    for stan_name, value in draw.items():
        assert float(got[stan_name]) == pytest.approx(value, rel=1e-12, abs=1e-12), stan_name
    for site_name, shape in reference.site_shapes(ref["sites"]).items():
        assert traced[site_name].shape == shape, site_name
        named = sum(1 for s, _ in ref["sites"].values() if s == site_name)
        assert named == max(1, math.prod(shape)), site_name


@pytest.mark.parametrize("name", NAMES)
def test_log_density_matches_the_stan_program_between_draws(registry, name):
    model, data, draws = setup(registry, name)
    port = batched_log_joint(model, data, draws)
    stan = np.asarray(STAN[name](numpy_data(data), draws), dtype=np.float64)
    assert np.isfinite(stan).all() and torch.isfinite(port).all()
    port_diff = (port - port[0]).numpy()
    stan_diff = stan - stan[0]
    assert np.ptp(stan_diff) > 1.0  # the draws do differ in density: the check has teeth
    np.testing.assert_allclose(port_diff, stan_diff, rtol=1e-7, atol=1e-7 * np.abs(stan).max())
    for i in (0, 7):  # one draw at a time, no batch dimension, gives the same
        single = log_joint(model, data, {key: value[i] for key, value in draws.items()})
        assert float(single) == pytest.approx(float(port[i]), rel=1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_many_draws_at_once_give_each_draws_density(registry, name):
    """A report's many draws take other code paths in some ports (a loop over time instead of
    a pairwise product or a T x T matrix): the densities are the same as a few draws'."""
    model, data, draws = setup(registry, name)
    few = batched_log_joint(model, data, draws)
    many = batched_log_joint(model, data, {k: np.tile(v, 30) for k, v in draws.items()})
    np.testing.assert_allclose(many.numpy(), np.tile(few.numpy(), 30), rtol=1e-10)


def test_the_normal_mixture_is_pyro_s_mixture_same_family():
    """gauss_mix's likelihood: Pyro's mixture of Normals in density and, seed for seed, in
    draws, expanded over a plate as a model's site is."""
    from vibench_posteriordb.mixture import NormalMixture

    torch.manual_seed(0)
    probs = torch.distributions.Dirichlet(torch.ones(3)).sample((5, 1))
    loc, scale = torch.randn(5, 1, 3), torch.rand(5, 1, 3) + 0.5
    ours = NormalMixture(probs, loc, scale).expand([5, 40])
    pyros = dist.MixtureSameFamily(dist.Categorical(probs=probs), dist.Normal(loc, scale)
                                   ).expand([5, 40])
    value = torch.randn(40) * 3
    assert ours.batch_shape == pyros.batch_shape
    torch.testing.assert_close(ours.log_prob(value), pyros.log_prob(value))
    torch.manual_seed(1)
    drawn = ours.sample((2,))
    torch.manual_seed(1)
    assert torch.equal(drawn, pyros.sample((2,)))
    torch.testing.assert_close(ours.mean, pyros.mean)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_data_dtype_decides(registry, name, dtype):
    """Data in one dtype while torch's default is the other: the model follows its data."""
    model, data, draws = setup(registry, name)
    data = {key: value.to(dtype) for key, value in data.items()}
    other = torch.float64 if dtype == torch.float32 else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(other)
    try:
        values = model.latent_values({key: value[0] for key, value in draws.items()}, dtype)
        trace = poutine.trace(poutine.condition(model, values)).get_trace(**data)
        trace.compute_log_prob()
        # flat sites draw in the data's dtype; arma11's draw of |theta| > 1.5 overflows its
        # recursion in float32 (a quarter of random streams): site_trace then traces at 0
        prior = site_trace(model, **data)
        for name in values:
            assert prior.nodes[name]["value"].dtype == dtype, name
    finally:
        torch.set_default_dtype(previous)
    exact = float(log_joint(model, {k: v.double() for k, v in data.items()},
                            {key: value[0] for key, value in draws.items()}))
    for site in trace.nodes.values():
        # A deterministic site's zero log density has torch's default dtype (Pyro's doing);
        # every other term (flat and proper priors, likelihood, factors) is in the data's.
        if (site["type"] == "sample" and not site_is_subsample(site)
                and not site["infer"].get("_deterministic")):
            assert site["log_prob"].dtype == dtype, site["name"]
    total = float(trace.log_prob_sum())
    assert math.isfinite(total)
    assert total == pytest.approx(exact, rel=1e-4, abs=1e-2)


@pytest.mark.parametrize("name", NAMES)
def test_recipe_sets_up_a_run(full_registry, name):
    """Each shipped recipe resolves, and vibench builds its run: the model traced as it is
    (flat-prior sites give a starting point), the guide, the loss and one step."""
    import pyro

    path = PACKAGE / "recipes" / f"{name}.yaml"
    resolved = recipes.resolve(recipes.load(path), full_registry, str(path))
    assert resolved["model"]["name"] == name
    assert resolved["data"] == {"dataset": {"name": name}}
    assert resolved["guide"]["name"] == "auto_multivariate_normal"
    assert resolved["loss"]["name"] == "elbo"
    assert (resolved["optimizer"]["name"], resolved["optimizer"]["lr"]) == ("adam", 0.01)
    assert 1000 <= resolved["train"]["steps"] <= 10000
    run = Run.setup({**resolved, "device": "cpu"}, full_registry)
    assert run.exact is None or not run.exact  # the model offers no exact_posterior
    pyro.clear_param_store()


@pytest.mark.parametrize("name", [  # diamonds, which reads a flag of its data, stays quick
    n if n == "pdb_diamonds" else pytest.param(n, marks=pytest.mark.slow) for n in NAMES])
def test_every_port_compiles_to_the_eager_step(full_registry, name):
    """Each port's step traces into one graph whose loss and gradients are eager Pyro's,
    though some ports read a size or a flag of their data in Python (diamonds' prior_only)."""
    import pyro

    path = PACKAGE / "recipes" / f"{name}.yaml"
    resolved = recipes.resolve(recipes.load(path), full_registry, str(path))
    run = Run.setup({**resolved, "device": "cpu"}, full_registry)
    try:
        assert compiled_step.compile_step(run.svi, run.data, backend="fx") is not None
    finally:
        pyro.clear_param_store()
