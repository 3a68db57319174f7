"""The six hard posteriors as plain Pyro models.

Each model is written the way a user would write it: ``pyro.sample`` statements, a
``pyro.plate`` where there are independent copies, and no trick beyond the usual ``[..., None]``
where a hyperparameter meets a vector (so that the models also run with vectorised ELBO
particles and vectorised posterior draws, which put a batch dimension to the left of the
plates). The data arrive as keyword tensors named as in the posterior's ``data.json`` and
every tensor a model makes takes its data's dtype.

Three of the four analytic targets have no observations: the model's joint density *is* the
target (the generative form of the funnel and of the banana, a ``MultivariateStudentT``), and
the data set holds the target's constants. The mixture is a real posterior: a Normal prior
and one observation through a two-component mixture likelihood, whose posterior is a
two-component Gaussian mixture known in closed form (a ``MixtureSameFamily`` cannot be a latent
site: autoguides and NUTS find no bijection to its support). ``check_references.py``
compares each model's log density with the analytic one.

Each model has ``reference_posterior(**data)`` (see ``reference.reference_posterior``; it
refuses data other than its data.json's) and, where a site's posterior is a known
distribution, ``exact_posterior(**data)``.
"""

from __future__ import annotations

from vibench_hardcases import reference

# The GP's kernel gets this much white noise on its diagonal (variance; a "nugget"), so that
# its Cholesky factor exists in float32, vibench's default dtype, for amplitudes 0.01 to 20
# and lengthscales 0.05 to 100 at the data's inputs (check_references.py tests it; 1e-4 fails
# at amplitude 20). It is part of the model: the NumPyro port that made the reference has it.
GP_JITTER = 1e-3


class _Hard:
    """What every model shares: its posterior's folder and its reference posterior."""

    posterior = ""  # the folder under data/

    def reference_posterior(self, **data):
        """The reference posterior: ``{"params": {name: {"mean", "sd", "q05", "q50", "q95",
        ...}}, "draws": path to draws.npz, "sites": {name: (site, index)}}``. It is the
        posterior of the data in data.json only, and raises ValueError for other data."""
        return reference.reference_posterior(self.posterior, data)


class Funnel10(_Hard):
    """Neal's funnel in 10 dimensions, centred: v ~ Normal(0, 3),
    x[1..9] | v ~ Normal(0, exp(v/2)).
    """

    posterior = "funnel10"

    def __call__(self, v_scale=3.0, dim=10):
        import pyro
        import pyro.distributions as dist
        import torch

        v_scale = torch.as_tensor(v_scale)
        v = pyro.sample("v", dist.Normal(torch.zeros_like(v_scale), v_scale))
        with pyro.plate("dims", int(dim) - 1):
            pyro.sample("x", dist.Normal(torch.zeros_like(v_scale), torch.exp(v / 2)))

    def exact_posterior(self, v_scale=3.0, dim=10):
        """v's marginal is its prior, Normal(0, v_scale); x's marginals are not a named
        distribution (see reference.json)."""
        import pyro.distributions as dist
        import torch

        v_scale = torch.as_tensor(v_scale)
        return {"v": dist.Normal(torch.zeros_like(v_scale), v_scale)}


class Banana(_Hard):
    """Haario's twisted Gaussian (banana) in 2-d: x1 ~ Normal(0, 10),
    x2 | x1 ~ Normal(-b (x1^2 - 100), 1), b = 0.1.
    """

    posterior = "banana"

    def __call__(self, sigma1=10.0, b=0.1):
        import pyro
        import pyro.distributions as dist
        import torch

        sigma1, b = torch.as_tensor(sigma1), torch.as_tensor(b)
        x1 = pyro.sample("x1", dist.Normal(torch.zeros_like(sigma1), sigma1))
        pyro.sample("x2", dist.Normal(-b * (x1 ** 2 - sigma1 ** 2), torch.ones_like(sigma1)))

    def exact_posterior(self, sigma1=10.0, b=0.1):
        """x1's marginal is Normal(0, sigma1); x2's is not a named distribution."""
        import pyro.distributions as dist
        import torch

        sigma1 = torch.as_tensor(sigma1)
        return {"x1": dist.Normal(torch.zeros_like(sigma1), sigma1)}


class Mixture2(_Hard):
    """A 2-d location with a Normal(0, 5) prior seen through a two-component mixture
    likelihood: a two-mode posterior, weights 0.70 and 0.30, modes 8 sds apart.
    """

    posterior = "mixture2"

    def __call__(self, y, prior_scale, weights, offsets, covs):
        import pyro
        import pyro.distributions as dist
        import torch

        theta = pyro.sample("theta", dist.Normal(torch.zeros_like(y), prior_scale).to_event(1))
        # y is theta + offset_k + noise with covariance covs[k], with probability weights[k]
        likelihood = dist.MixtureSameFamily(
            dist.Categorical(probs=weights),
            dist.MultivariateNormal(theta[..., None, :] + offsets, covariance_matrix=covs))
        pyro.sample("y", likelihood, obs=y)

    def exact_posterior(self, y, prior_scale, weights, offsets, covs):
        """theta's posterior: the mixture of the two conjugate (Normal-Normal) posteriors,
        component k with weight proportional to weights[k] N(y - offsets[k]; 0, covs[k] +
        prior_scale^2 I) (computed in float64)."""
        import pyro.distributions as dist
        import torch

        dtype = y.dtype
        y, weights, offsets, covs = (torch.as_tensor(t, dtype=torch.float64)
                                     for t in (y, weights, offsets, covs))
        prior_var = torch.as_tensor(prior_scale, dtype=torch.float64) ** 2
        eye = torch.eye(y.shape[-1], dtype=torch.float64)
        cov = torch.linalg.inv(torch.linalg.inv(covs) + eye / prior_var)
        loc = (cov @ torch.linalg.solve(covs, (y - offsets).unsqueeze(-1))).squeeze(-1)
        logits = weights.log() + dist.MultivariateNormal(
            torch.zeros_like(y), covariance_matrix=covs + prior_var * eye).log_prob(y - offsets)
        return {"theta": dist.MixtureSameFamily(
            dist.Categorical(logits=logits.to(dtype)),
            dist.MultivariateNormal(loc.to(dtype), covariance_matrix=cov.to(dtype)))}


