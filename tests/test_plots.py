"""Figures: the loss curve and per-site densities are real PNGs of a sensible size, the same
pictures come back as (H, W, 3) uint8 arrays for TensorBoard, and odd inputs do not break
them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from vibench_plugins.models import BetaBernoulli
from workbench.report import plots, posterior

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the PNG header, checking the file is one."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path} is not a PNG"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def check_png(path: Path, image: np.ndarray) -> None:
    width, height = png_size(path)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    assert image.shape[:2] == (height, width)
    assert 300 <= width <= 2500 and 250 <= height <= 800
    assert 10_000 < path.stat().st_size < 1_000_000
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20  # a picture, not a blank


def test_loss_figure(tmp_path: Path):
    torch.manual_seed(0)
    steps = torch.arange(1, 501, dtype=torch.float64)
    losses = (7 + 30 * torch.exp(-steps / 40) + 0.2 * torch.randn(500, dtype=torch.float64))
    path = tmp_path / "loss.png"
    image = plots.loss_figure(losses.tolist(), path)
    check_png(path, image)


@pytest.mark.parametrize("losses", [
    [-3.0 + 0.01 * i for i in range(50)],  # negative: linear axis
    [1e4 / (i + 1) for i in range(300)],  # positive over decades: log axis
    [5.0, float("nan"), 4.0, float("inf")],  # a run that stopped on a non-finite loss
    [2.0],
    [],
])
def test_loss_figure_takes_odd_losses(tmp_path: Path, losses):
    path = tmp_path / "loss.png"
    image = plots.loss_figure(losses, path)
    if losses:
        check_png(path, image)
    else:  # nothing to draw but the axes and a note
        assert png_size(path) == image.shape[1::-1]


def coin_sources(guide_kind: str) -> dict:
    model = BetaBernoulli()
    data = {"flips": torch.tensor([1.0, 1, 1, 1, 1, 1, 0, 0, 0, 0])}
    trace = poutine.trace(model).get_trace(**data)
    sites, nesting = posterior.latent_sites(trace), posterior.plate_nesting(trace)
    if guide_kind == "beta":
        def guide(flips):
            pyro.sample("latent_fairness", dist.Beta(torch.tensor(16.4), torch.tensor(14.2)))
    else:
        def guide(flips):  # AutoNormal's shape: a Delta at the sigmoid of a Normal draw
            u = pyro.sample("u", dist.Normal(torch.tensor(0.13), 0.37),
                            infer={"is_auxiliary": True})
            pyro.sample("latent_fairness", dist.Delta(torch.sigmoid(u)))
    pyro.set_rng_seed(0)
    return posterior.plot_sources(model, guide, data, sites, nesting,
                                  model.exact_posterior(**data))


@pytest.mark.parametrize("shape", ["normal", "skewed", "two modes", "three values"])
def test_kde_is_the_kernel_sum_on_a_plot_s_grid(shape):
    """The density a plot draws (binned draws, smoothed) is the direct sum of Gaussian
    kernels at every grid point, to a thousandth of its peak, the grid inside the draws or
    around them."""
    rng = np.random.default_rng(0)
    draws = {"normal": rng.normal(size=4000), "skewed": rng.lognormal(sigma=1.5, size=4000),
             "two modes": np.r_[rng.normal(-5, 0.1, 2000), rng.normal(5, 1, 2000)],
             "three values": rng.integers(0, 3, 4000).astype(float)}[shape]
    spread = min(draws.std(), (np.quantile(draws, 0.75) - np.quantile(draws, 0.25)) / 1.349)
    bandwidth = spread * draws.size ** (-1 / 5)
    for grid in (np.linspace(*np.quantile(draws, [0.005, 0.995]), plots.GRID),
                 np.linspace(draws.min() - 1, draws.max() + 1, plots.GRID)):
        z = (grid[:, None] - draws[None, :]) / bandwidth
        direct = np.exp(-0.5 * z * z).sum(1) / (draws.size * bandwidth * np.sqrt(2 * np.pi))
        assert np.abs(plots.kde(draws, grid) - direct).max() < 2e-3 * direct.max()


def test_site_figure_for_the_coin(tmp_path: Path):
    """The seed's figure: prior Beta(10, 10), the guide and the exact Beta(16, 14)."""
    beta = coin_sources("beta")["latent_fairness"]
    assert all(isinstance(beta[k], torch.distributions.Beta) for k in ("guide", "prior", "exact"))
    sampled = coin_sources("sampled")["latent_fairness"]
    assert torch.is_tensor(sampled["guide"]) and sampled["guide"].shape == (
        posterior.NUM_PLOT_DRAWS,)
    for name, src in [("beta", beta), ("sampled", sampled)]:
        path = tmp_path / f"{name}.png"
        image = plots.site_figure("latent_fairness", src["guide"], path, prior=src["prior"],
                                  exact=src["exact"])
        check_png(path, image)


