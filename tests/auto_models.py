"""Models and a stage for tests/test_auto.py, named by file (``auto_models.py:banana``)."""

import pyro
import pyro.distributions as dist
import torch


def banana():
    """A banana: b sits on the parabola a^2 - 1, so no Gaussian fits it well (k-hat > 0.7)."""
    a = pyro.sample("a", dist.Normal(torch.tensor(0.0), 1.0))
    pyro.sample("b", dist.Normal(a ** 2 - 1, 0.1))


class OneFit:
    """A stage of the test's own: one short mean-field fit, no search, no convergence stop."""

    def __init__(self, steps: int = 20, init: str = "init_loc"):
        self.steps, self.init = steps, init

    def run(self, pipeline) -> str:
        fit = pipeline.fit("mine", guide={"name": "auto_normal", "init": self.init},
                           loss={"name": "elbo"},
                           optimizer={"name": "adam", "lr": 0.05},
                           train={"steps": self.steps})
        pipeline.candidates = [fit]
        return f"my own stage: {fit.ending()}"


def normal_means(size: int = 2000):
    """``size`` independent Normal means, each seen once with unit noise: a large latent space
    whose posterior is known (N(y/2, 1/2) each), for the pipeline's bounds on large models."""
    size = int(size)  # data arrive as tensors
    y = torch.linspace(-2.0, 2.0, size)
    with pyro.plate("means", size):
        mu = pyro.sample("mu", dist.Normal(torch.tensor(0.0), 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
