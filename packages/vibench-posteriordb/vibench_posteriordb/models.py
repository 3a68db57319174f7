"""The eight Stan programs as Pyro models.

Each model reproduces its Stan program's log density up to a constant, with Stan's parameter
names as site names (GARCH's ``beta1`` is a deterministic site, computed from the latent
``beta1_unit``: see ``Garch11``):

- a parameter with a ``~`` statement or ``target +=`` prior gets that distribution, over the
  parameter's declared support (a Stan prior on a constrained parameter is the distribution
  restricted to it, so ``sigma ~ normal(0, 2)`` with ``<lower=0>`` is a HalfNormal up to a
  constant);
- a parameter without one has Stan's implicit flat prior over its declared support: an
  ``ImproperUniform`` site with that support (``flat.FlatPrior``, which can also draw a
  starting point), which autoguides and NUTS map to unconstrained space with the matching
  bijection (exp for positive, sigmoid for (0, 1), Pyro's ordered transforms);
- a constrained parameter whose prior is not a Pyro distribution with the right support (an
  ordered vector with Normal priors) is such a flat site plus a ``pyro.factor`` with the
  prior's log density.

Data arrive as keyword tensors named as in the posterior's ``data.json``; sizes (``N``,
``T``, ``K``) are optional and, when given, checked against the data (they arrive as float
tensors). Every tensor a model makes takes the dtype and device of its data, so a model runs
in float32 or float64 as its data do. Parameters may carry batch dimensions to the left of
the data plate (vectorised ELBO particles, a plate of draws), so the models index their last
dimensions only.

Each model has ``reference_posterior(**data)`` (see ``reference.reference_posterior``) and
``latent_values(values)``, which turns Stan-named values into values for the model's latent
sample sites (for ``poutine.condition``).
"""

from __future__ import annotations

from vibench_posteriordb import reference


class _Port:
    """What every port shares: its posterior's name, and the map from Stan's names to sites."""

    posterior = ""  # posteriordb's name, the folder under data/
    rename: dict[str, str] = {}  # Stan parameter name -> site name, where they differ

    def reference_posterior(self, **data):
        """The reference posterior of the Stan program: ``{"params": {stan_name: {"mean",
        "sd", "q05", "q50", "q95"}}, "draws": path to draws.npz, "sites": {stan_name:
        (site, index)}}``. It does not depend on the data, which it accepts for symmetry with
        the model's call."""
        return reference.reference_posterior(self.posterior, self.rename)

    def latent_values(self, values: dict, dtype=None) -> dict:
        """Stan name -> value (any batch shape) to the model's latent sample sites' values."""
        sites = reference.site_map(values, self.rename)
        return reference.to_sites(values, sites, dtype)


class Kilpisjarvi(_Port):
    """posteriordb kilpisjarvi_mod-kilpisjarvi: summer temperature on year, Normal priors on alpha
    and beta."""

    posterior = "kilpisjarvi_mod-kilpisjarvi"

    def __call__(self, x, y, pmualpha, psalpha, pmubeta, psbeta, N=None, xpred=None):
        import pyro
        import pyro.distributions as dist
        from pyro.distributions import constraints

        _vectors("N", N, x=x, y=y)
        alpha = pyro.sample("alpha", dist.Normal(_like(y, pmualpha), _like(y, psalpha)))
        beta = pyro.sample("beta", dist.Normal(_like(y, pmubeta), _like(y, psbeta)))
        sigma = pyro.sample("sigma", _flat(y, constraints.positive))  # no prior: flat on (0, inf)
        with pyro.plate("data", y.shape[0]) as ind:
            pyro.sample("y", dist.Normal(alpha + beta * x.index_select(0, ind), sigma),
                        obs=y.index_select(0, ind))


