"""A likelihood written as ``pyro.factor`` (an HMM's forward algorithm): the run draws its
densities, and its posterior.nc and plots leave out only the posterior predictive check,
which a factor cannot replicate, with one note saying why."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5netcdf
import pytest
import torch

STATES = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 0, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1] * 3)


def hmm(y):
    """Two hidden states with Normal emissions; the likelihood is the forward algorithm,
    summed over the states in a factor. Broadcasts over leading draw dimensions."""
    import pyro
    import pyro.distributions as dist

    stay = pyro.sample("stay", dist.Beta(torch.full((2,), 4.0), 1.0).to_event(1))
    mu = pyro.sample("mu", dist.Normal(torch.tensor([-1.0, 1.0]), 1.0).to_event(1))
    log_stay, log_move = stay.log(), (-stay).log1p()
    step = torch.stack([torch.stack([log_stay[..., 0], log_move[..., 0]], -1),
                        torch.stack([log_move[..., 1], log_stay[..., 1]], -1)], -2)
    emit = dist.Normal(mu.unsqueeze(-2), 0.5).log_prob(y.unsqueeze(-1))  # [..., t, state]
    alpha = emit[..., 0, :] - torch.log(torch.tensor(2.0))
    for t in range(1, y.shape[-1]):
        alpha = torch.logsumexp(alpha.unsqueeze(-1) + step, -2) + emit[..., t, :]
    pyro.factor("forward", torch.logsumexp(alpha, -1))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[Path, list[str]]:
    """The HMM fitted from the Python API, as a notebook would; its folder and warnings."""
    from workbench import fit

    generator = torch.Generator().manual_seed(0)
    y = (2.0 * STATES - 1.0) * 1.5 + 0.5 * torch.randn(len(STATES), generator=generator)
    out = tmp_path_factory.mktemp("factor") / "hmm"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model=hmm, data={"y": y.tolist()}, guide="auto_normal", loss="elbo",
            optimizer={"name": "adam", "lr": 0.05}, steps=600, out=out, progress=False,
            set={"train.compile": False})
    return out, [str(w.message) for w in caught]


def test_a_factor_likelihood_draws_its_densities_and_says_why_there_is_no_ppc(run):
    out, caught = run
    assert not [w for w in caught if "could not draw the plots" in w], caught
    notes = [w for w in caught if "no posterior predictive check" in w]
    assert notes == ["no posterior predictive check: the model observes nothing but "
                     "pyro.factor site(s) forward, which have no distribution to draw data "
                     "from"]
    plots = {path.name for path in (out / "plots").iterdir()}
    assert plots == {"loss.png", "site-stay.png", "site-mu.png"}


def test_posterior_nc_of_a_factor_likelihood_has_no_predictive_group_and_says_why(run):
    out, _ = run
    with h5netcdf.File(out / "posterior.nc", "r") as file:
        assert set(file.groups) == {"posterior", "sample_stats"}
        assert file.groups["posterior"].variables["mu"].shape == (1, 1000, 2)
        left_out = file.groups["posterior"].attrs["left_out"]
        assert left_out.startswith("pyro.factor site(s) forward in posterior_predictive")
        lp = file.groups["sample_stats"].variables["lp"][...]
    assert lp.shape == (1, 1000) and (lp < -50).all()  # the factor's log density is in lp


def test_the_fit_finds_the_two_states(run):
    """The densities are of a real fit: the two emission means near -1.5 and 1.5 (in either
    order: the states are exchangeable up to their priors)."""
    from workbench import load

    mu = load(run[0], model=hmm).sample(500, seed=1)["mu"].mean(0)
    assert torch.allclose(mu.sort().values, torch.tensor([-1.5, 1.5]), atol=0.3), mu
