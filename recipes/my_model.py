"""A coin's fairness from its flips: a plain Pyro model, no package, named by
recipes/my_model.yaml."""

import pyro
import pyro.distributions as dist


def model(flips):
    """Flips ~ Bernoulli(fairness) with a Beta(10, 10) prior on the fairness."""
    fairness = pyro.sample("fairness", dist.Beta(10.0, 10.0))
    with pyro.plate("flips", len(flips)):
        pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)
