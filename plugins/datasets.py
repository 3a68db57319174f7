"""Default data sets: synthetic data with known true values for each default model, and the
eight schools data.

A recipe names one under ``data: {dataset: {name: synthetic_regression, n: 1000}}``. Each
synthetic data set draws from its own ``torch.Generator`` seeded by its ``seed`` option, on
the CPU, so the data are the same on every device and whatever the run's seed; they are
float32 tensors (vibench moves them to the run's device).
"""

from workbench import hookimpl


@hookimpl
def register_datasets(register):
    register("synthetic_coin", synthetic_coin)
    register("synthetic_regression", synthetic_regression)
    register("synthetic_classification", synthetic_classification)
    register("synthetic_mixture", synthetic_mixture)
    register("synthetic_schools", synthetic_schools)
    register("eight_schools", eight_schools)


def synthetic_coin(n: int = 100, p: float = 0.3, seed: int = 0):
    """Synthetic coin flips (1 heads, 0 tails) with heads probability p, for beta_bernoulli."""
    _size("n", n)
    if not 0 <= p <= 1:
        raise ValueError(f"p must be in [0, 1], got {p}")
    rng = _generator(seed)
    return {"flips": (_uniform(rng, n) < p).float()}


def synthetic_regression(n: int = 200, coefficients: list[float] = [1.5, -2.0, 0.5],  # noqa: B006 (shown by vibench list; never changed)
                         intercept: float = 1.0, noise: float = 0.5, seed: int = 0):
    """Synthetic linear-regression data x, y with known coefficients, intercept and noise.

    x ~ Normal(0, 1), n x len(coefficients);
    y = intercept + x @ coefficients + noise * Normal(0, 1).
    """
    _size("n", n)
    _nonempty("coefficients", coefficients)
    if noise < 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    rng = _generator(seed)
    x = _normal(rng, n, len(coefficients))
    y = intercept + _linear(x, coefficients) + noise * _normal(rng, n)
    return {"x": x, "y": y}


def synthetic_classification(n: int = 500, coefficients: list[float] = [2.0, -1.0],  # noqa: B006 (shown by vibench list; never changed)
                             intercept: float = 0.5, seed: int = 0):
    """Synthetic logistic-regression data x, y (0 or 1) with known coefficients and intercept.

    x ~ Normal(0, 1), n x len(coefficients); y ~ Bernoulli(sigmoid(intercept + x @ coefficients)).
    """
    import torch

    _size("n", n)
    _nonempty("coefficients", coefficients)
    rng = _generator(seed)
    x = _normal(rng, n, len(coefficients))
    logits = intercept + _linear(x, coefficients)
    return {"x": x, "y": (_uniform(rng, n) < torch.sigmoid(logits)).float()}


def synthetic_mixture(n: int = 500, locs: list[float] = [-3.0, 3.0],  # noqa: B006 (shown by vibench list; never changed)
                      weights: list[float] | None = None, scale: float = 1.0, seed: int = 0):
    """Synthetic mixture data y: n draws from Normal(locs[k], scale), k picked by weights.

    The weights are equal by default, and normalised.
    """
    import torch

    _size("n", n)
    _nonempty("locs", locs)
    if weights is None:
        weights = [1.0] * len(locs)
    if len(weights) != len(locs):
        raise ValueError(f"weights has {len(weights)} values but locs has {len(locs)}; give one "
                         "weight per component")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    if scale < 0:
        raise ValueError(f"scale must be >= 0, got {scale}")
    rng = _generator(seed)
    cumulative = torch.tensor(weights, dtype=torch.float64, device="cpu").cumsum(0)
    cumulative = (cumulative / cumulative[-1]).float()
    component = torch.searchsorted(cumulative, _uniform(rng, n), right=True)
    component = component.clamp(max=len(locs) - 1)  # float rounding at the top end
    centres = torch.tensor([float(v) for v in locs], device="cpu")
    return {"y": centres[component] + scale * _normal(rng, n)}


def synthetic_schools(schools: int = 100, mu: float = 5.0, tau: float = 2.0,
                      sigma: float = 1.0, seed: int = 0):
    """Synthetic schools y, sigma: theta ~ Normal(mu, tau), y ~ Normal(theta, sigma)."""
    import torch

    _size("schools", schools)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    rng = _generator(seed)
    theta = mu + tau * _normal(rng, schools)
    return {"y": theta + sigma * _normal(rng, schools),
            "sigma": torch.full((schools,), float(sigma), device="cpu")}


def eight_schools():
    """The eight schools: coaching effects y and their standard errors sigma (Rubin 1981).

    From posteriordb's eight_schools data.
    """
    import json
    from importlib.resources import files

    text = (files(__package__) / "data" / "eight_schools.json").read_text(encoding="utf-8")
    content = json.loads(text)
    return {"y": [float(v) for v in content["y"]], "sigma": [float(v) for v in content["sigma"]]}


def _generator(seed):
    import torch

    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return torch.Generator(device="cpu").manual_seed(seed)


def _normal(rng, *shape):
    import torch

    return torch.randn(*shape, generator=rng, dtype=torch.float32, device="cpu")


def _uniform(rng, n):
    import torch

    return torch.rand(n, generator=rng, dtype=torch.float32, device="cpu")


def _linear(x, coefficients):
    import torch

    return x @ torch.tensor([float(c) for c in coefficients], dtype=x.dtype, device="cpu")


def _size(name, value):
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _nonempty(name, values):
    if not values:
        raise ValueError(f"{name} must list at least one value")
