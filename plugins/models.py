"""Default models."""

from workbench import hookimpl


@hookimpl
def register_models(register):
    register("beta_bernoulli", BetaBernoulli)


class BetaBernoulli:
    """Coin flips with a Beta prior on the coin's fairness (the seed's coin)."""

    def __init__(self, prior_alpha: float = 10.0, prior_beta: float = 10.0):
        if prior_alpha <= 0 or prior_beta <= 0:
            raise ValueError("prior_alpha and prior_beta must be > 0")
        self.prior_alpha = prior_alpha
        self.prior_beta = prior_beta

    def __call__(self, flips):
        import pyro
        import pyro.distributions as dist
        import torch

        prior = dist.Beta(torch.tensor(self.prior_alpha), torch.tensor(self.prior_beta))
        fairness = pyro.sample("latent_fairness", prior)
        with pyro.plate("flips", flips.shape[-1]):
            pyro.sample("obs", dist.Bernoulli(fairness), obs=flips)

    def exact_posterior(self, flips):
        """Beta is conjugate to the Bernoulli: heads add to alpha, tails to beta."""
        import pyro.distributions as dist
        import torch

        heads = flips.sum()
        tails = flips.shape[-1] - heads
        return {
            "latent_fairness": dist.Beta(
                torch.as_tensor(self.prior_alpha + heads), torch.as_tensor(self.prior_beta + tails)
            )
        }