class Earnings(_Port):
    """posteriordb earnings-logearn_interaction: log earnings on height, sex and their interaction,
    flat priors."""

    posterior = "earnings-logearn_interaction"

    def __call__(self, earn, height, male, N=None):
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        _vectors("N", N, earn=earn, height=height, male=male)
        if not torch.jit.is_tracing() and not (earn > 0).all():
            raise ValueError("earn must be > 0: the model regresses log(earn)")
        design = torch.stack([torch.ones_like(height), height, male, height * male], dim=-1)
        beta = pyro.sample("beta", _flat(earn, constraints.real, (4,)))
        sigma = pyro.sample("sigma", _flat(earn, constraints.positive))
        with pyro.plate("data", earn.shape[0]) as ind:
            mean = _dot(design.index_select(0, ind), beta)
            pyro.sample("log_earn", dist.Normal(mean, sigma), obs=earn.index_select(0, ind).log())


class Nes(_Port):
    """posteriordb nes2000-nes: party identification on ideology, race, age group, education,
    gender and income."""

    posterior = "nes2000-nes"

    def __call__(self, partyid7, real_ideo, race_adj, educ1, gender, income, age_discrete,
                 N=None, year=None):
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        _vectors("N", N, partyid7=partyid7, real_ideo=real_ideo, race_adj=race_adj,
                 educ1=educ1, gender=gender, income=income, age_discrete=age_discrete)
        age = age_discrete.round()  # age as a factor: 1 (the baseline), 2, 3 or 4
        design = torch.stack([
            torch.ones_like(partyid7), real_ideo, race_adj,
            (age == 2).to(partyid7.dtype), (age == 3).to(partyid7.dtype),
            (age == 4).to(partyid7.dtype), educ1, gender, income,
        ], dim=-1)
        beta = pyro.sample("beta", _flat(partyid7, constraints.real, (9,)))
        sigma = pyro.sample("sigma", _flat(partyid7, constraints.positive))
        with pyro.plate("data", partyid7.shape[0]) as ind:
            mean = _dot(design.index_select(0, ind), beta)
            pyro.sample("partyid7", dist.Normal(mean, sigma), obs=partyid7.index_select(0, ind))


class Diamonds(_Port):
    """posteriordb diamonds-diamonds: log price on 24 centred predictors (brms), Student-t priors
    on Intercept and sigma."""

    posterior = "diamonds-diamonds"

    def __call__(self, Y, X, N=None, K=None, prior_only=0):
        import pyro
        import pyro.distributions as dist
        import torch

        _vectors("N", N, Y=Y)
        if not torch.jit.is_tracing():
            if X.dim() != 2 or X.shape[0] != Y.shape[0] or X.shape[1] < 2:
                raise ValueError(f"X must be N x K with N = len(Y) = {Y.shape[0]} and K >= 2 "
                                 f"(an intercept column and predictors); got shape "
                                 f"{tuple(X.shape)}")
            if K is not None and int(K) != X.shape[1]:
                raise ValueError(f"K is {int(K)} but X has {X.shape[1]} columns")
        # brms's transformed data: the predictors without X's intercept column, centred.
        Xc = X[:, 1:] - X[:, 1:].mean(0)
        b = pyro.sample("b", dist.Normal(torch.zeros_like(Xc[0]), 1.0).to_event(1))
        intercept = pyro.sample("Intercept", dist.StudentT(_like(Y, 3.0), _like(Y, 8.0), 10.0))
        # student_t(3, 0, 10) on sigma > 0, normalised by its lccdf(0): a half Student-t.
        sigma = pyro.sample("sigma", dist.FoldedDistribution(
            dist.StudentT(_like(Y, 3.0), _like(Y, 0.0), 10.0)))
        if not bool(prior_only):
            with pyro.plate("data", Y.shape[0]) as ind:
                mean = intercept + _dot(Xc.index_select(0, ind), b)
                pyro.sample("Y", dist.Normal(mean, sigma), obs=Y.index_select(0, ind))


