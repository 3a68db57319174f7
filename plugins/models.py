"""Default models.

Each model is a class: its ``__init__`` keyword parameters are the model's options, and its
``__call__`` arguments are the recipe's data keys (tensors on the run's device). The
per-datum arguments are indexed with the data plate's indices, so that ``train.batch_size``
can subsample that plate: ``with pyro.plate("data", N) as ind: ... y.index_select(0, ind)``.
A shape that does not fit raises ``ValueError`` naming the argument, which vibench reports
as a bad recipe.
"""

from workbench import hookimpl


@hookimpl
def register_models(register):
    register("beta_bernoulli", BetaBernoulli)
    register("linear_regression", LinearRegression)
    register("logistic_regression", LogisticRegression)
    register("eight_schools", EightSchools)
    register("gaussian_mixture", GaussianMixture)


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

        _vector("flips", flips)
        prior = dist.Beta(torch.full((), float(self.prior_alpha)),
                          torch.full((), float(self.prior_beta)))
        fairness = pyro.sample("latent_fairness", prior)
        with pyro.plate("flips", flips.shape[0]) as ind:
            pyro.sample("obs", dist.Bernoulli(fairness), obs=flips.index_select(0, ind))

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


class LinearRegression:
    """Bayesian linear regression y ~ Normal(intercept + x @ coefficients, noise)."""

    def __init__(self, prior_scale: float = 10.0, noise: float | None = None,
                 noise_prior_scale: float = 5.0):
        if prior_scale <= 0:
            raise ValueError("prior_scale must be > 0")
        if noise is not None and noise <= 0:
            raise ValueError("noise must be > 0 (or null to learn it)")
        if noise_prior_scale <= 0:
            raise ValueError("noise_prior_scale must be > 0")
        self.prior_scale = float(prior_scale)
        self.noise = None if noise is None else float(noise)
        self.noise_prior_scale = float(noise_prior_scale)

    def __call__(self, x, y):
        import pyro
        import pyro.distributions as dist
        import torch

        x = _design("x", x, y)
        intercept, coefficients = _weights(x.shape[1], self.prior_scale)
        if self.noise is None:
            noise = pyro.sample("noise", dist.HalfNormal(torch.full((), self.noise_prior_scale)))
        else:
            noise = self.noise
        with pyro.plate("data", x.shape[0]) as ind:
            mean = intercept + _dot(x.index_select(0, ind), coefficients)
            pyro.sample("obs", dist.Normal(mean, noise), obs=y.index_select(0, ind))

    def exact_posterior(self, x, y):
        """With the noise known, the Normal prior is conjugate: the posterior over
        [intercept, coefficients] is Gaussian (computed in double precision)."""
        if self.noise is not None:
            import pyro.distributions as dist
            import torch

            x = _design("x", x, y)
            dtype = x.dtype
            design = torch.cat([torch.ones(x.shape[0], 1, dtype=torch.float64),
                                x.to(torch.float64)], dim=1)
            precision = (torch.eye(design.shape[1], dtype=torch.float64) / self.prior_scale**2
                         + design.T @ design / self.noise**2)
            covariance = torch.linalg.inv(precision)
            covariance = (covariance + covariance.T) / 2
            mean = covariance @ (design.T @ y.to(torch.float64)) / self.noise**2
            mean, covariance = mean.to(dtype), covariance.to(dtype)
            return {
                "intercept": dist.Normal(mean[0], covariance[0, 0].sqrt()),
                "coefficients": dist.MultivariateNormal(mean[1:], covariance[1:, 1:]),
            }
        return {}


class LogisticRegression:
    """Bayesian logistic regression: y (0 or 1) ~ Bernoulli(logits=intercept + x @ coefficients)."""

    def __init__(self, prior_scale: float = 10.0):
        if prior_scale <= 0:
            raise ValueError("prior_scale must be > 0")
        self.prior_scale = float(prior_scale)

    def __call__(self, x, y):
        import pyro
        import pyro.distributions as dist

        x = _design("x", x, y)
        intercept, coefficients = _weights(x.shape[1], self.prior_scale)
        with pyro.plate("data", x.shape[0]) as ind:
            logits = intercept + _dot(x.index_select(0, ind), coefficients)
            pyro.sample("obs", dist.Bernoulli(logits=logits), obs=y.index_select(0, ind))