def test_site_figure_for_tensor_sites_and_point_masses(tmp_path: Path):
    torch.manual_seed(0)
    exact = dist.MultivariateNormal(torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
                                    torch.diag(torch.full((6,), 0.04)))
    guide = exact.sample((3000,)) * 1.1
    prior = dist.Normal(torch.zeros(6), 10.0).to_event(1)
    path = tmp_path / "vector.png"
    image = plots.site_figure("coefficients", guide, path, prior=prior, exact=exact)
    check_png(path, image)  # six elements: a forest plot, a row each, taller with more rows
    many = plots.site_figure("c", torch.randn(3000, 30), tmp_path / "many.png")
    assert many.shape[0] > 2 * image.shape[0] and many.shape[1] == image.shape[1]

    three = plots.site_figure("b", guide[:, :3], tmp_path / "three.png", exact=None)
    assert three.shape[1] > 2.5 * three.shape[0]  # three panels side by side

    point = torch.full((500, 2, 2), 0.25)  # a point mass over a 2 x 2 site, no exact
    path = tmp_path / "point.png"
    check_png(path, plots.site_figure("w", point, path, prior=dist.HalfCauchy(
        torch.ones(2, 2))))


def test_write_plots_for_a_run(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vibench_plugins.tensorboard_events import EventLog

    sources = coin_sources("beta")
    log = EventLog(tmp_path)
    paths = plots.write_plots(tmp_path, [7.5, 7.2, 7.1], sources, writer=log, step=3)
    log.close()
    assert paths == [tmp_path / "plots" / "loss.png",
                     tmp_path / "plots" / "site-latent_fairness.png"]
    assert all(png_size(p) for p in paths)
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["Plots/latent_fairness", "Plots/loss"]
    image = events.Images("Plots/loss")[0]
    assert image.step == 3 and image.width > 100 and image.height > 100


def test_a_gaussian_autoguide_s_marginal_is_drawn_from_its_density_inside_the_support():
    from pyro.infer.autoguide import AutoMultivariateNormal, AutoNormal

    def model():
        pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        pyro.sample("w", dist.Normal(0.0, 1.0).expand([3]).to_event(1))

    for kind in (AutoNormal, AutoMultivariateNormal):
        pyro.clear_param_store()
        guide = kind(model)
        guide()
        scale = posterior.guide_marginal(guide, "scale")
        assert plots._bounds(scale) == (0.0, None)
        grid = np.linspace(1e-4, 60, 200_000)
        density = plots._marginal_density(scale, 0, grid, torch)
        assert np.trapezoid(density, grid) == pytest.approx(1.0, abs=1e-3)
        assert tuple(posterior.guide_marginal(guide, "w").batch_shape) == (3,)
    pyro.clear_param_store()


def binary_data(slope_fit: float, slope_true: float = 3.0, size: int = 500, draws: int = 400,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Observations of a logistic trend in x with slope ``slope_true``, and replicates from
    a fit with slope ``slope_fit`` (draws first)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=size)
    observed = (rng.random(size) < 1 / (1 + np.exp(-slope_true * x))).astype(float)
    fitted = 1 / (1 + np.exp(-slope_fit * x))
    return observed, (rng.random((draws, size)) < fitted).astype(float)


def rates_outside(observed: np.ndarray, replicated: np.ndarray) -> int:
    """Bins of predicted probability whose observed rate of ones is outside the replicated
    rates' 90% range."""
    _, seen, (low, _, high) = plots._binned_rates(observed, replicated,
                                                  *plots._rate_bins(replicated))
    return int(((seen < low) | (seen > high)).sum())


def test_binary_ppc_bins_values_by_predicted_probability(tmp_path: Path):
    """Binary data with a trend get a calibration panel beside the number of ones: a fit that
    flattens the trend has the same number of ones but misses the rate of ones in most bins
    of predicted probability; the right fit misses few (each bin's range holds 90%).
    Exchangeable replicates (a coin's) get the count alone."""
    observed, right = binary_data(slope_fit=3.0)
    _, flat = binary_data(slope_fit=0.7)
    assert len(plots._rate_bins(right)[0]) == 500
    assert rates_outside(observed, right) <= 3
    assert rates_outside(observed, flat) >= 6

    wide = plots.ppc_figure({"obs": {"observed": observed, "replicated": flat,
                                     "discrete": True}}, tmp_path / "trend.png")
    check_png(tmp_path / "trend.png", wide)
    flips = np.random.default_rng(1).random((400, 500)) < 0.6
    assert plots._rate_bins(flips.astype(float)) is None
    narrow = plots.ppc_figure({"obs": {"observed": observed, "replicated": flips,
                                       "discrete": True}}, tmp_path / "coin.png")
    check_png(tmp_path / "coin.png", narrow)
    assert narrow.shape[1] < 700 < 1000 < wide.shape[1]  # one panel, and two
