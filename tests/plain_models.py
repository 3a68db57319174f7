"""Models written as plain Pyro, the way a newcomer writes them: they index and multiply as if
each latent site had its own shape only, so they do not broadcast over a leading draws or
particles dimension. Each has a twin that does (a shipped model, or ``*_broadcasting`` here),
which tests/test_user_model.py fits beside it.
"""

import pyro
import pyro.distributions as dist
import torch


def coin(flips):
    """beta_bernoulli, plain: one probability per flip."""
    fairness = pyro.sample("latent_fairness", dist.Beta(10.0, 10.0))
    with pyro.plate("flips", len(flips)):
        pyro.sample("obs", dist.Bernoulli(fairness.expand(len(flips))), obs=flips)


def linear(x, y):
    """linear_regression (noise known, 0.5), plain: a matrix-vector product."""
    intercept = pyro.sample("intercept", dist.Normal(0.0, 10.0))
    coefficients = pyro.sample("coefficients",
                               dist.Normal(torch.zeros(x.shape[1]), 10.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(intercept + x @ coefficients, 0.5), obs=y)


def hierarchical(X, g, y):
    """A hierarchical logistic regression: an intercept per group around a common one."""
    g = g.long()
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("groups", int(g.max()) + 1):
        a = pyro.sample("a", dist.Normal(mu, sigma))
    with pyro.plate("rows", len(y)) as ind:
        logits = a[g.index_select(0, ind)] + X.index_select(0, ind) @ beta
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y.index_select(0, ind))


def hierarchical_broadcasting(X, g, y):
    """``hierarchical`` rewritten to broadcast: the group and row dims last."""
    g = g.long()
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    beta = pyro.sample("beta", dist.Normal(torch.zeros(X.shape[1]), 1.0).to_event(1))
    with pyro.plate("groups", int(g.max()) + 1):
        a = pyro.sample("a", dist.Normal(mu, sigma))
    with pyro.plate("rows", len(y)):
        logits = a[..., g] + (X * beta).sum(-1)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y)


def hierarchical_data(rows: int = 400, predictors: int = 5, groups: int = 10,
                      seed: int = 0) -> dict[str, list]:
    """Data for ``hierarchical``, drawn with a fixed seed, as a recipe's inline data."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(rows, predictors, generator=gen)
    g = torch.arange(rows) % groups
    a = 0.5 + 0.8 * torch.randn(groups, generator=gen)
    beta = torch.randn(predictors, generator=gen)
    y = torch.bernoulli(torch.sigmoid(a[g] + X @ beta), generator=gen)
    return {"X": X.tolist(), "g": g.tolist(), "y": y.tolist()}


def soft_sum_to_zero(x, y):
    """Effects held near a sum of zero by a soft constraint written for one draw: with a plate
    of draws, ``effects.sum()`` sums over the draws too, so the model runs and mixes them up."""
    effects = pyro.sample("effects", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))
    pyro.factor("sum_to_zero", -0.5 * (effects.sum() / 0.1) ** 2)
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal((x * effects).sum(-1), 0.5), obs=y)


def guarded(x, y):
    """``linear`` with a guard that reads a draw's value in Python (``.item()``), which
    neither a plate of draws nor torch.func.vmap can batch."""
    intercept = pyro.sample("intercept", dist.Normal(0.0, 10.0))
    if not -1e6 < intercept.item() < 1e6:
        raise ValueError(f"implausible intercept {intercept.item()}")
    coefficients = pyro.sample("coefficients",
                               dist.Normal(torch.zeros(x.shape[1]), 10.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(intercept + x @ coefficients, 0.5), obs=y)


def logistic(x, y):
    """logistic_regression, plain: a matrix-vector product for the logits."""
    intercept = pyro.sample("intercept", dist.Normal(0.0, 10.0))
    coefficients = pyro.sample("coefficients",
                               dist.Normal(torch.zeros(x.shape[1]), 10.0).to_event(1))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Bernoulli(logits=intercept + x @ coefficients), obs=y)


def eight_schools(y, sigma):
    """eight_schools (non-centred), plain: each school's effect in a loop, as Stan writes
    ``for (j in 1:J) theta[j] = mu + tau * theta_tilde[j]``."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        theta_tilde = pyro.sample("theta_tilde", dist.Normal(0.0, 1.0))
        theta = torch.stack([mu + tau * theta_tilde[j] for j in range(len(y))])
        pyro.deterministic("theta", theta, event_dim=0)
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def gaussian_mixture(y):
    """gaussian_mixture (two components, the scale learned), plain: each datum's mean picked
    by ``locs[assignment]``; fit it with loss enum_elbo."""
    weights = pyro.sample("weights", dist.Dirichlet(torch.ones(2)))
    with pyro.plate("components", 2):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.HalfNormal(5.0))
    with pyro.plate("data", len(y)):
        assignment = pyro.sample("assignment", dist.Categorical(weights),
                                 infer={"enumerate": "parallel"})
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=y)


