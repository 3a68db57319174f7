"""The posteriordb ports (packages/vibench-posteriordb) written as plain Pyro, the way a
newcomer transcribes a Stan program for one draw: ``X @ beta``, Python loops over time with
``err[t-1]``, ``torch.stack`` of a list, sums over everything. None of them broadcasts over a
leading dimension of draws. Each subclasses its port only to keep the port's reference
posterior (``reference_posterior``, ``latent_values``); its ``__call__`` is its own, with the
port's site names, supports and priors, so the two have one log density.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

PACKAGE = Path(__file__).resolve().parents[1] / "packages" / "vibench-posteriordb"
if str(PACKAGE) not in sys.path:  # as tests/test_posteriordb.py, where it is not installed
    sys.path.insert(0, str(PACKAGE))

from vibench_posteriordb import models  # noqa: E402
from vibench_posteriordb.flat import FlatPrior  # noqa: E402


def flat(like, support, shape=()):
    """Stan's implicit flat prior over ``support``, in the data's dtype."""
    return FlatPrior.over(support, shape, like=like)


class Kilpisjarvi(models.Kilpisjarvi):
    """pdb_kilpisjarvi, plain: a design matrix times the stacked (alpha, beta)."""

    def __call__(self, x, y, pmualpha, psalpha, pmubeta, psbeta, N=None, xpred=None):
        alpha = pyro.sample("alpha", dist.Normal(pmualpha, psalpha))
        beta = pyro.sample("beta", dist.Normal(pmubeta, psbeta))
        sigma = pyro.sample("sigma", flat(y, constraints.positive))
        X = torch.stack([torch.ones_like(x), x], dim=1)
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(X @ torch.stack([alpha, beta]), sigma), obs=y)


class Earnings(models.Earnings):
    """pdb_earnings, plain: ``X @ beta``."""

    def __call__(self, earn, height, male, N=None):
        X = torch.stack([torch.ones_like(height), height, male, height * male], dim=1)
        beta = pyro.sample("beta", flat(earn, constraints.real, (4,)))
        sigma = pyro.sample("sigma", flat(earn, constraints.positive))
        with pyro.plate("data", len(earn)):
            pyro.sample("log_earn", dist.Normal(X @ beta, sigma), obs=torch.log(earn))


class Nes(models.Nes):
    """pdb_nes, plain: ``X @ beta``, the age dummies made as Stan's transformed data."""

    def __call__(self, partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete,
                 N=None, year=None):
        age = age_discrete.round()
        X = torch.stack([torch.ones_like(partyid7), real_ideo, race_adj,
                         (age == 2).to(partyid7.dtype), (age == 3).to(partyid7.dtype),
                         (age == 4).to(partyid7.dtype), educ1, gender, income], dim=1)
        beta = pyro.sample("beta", flat(partyid7, constraints.real, (9,)))
        sigma = pyro.sample("sigma", flat(partyid7, constraints.positive))
        with pyro.plate("data", len(partyid7)):
            pyro.sample("partyid7", dist.Normal(X @ beta, sigma), obs=partyid7)


class Diamonds(models.Diamonds):
    """pdb_diamonds, plain: ``Intercept + Xc @ b``."""

    def __call__(self, Y, X, N=None, K=None, prior_only=0):
        Xc = X[:, 1:] - X[:, 1:].mean(0)
        b = pyro.sample("b", dist.Normal(torch.zeros(Xc.shape[1]), 1.0).to_event(1))
        intercept = pyro.sample("Intercept", dist.StudentT(3.0, 8.0, 10.0))
        sigma = pyro.sample("sigma", dist.FoldedDistribution(dist.StudentT(3.0, 0.0, 10.0)))
        if not prior_only:
            with pyro.plate("data", len(Y)):
                pyro.sample("Y", dist.Normal(intercept + Xc @ b, sigma), obs=Y)