class Arma11(_Port):
    """posteriordb arma-arma11: ARMA(1, 1) time series, the first error taken as zero."""

    posterior = "arma-arma11"

    def __call__(self, y, T=None):
        import pyro
        import pyro.distributions as dist
        import torch

        _vectors("T", T, y=y)
        mu = pyro.sample("mu", dist.Normal(_like(y, 0.0), 10.0))
        phi = pyro.sample("phi", dist.Normal(_like(y, 0.0), 2.0))
        theta = pyro.sample("theta", dist.Normal(_like(y, 0.0), 2.0))
        sigma = pyro.sample("sigma", dist.HalfCauchy(_like(y, 2.5)))  # cauchy(0, 2.5) on > 0
        mu, phi, sigma = mu.unsqueeze(-1), phi.unsqueeze(-1), sigma.unsqueeze(-1)
        # err[t] = y[t] - mu - phi * y[t-1] - theta * err[t-1], with y[0] := mu and err[0] := 0
        previous = torch.cat([mu, y[:-1].expand(mu.shape[:-1] + (y.shape[0] - 1,))], dim=-1)
        err = _linear_recurrence(y - mu - phi * previous, -theta)
        nu = y - err  # Stan's prediction nu[t] = mu + phi * y[t-1] + theta * err[t-1]
        pyro.sample("y", dist.Normal(nu, sigma).to_event(1), obs=y)  # err ~ normal(0, sigma)


class Garch11(_Port):
    """posteriordb garch-garch11: GARCH(1, 1) volatility, flat priors, beta1 < 1 - alpha1.

    Stan's ``beta1`` has the bound ``(0, 1 - alpha1)``, which depends on ``alpha1``; an
    autoguide (or NUTS) fixes each site's bijection from its support when it first traces
    the model, so ``beta1`` cannot be a site with that support. The latent site is
    ``beta1_unit`` in (0, 1), ``beta1 = beta1_unit * (1 - alpha1)`` is a deterministic
    site, and the factor ``beta1_jacobian`` adds log(1 - alpha1), the log-Jacobian of
    ``beta1_unit -> beta1``, so that the density over (alpha1, beta1) is Stan's: flat over
    0 < alpha1 < 1, 0 < beta1 < 1 - alpha1.
    """

    posterior = "garch-garch11"

    def __call__(self, y, sigma1, T=None):
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        _vectors("T", T, y=y)
        mu = pyro.sample("mu", _flat(y, constraints.real))
        alpha0 = pyro.sample("alpha0", _flat(y, constraints.positive))
        alpha1 = pyro.sample("alpha1", _flat(y, constraints.unit_interval))
        beta1_unit = pyro.sample("beta1_unit", _flat(y, constraints.unit_interval))
        beta1 = pyro.deterministic("beta1", beta1_unit * (1 - alpha1))
        pyro.factor("beta1_jacobian", torch.log1p(-alpha1))
        mu, alpha0, alpha1 = mu.unsqueeze(-1), alpha0.unsqueeze(-1), alpha1.unsqueeze(-1)
        # sigma[t]^2 = alpha0 + alpha1 * (y[t-1] - mu)^2 + beta1 * sigma[t-1]^2, sigma[1] = sigma1
        start = (sigma1 * sigma1).expand(alpha0.shape)
        shock = alpha0 + alpha1 * (y[:-1] - mu) ** 2
        variance = _linear_recurrence(torch.cat([start, shock], dim=-1), beta1)
        pyro.sample("y", dist.Normal(mu, variance.sqrt()).to_event(1), obs=y)

    def latent_values(self, values: dict, dtype=None) -> dict:
        """Stan's (mu, alpha0, alpha1, beta1) to the sites (mu, alpha0, alpha1, beta1_unit)."""
        import torch

        sites = super().latent_values({k: v for k, v in values.items() if k != "beta1"}, dtype)
        sites["beta1_unit"] = torch.as_tensor(values["beta1"], dtype=dtype) / (1 - sites["alpha1"])
        return sites