def costs(rows: int = 2000, steps: int = 100) -> None:
    """Print what not broadcasting costs on ``hierarchical`` beside its broadcasting twin:
    a step with 4 particles (at once, one after another), and the report's parts (k-hat on
    10,000 draws, its plots' prior draws, posterior.nc) vectorised, by vmap and by the loop.
    ``python -m tests.plain_models [rows]``"""
    import time

    from pyro.infer import SVI, Trace_ELBO
    from pyro.infer.autoguide import AutoMultivariateNormal

    from workbench.report import broadcast, inference_data, posterior

    data = {k: torch.tensor(v, dtype=torch.float32)
            for k, v in hierarchical_data(rows=rows).items()}

    def timed(work, repeat: int = 1) -> float:
        began = time.perf_counter()
        for _ in range(repeat):
            work()
        return (time.perf_counter() - began) / repeat

    print(f"hierarchical logistic regression, {rows} rows, {torch.get_num_threads()} threads")
    trace = posterior.site_trace(hierarchical, **data)
    nesting = posterior.plate_nesting(trace)
    sites = posterior.latent_sites(trace)
    for model, hows in ((hierarchical_broadcasting, ["vectorised"]),
                        (hierarchical, ["vmap", "loop"])):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoMultivariateNormal(model)
        vectorise = model is hierarchical_broadcasting
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}),
                  Trace_ELBO(num_particles=4, vectorize_particles=vectorise))
        svi.step(**data)
        step = timed(lambda: svi.step(**data), steps)  # noqa: B023 - called at once
        print(f"  {model.__name__}: a step with 4 particles "
              f"{'at once' if vectorise else 'one after another'}: {1e3 * step:.1f} ms")
        for how in hows:
            broadcast._known.pop(model, None)
            way = broadcast.verdict(model, data, nesting)
            if how == "loop":
                way = broadcast._known[model] = broadcast.Verdict(broadcast.LOOP, nesting)
            with torch.no_grad():
                psis = timed(lambda: posterior.diagnostics(  # noqa: B023
                    model, guide, data, nesting))  # noqa: B023
                plots = timed(lambda: posterior.plot_sources(  # noqa: B023
                    model, guide, data, sites, nesting))  # noqa: B023
                nc = timed(lambda: inference_data.draw(model, guide, data, nesting))  # noqa: B023
            print(f"  report, {how}: k-hat on {way.draws(posterior.NUM_IS_DRAWS)} draws "
                  f"{psis:.2f} s, plots' draws {plots:.2f} s, posterior.nc "
                  f"({way.draws(inference_data.NUM_DRAWS)} draws) {nc:.2f} s")
            broadcast._known.pop(model, None)


if __name__ == "__main__":
    import sys

    costs(*(int(arg) for arg in sys.argv[1:2]))