class StudentT(_Hard):
    """A correlated 4-d Student-t with 3 degrees of freedom (heavy tails; finite variance,
    infinite kurtosis).
    """

    posterior = "student_t"

    def __call__(self, df, loc, scale):
        import pyro

        pyro.sample("x", self._student(df, loc, scale))

    def exact_posterior(self, df, loc, scale):
        """x's posterior is the Student-t itself."""
        return {"x": self._student(df, loc, scale)}

    @staticmethod
    def _student(df, loc, scale):
        import pyro.distributions as dist
        import torch

        return dist.MultivariateStudentT(df, loc, scale_tril=torch.linalg.cholesky(scale))


class HierCentred(_Hard):
    """Centred hierarchical logistic regression, 10 groups of 3 to 10 binary outcomes:
    alpha_j ~ Normal(mu, tau), y ~ Bernoulli(logit(alpha[group] + beta x)).
    """

    posterior = "hier_centred"

    def __call__(self, group, x, y, J=None):
        import pyro
        import pyro.distributions as dist

        J = int(group.max()) + 1 if J is None else int(J)
        group = group.long()  # 0-based group of each outcome (vibench hands floats)
        mu = pyro.sample("mu", dist.Normal(y.new_tensor(0.0), 1.5))
        tau = pyro.sample("tau", dist.HalfNormal(y.new_tensor(1.0)))
        beta = pyro.sample("beta", dist.Normal(y.new_tensor(0.0), 1.0))
        with pyro.plate("groups", J):
            alpha = pyro.sample("alpha", dist.Normal(mu, tau))
        with pyro.plate("data", len(y)) as i:
            logits = alpha[..., group[i]] + beta * x[i]
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[i])


class LatentGP(_Hard):
    """Latent Gaussian process, Poisson counts at 20 points:
    f ~ GP(0, amplitude^2 exp(-d^2 / (2 lengthscale^2))), y ~ Poisson(exp(mean + f)).
    """

    posterior = "latent_gp"

    def __call__(self, x, y):
        import pyro
        import pyro.distributions as dist
        import torch

        amplitude = pyro.sample("amplitude", dist.HalfNormal(x.new_tensor(1.5)))
        lengthscale = pyro.sample("lengthscale", dist.InverseGamma(x.new_tensor(4.0), 6.0))
        mean = pyro.sample("mean", dist.Normal(x.new_tensor(0.0), 2.0))
        sq_dist = (x[:, None] - x[None, :]) ** 2
        K = (amplitude[..., None, None] ** 2
             * torch.exp(-0.5 * sq_dist / lengthscale[..., None, None] ** 2)
             + GP_JITTER * torch.eye(len(x), dtype=x.dtype, device=x.device))
        f = pyro.sample("f", dist.MultivariateNormal(torch.zeros_like(x), covariance_matrix=K))
        pyro.sample("y", dist.Poisson(torch.exp(mean[..., None] + f)).to_event(1), obs=y)


class HierLogistic(_Hard):
    """A newcomer's hierarchical logistic regression, written as plain Pyro: 2,000 binary
    outcomes, 5 predictors, an intercept per group (10 groups) around a common one.

    Unlike the other models here it indexes and multiplies as if each site had its own shape
    only (``a[g.index_select(0, ind)]``, ``X @ beta``), so it does not broadcast over a
    leading draws or particles dimension: vibench has to find that out and evaluate draws
    another way (issue 21's newcomer model, as the newcomer wrote it).
    """

    posterior = "hier_logistic"

    def __call__(self, X, g, y):
        import pyro
        import pyro.distributions as dist

        g = g.long()
        mu = pyro.sample("mu", dist.Normal(X.new_tensor(0.0), 2.0))
        sigma = pyro.sample("sigma", dist.HalfNormal(X.new_tensor(1.0)))
        beta = pyro.sample("beta", dist.Normal(X.new_zeros(X.shape[1]), 1.0).to_event(1))
        with pyro.plate("groups", int(g.max()) + 1):
            a = pyro.sample("a", dist.Normal(mu, sigma))
        with pyro.plate("rows", len(y)) as ind:
            logits = a[g.index_select(0, ind)] + X.index_select(0, ind) @ beta
            pyro.sample("y", dist.Bernoulli(logits=logits), obs=y.index_select(0, ind))