class GaussMix(_Port):
    """posteriordb low_dim_gauss_mix-low_dim_gauss_mix: two-component 1-D Gaussian mixture with
    ordered means."""

    posterior = "low_dim_gauss_mix-low_dim_gauss_mix"

    def __call__(self, y, N=None):
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        _vectors("N", N, y=y)
        mu = pyro.sample("mu", _flat(y, constraints.ordered_vector, (2,)))
        pyro.factor("mu_prior", dist.Normal(_like(y, 0.0), 2.0).log_prob(mu).sum(-1))
        sigma = pyro.sample("sigma", dist.HalfNormal(_like(y, 2.0)).expand([2]).to_event(1))
        theta = pyro.sample("theta", dist.Beta(_like(y, 5.0), _like(y, 5.0)))
        # log_mix(theta, normal(y | mu[1], sigma[1]), normal(y | mu[2], sigma[2])): the
        # component labels summed out.
        # A MixtureSameFamily(Categorical, Normal), with a log density quick over many draws.
        from vibench_posteriordb.mixture import NormalMixture

        probs = torch.stack([theta, 1 - theta], dim=-1)
        with pyro.plate("data", y.shape[0]) as ind:
            pyro.sample("y", NormalMixture(probs, mu, sigma), obs=y.index_select(0, ind))


class HmmDrive(_Port):
    """posteriordb bball_drive_event_0-hmm_drive_0: two-state HMM with exponential emissions,
    states summed out."""

    posterior = "bball_drive_event_0-hmm_drive_0"

    def __call__(self, u, v, alpha, N=None, K=None):
        import pyro
        import pyro.distributions as dist
        import torch
        from pyro.distributions import constraints

        _vectors("N", N, u=u, v=v)
        if not torch.jit.is_tracing():
            if (K is not None and int(K) != 2) or tuple(alpha.shape) != (2, 2):
                raise ValueError("the program has two states: K must be 2 and alpha 2 x 2, "
                                 f"got K={K if K is None else int(K)} and alpha of shape "
                                 f"{tuple(alpha.shape)}")
        theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0]))  # transitions from state 1
        theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1]))  # and from state 2
        phi = pyro.sample("phi", _flat(u, constraints.positive_ordered_vector, (2,)))
        lam = pyro.sample("lambda", _flat(u, constraints.positive_ordered_vector, (2,)))
        prior = dist.Normal(torch.stack([_like(u, 0.0), _like(u, 3.0)]), 1.0)
        pyro.factor("phi_prior", prior.log_prob(phi).sum(-1))
        pyro.factor("lambda_prior", prior.log_prob(lam).sum(-1))
        # emission[..., t, k] = exponential_lpdf(u[t] | phi[k]) + exponential_lpdf(v[t] | lambda[k])
        emission = (phi.log().unsqueeze(-2) - phi.unsqueeze(-2) * u.unsqueeze(-1)
                    + lam.log().unsqueeze(-2) - lam.unsqueeze(-2) * v.unsqueeze(-1))
        log_theta = torch.stack([theta1, theta2], dim=-2).log()  # [..., j, k]: from j to k
        # The forward algorithm: gamma[t, k] = log_sum_exp_j(gamma[t-1, j] + log theta[j, k])
        # + emission[t, k], gamma[1] = emission[1], and the likelihood log_sum_exp(gamma[N]).
        # Each step is a (log, +) matrix product, so gamma[N] = gamma[1] * step[2] * ... *
        # step[N]; the steps are multiplied pairwise (depth log2 N for autograd and compile,
        # log2 N roundings), or, for many draws (a report's), one by one in float64, where N
        # roundings stay far below what the numbers mean: O(N) per draw, not O(N) tensors of
        # draws x 8 for a logsumexp each.
        if emission[..., 0, :].numel() > emission.shape[-2]:
            gamma = _forward_loop(emission.double(), log_theta.double()).to(emission.dtype)
        else:
            steps = log_theta.unsqueeze(-3) + emission[..., 1:, :].unsqueeze(-2)
            gamma = _log_vecmat(emission[..., 0, :], _log_matmul_chain(steps))
        pyro.factor("forward", torch.logsumexp(gamma, dim=-1))


def _flat(like, constraint, event_shape=()):
    """Stan's implicit flat prior over a declared support: an ImproperUniform that can give a
    starting point (see ``flat.FlatPrior``), in the dtype and device of ``like``."""
    from vibench_posteriordb.flat import FlatPrior

    return FlatPrior.over(constraint, event_shape, like=like)


def _like(reference, value):
    """``value`` as a tensor with ``reference``'s dtype and device."""
    import torch

    return torch.as_tensor(value, dtype=reference.dtype, device=reference.device)


