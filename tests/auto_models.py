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

    def __init__(self, steps: int = 20):
        self.steps = steps

    def run(self, pipeline) -> str:
        fit = pipeline.fit("mine", guide={"name": "auto_normal"}, loss={"name": "elbo"},
                           optimizer={"name": "adam", "lr": 0.05},
                           train={"steps": self.steps})
        pipeline.candidates = [fit]
        return f"my own stage: {fit.ending()}"