class EightSchools:
    """Eight schools, non-centred: y ~ Normal(theta, sigma), sigma known, with each school's
    effect theta = mu + tau * theta_tilde recorded as a deterministic site."""

    def __init__(self, mu_prior_scale: float = 5.0, tau_prior_scale: float = 5.0):
        if mu_prior_scale <= 0 or tau_prior_scale <= 0:
            raise ValueError("mu_prior_scale and tau_prior_scale must be > 0")
        self.mu_prior_scale = float(mu_prior_scale)
        self.tau_prior_scale = float(tau_prior_scale)

    def __call__(self, y, sigma):
        import pyro
        import pyro.distributions as dist
        import torch

        _vector("y", y)
        _vector("sigma", sigma)
        if not torch.jit.is_tracing():  # checked already, on the untraced first run
            if sigma.shape[0] != y.shape[0]:
                raise ValueError(f"y has {y.shape[0]} schools but sigma has {sigma.shape[0]}; "
                                 "give one standard error per school")
            if not (sigma > 0).all():
                index = int((~(sigma > 0)).nonzero()[0, 0])
                raise ValueError(f"sigma[{index}] is {sigma[index].item()}; each school's "
                                 "standard error must be > 0")
        mu = pyro.sample("mu", dist.Normal(torch.zeros(()), self.mu_prior_scale))
        tau = pyro.sample("tau", dist.HalfCauchy(torch.full((), self.tau_prior_scale)))
        with pyro.plate("schools", y.shape[0]) as ind:
            theta_tilde = pyro.sample("theta_tilde", dist.Normal(torch.zeros(()), 1.0))
            theta = pyro.deterministic("theta", mu + tau * theta_tilde, event_dim=0)
            pyro.sample("obs", dist.Normal(theta, sigma.index_select(0, ind)),
                        obs=y.index_select(0, ind))


class GaussianMixture:
    """A 1-D mixture of Normals, assignments summed out: fit it with loss enum_elbo."""

    def __init__(self, num_components: int = 2, prior_scale: float = 10.0,
                 scale: float | None = None, scale_prior_scale: float = 5.0,
                 concentration: float = 1.0):
        if num_components < 1:
            raise ValueError("num_components must be >= 1")
        if prior_scale <= 0:
            raise ValueError("prior_scale must be > 0")
        if scale is not None and scale <= 0:
            raise ValueError("scale must be > 0 (or null to learn it)")
        if scale_prior_scale <= 0:
            raise ValueError("scale_prior_scale must be > 0")
        if concentration <= 0:
            raise ValueError("concentration must be > 0")
        self.num_components = num_components
        self.prior_scale = float(prior_scale)
        self.scale = None if scale is None else float(scale)
        self.scale_prior_scale = float(scale_prior_scale)
        self.concentration = float(concentration)

    def __call__(self, y):
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.ops.indexing import Vindex

        _vector("y", y)
        k = self.num_components
        weights = pyro.sample("weights", dist.Dirichlet(torch.full((k,), self.concentration)))
        with pyro.plate("components", k):
            locs = pyro.sample("locs", dist.Normal(torch.zeros(()), self.prior_scale))
        if self.scale is None:
            scale = pyro.sample("scale", dist.HalfNormal(torch.full((), self.scale_prior_scale)))
        else:
            scale = self.scale
        with pyro.plate("data", y.shape[0]) as ind:
            assignment = pyro.sample("assignment", dist.Categorical(weights),
                                     infer={"enumerate": "parallel"})
            # locs' last dim is its components; the -2 keeps its batch dims (particles) apart
            # from the data plate's, so this works enumerated, vectorised or neither.
            loc = Vindex(locs.unsqueeze(-2))[..., assignment]
            pyro.sample("obs", dist.Normal(loc, scale), obs=y.index_select(0, ind))


def _vector(name, value):
    """Refuse an argument that is not a non-empty 1-D tensor of numbers."""
    import torch

    if torch.jit.is_tracing():  # checked already, on the untraced first run
        return
    if not torch.is_tensor(value):
        raise ValueError(f"{name} must be a list of numbers, not {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name} must be 1-D, a list of numbers; got shape {tuple(value.shape)}")
    if value.shape[0] == 0:
        raise ValueError(f"{name} is empty")


def _design(name, x, y):
    """The regressors as an (N x D) matrix (a 1-D x is one regressor) after checking x and y."""
    import torch

    _vector("y", y)
    if torch.jit.is_tracing():  # checked already, on the untraced first run
        return x if x.dim() == 2 else x.unsqueeze(-1)
    if not torch.is_tensor(x):
        raise ValueError(f"{name} must be a matrix of numbers, not {type(x).__name__}")
    if x.dim() == 1:
        x = x.unsqueeze(-1)
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D, one row of regressors per observation "
                         f"(N x D); got shape {tuple(x.shape)}")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{name} has {x.shape[0]} rows but y has {y.shape[0]} values; give "
                         "one row of x per value of y")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no columns; give at least one regressor")
    return x


def _dot(x, coefficients):
    """x @ coefficients for coefficients with batch dims (vectorised particles) too: those
    dims end with the data plate's, so broadcasting does the work."""
    if coefficients.dim() == 1:
        return x @ coefficients
    if coefficients.shape[-2] == 1:  # one matrix product, not an N x D product held in memory
        flat = coefficients.reshape(-1, coefficients.shape[-1])  # (draws, D): x @ each
        return (flat @ x.mT).reshape(*coefficients.shape[:-2], x.shape[0])
    return (x * coefficients).sum(-1)


def _weights(columns, prior_scale):
    """A regression's intercept and one coefficient per column, each Normal(0, prior_scale)."""
    import pyro
    import pyro.distributions as dist
    import torch

    intercept = pyro.sample("intercept", dist.Normal(torch.zeros(()), prior_scale))
    coefficients = pyro.sample(
        "coefficients", dist.Normal(torch.zeros(columns), prior_scale).to_event(1))
    return intercept, coefficients