def _dot(design, coefficients):
    """design (N x D) @ coefficients, where coefficients may have batch dims that end with the
    data plate's (vectorised particles): broadcasting then does the work."""
    if coefficients.dim() == 1:
        return design @ coefficients
    if coefficients.shape[-2] == 1:  # one matrix product, not an N x D product held in memory
        flat = coefficients.reshape(-1, coefficients.shape[-1])  # (draws, D): design @ each
        return (flat @ design.mT).reshape(*coefficients.shape[:-2], design.shape[0])
    return (design * coefficients).sum(-1)


def _linear_recurrence(c, a):
    """x[..., 0] = c[..., 0] and x[..., t] = c[..., t] + a * x[..., t-1], for all t at once
    (batch dims of a go with c's): a scan by doubling (Hillis and Steele), whose k-th pass
    adds a^(2^k) times x shifted by 2^k, so x[t] sums a^(t-s) c[s] over s <= t in
    log2(n) passes of whole-vector arithmetic (exact at a = 0, gradients included). Over
    many draws (a report's) a loop over t is cheaper: O(n) per draw, not O(n log n)."""
    import torch

    n = c.shape[-1]
    if c[..., 0].numel() > n:
        xs = [c[..., 0]]
        for t in range(1, n):
            xs.append(c[..., t] + a * xs[-1])
        return torch.stack(xs, -1)
    x, power, shift = c, a.unsqueeze(-1), 1
    while shift < n:
        x = torch.cat([x[..., :shift], x[..., shift:] + power * x[..., :-shift]], -1)
        power, shift = power * power, 2 * shift
    return x


def _log_matmul(a, b):
    """The (log, +) matrix product: log(exp(a) @ exp(b)), computed with logsumexp."""
    import torch

    return torch.logsumexp(a.unsqueeze(-1) + b.unsqueeze(-3), dim=-2)


def _log_vecmat(x, m):
    """log(exp(x) @ exp(m)) for a row vector x."""
    return _log_matmul(x.unsqueeze(-2), m).squeeze(-2)


def _log_matmul_chain(m):
    """The (log, +) product m[..., 0, :, :] * m[..., 1, :, :] * ... in order, pairwise."""
    import torch

    while m.shape[-3] > 1:
        n = m.shape[-3]
        even = n - n % 2
        product = _log_matmul(m[..., 0:even:2, :, :], m[..., 1:even:2, :, :])
        m = torch.cat([product, m[..., even:, :, :]], dim=-3) if n % 2 else product
    return m.squeeze(-3)


def _forward_loop(emission, log_theta):
    """The two-state forward algorithm one step at a time: gamma[t, k] = log(exp(gamma[t-1, 0]
    + log theta[0, k]) + exp(gamma[t-1, 1] + log theta[1, k])) + emission[t, k], with time
    first in memory so each step reads one contiguous slice."""
    import torch

    by_time = emission.movedim(-2, 0).contiguous()
    from_first, from_second = log_theta[..., 0, :], log_theta[..., 1, :]
    gamma = by_time[0]
    for emitted in by_time[1:]:
        gamma = torch.logaddexp(gamma[..., 0:1] + from_first,
                                gamma[..., 1:2] + from_second) + emitted
    return gamma


def _vectors(size_name, size, **vectors):
    """Each of ``vectors`` must be a 1-D tensor, all of one length, which ``size`` (N or T,
    a float tensor when given) must equal."""
    import torch

    if torch.jit.is_tracing():  # checked already, on the untraced first run
        return
    length = None
    for name, value in vectors.items():
        if not torch.is_tensor(value) or value.dim() != 1 or value.shape[0] == 0:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"{name} must be a non-empty list of numbers, got {shape}")
        if length is not None and value.shape[0] != length[1]:
            raise ValueError(f"{name} has {value.shape[0]} values but {length[0]} has "
                             f"{length[1]}; they must be equally long")
        length = length or (name, value.shape[0])
    if size is not None and int(size) != length[1]:
        raise ValueError(f"{size_name} is {int(size)} but {length[0]} has {length[1]} values")