class Arma11(models.Arma11):
    """pdb_arma11, plain: Stan's loop over time, ``nu[t]`` from ``err[t-1]``."""

    def __call__(self, y, T=None):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        phi = pyro.sample("phi", dist.Normal(0.0, 2.0))
        theta = pyro.sample("theta", dist.Normal(0.0, 2.0))
        sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
        nu = [mu + phi * mu]
        err = [y[0] - nu[0]]
        for t in range(1, len(y)):
            nu.append(mu + phi * y[t - 1] + theta * err[t - 1])
            err.append(y[t] - nu[t])
        pyro.sample("y", dist.Normal(torch.stack(nu), sigma).to_event(1), obs=y)


class Garch11(models.Garch11):
    """pdb_garch11, plain: Stan's loop over time, ``sigma[t]`` from ``sigma[t-1]``."""

    def __call__(self, y, sigma1, T=None):
        mu = pyro.sample("mu", flat(y, constraints.real))
        alpha0 = pyro.sample("alpha0", flat(y, constraints.positive))
        alpha1 = pyro.sample("alpha1", flat(y, constraints.unit_interval))
        beta1_unit = pyro.sample("beta1_unit", flat(y, constraints.unit_interval))
        beta1 = pyro.deterministic("beta1", beta1_unit * (1 - alpha1))
        pyro.factor("beta1_jacobian", torch.log(1 - alpha1))
        sigma = [sigma1]
        for t in range(1, len(y)):
            sigma.append(torch.sqrt(alpha0 + alpha1 * (y[t - 1] - mu) ** 2
                                    + beta1 * sigma[t - 1] ** 2))
        pyro.sample("y", dist.Normal(mu, torch.stack(sigma)).to_event(1), obs=y)


class GaussMix(models.GaussMix):
    """pdb_gauss_mix, plain: the mixture weights stacked, the ordered means' prior summed."""

    def __call__(self, y, N=None):
        mu = pyro.sample("mu", flat(y, constraints.ordered_vector, (2,)))
        pyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
        sigma = pyro.sample("sigma", dist.HalfNormal(2.0 * torch.ones(2)).to_event(1))
        theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
        mixture = dist.MixtureSameFamily(dist.Categorical(torch.stack([theta, 1 - theta])),
                                         dist.Normal(mu, sigma))
        with pyro.plate("data", len(y)):
            pyro.sample("y", mixture, obs=y)


class HmmDrive(models.HmmDrive):
    """pdb_hmm_drive, plain: the forward algorithm as Stan's loop, ``gamma[t]`` from
    ``gamma[t-1]``."""

    def __call__(self, u, v, alpha, N=None, K=None):
        theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))
        theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))
        phi = pyro.sample("phi", flat(u, constraints.positive_ordered_vector, (2,)))
        lam = pyro.sample("lambda", flat(u, constraints.positive_ordered_vector, (2,)))
        prior = dist.Normal(torch.tensor([0.0, 3.0]), 1.0)
        pyro.factor("phi_prior", prior.log_prob(phi).sum())
        pyro.factor("lambda_prior", prior.log_prob(lam).sum())
        log_theta = torch.log(torch.stack([theta1, theta2]))  # [from j, to k]
        # emission[t, k]: exponential_lpdf(u[t] | phi[k]) + exponential_lpdf(v[t] | lambda[k])
        emission = (torch.log(phi) - phi * u[:, None]) + (torch.log(lam) - lam * v[:, None])
        gamma = emission[0]
        for t in range(1, len(u)):
            gamma = torch.logsumexp(gamma[:, None] + log_theta, dim=0) + emission[t]
        pyro.factor("forward", torch.logsumexp(gamma, dim=0))


# vibench name of the port -> its plain twin
TWINS = {"pdb_kilpisjarvi": Kilpisjarvi, "pdb_earnings": Earnings, "pdb_nes": Nes,
         "pdb_diamonds": Diamonds, "pdb_arma11": Arma11, "pdb_garch11": Garch11,
         "pdb_gauss_mix": GaussMix, "pdb_hmm_drive": HmmDrive}
