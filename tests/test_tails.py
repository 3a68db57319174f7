"""Heavier-tailed proposals (workbench/report/tails.py) and the pipeline's answer drawn from one
where its Gaussian fits' k-hat says do not trust them (workbench/auto/answer.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from tests.helpers import arviz, fit, one_fit_recipe
from workbench.auto import answer
from workbench.report import posterior, tails

HERE = Path(__file__).resolve()
DF = 5.0
TRUE_SD = math.sqrt(DF / (DF - 2))  # a Student-t's sd, 1.29 at df 5


DIM = 6


def student():
    """A 6-variate Student-t(5): joint tails heavier than any Gaussian's."""
    pyro.sample("x", dist.MultivariateStudentT(DF, torch.zeros(DIM), torch.eye(DIM)))


class Unit(pyro.nn.PyroModule):
    """A fixed N(0, I) guide of ``student``: about the Gaussian a fit of it comes to."""

    def forward(self):
        pyro.sample("x", dist.Normal(torch.zeros(DIM), 1.0).to_event(1))


def weigh(guide) -> dict:
    torch.manual_seed(0)
    with torch.no_grad():
        return posterior.diagnostics(student, guide, {}, 0)


def test_a_defensive_proposal_weighs_what_its_gaussian_cannot():
    gaussian = weigh(Unit())
    assert gaussian["khat"] > 0.7 and "sites" not in gaussian
    unit = [(torch.zeros(DIM, dtype=torch.float64), torch.eye(DIM, dtype=torch.float64))]
    for name in tails.PROPOSALS:
        found = weigh(tails.proposal_guide(student, name, unit))
        assert found["khat"] < 0.5, name
        sd = torch.tensor(found["sites"]["x"]["iw_std"])
        mcse = torch.tensor(found["sites"]["x"]["iw_std_mcse"])
        assert ((sd - TRUE_SD).abs() < 4 * mcse + 0.05).all(), (name, sd, mcse)


def test_a_proposal_is_a_density():
    loc, tril = torch.tensor([0.5], dtype=torch.float64), torch.tensor([[2.0]],
                                                                        dtype=torch.float64)
    grid = torch.linspace(-400, 400, 400_001, dtype=torch.float64)[:, None]
    for name in tails.PROPOSALS:
        mixture = tails.proposal(name, [(loc, tril), (-loc, 0.5 * tril)])
        with torch.device("cpu"):
            density = mixture.log_prob(grid).double().exp()
        assert abs(float(density.sum() * (grid[1] - grid[0])) - 1) < 2e-3, name


def test_the_pipeline_answers_from_a_heavier_tailed_proposal(tmp_path, monkeypatch):
    """The flow stage weighs the proposals first and, one being trusted, trains no flow; the
    answer reuses that weighing (each proposal's guide built once to weigh, once to draw)."""
    built = []
    monkeypatch.setattr(tails, "proposal_guide", lambda *args, make=tails.proposal_guide:
                        built.append(args[1]) or make(*args))
    # 60 steps leave the mean-field Gaussian narrower than the t: its k-hat is over 0.7
    recipe = one_fit_recipe(f"{HERE}:student", 60)
    recipe["auto"]["stages"].insert(1, {"name": "flow", "max_steps": 30})
    summary, path = fit(tmp_path, source=recipe)
    auto, diagnostics = summary["auto"], summary["diagnostics"]
    said = {stage["stage"]: stage["said"] for stage in auto["stages"]}
    assert said["flow"].startswith(f"skipped (k-hat {diagnostics['khats']['mine']:.2f} > 0.7): "
                                   f"the {diagnostics['proposal']['name']} proposal built from "
                                   "1 Gaussian fits has k-hat")
    assert [entry["label"] for entry in auto["fits"]] == ["mine"]
    assert sorted(built) == sorted([*tails.PROPOSALS, diagnostics["proposal"]["name"]])
    assert auto["answer"] == answer.TAILS and auto["used"] == ["mine"]
    assert diagnostics["proposal"]["fits"] == ["mine"] and diagnostics["khat"] <= 0.7
    chosen = diagnostics["proposal"]
    assert chosen["khats"][chosen["name"]] == diagnostics["khat"]
    assert diagnostics["khats"]["mine"] > 0.7 and auto["flags"] == []
    sds = torch.tensor(summary["posterior"]["x"]["std"])
    assert ((sds / TRUE_SD - 1).abs() < 0.2).all()
    drawn = arviz().from_netcdf(path / "posterior.nc").posterior["x"].values.reshape(-1, DIM)
    assert abs(drawn.std(0) / TRUE_SD - 1).max() < 0.3  # 1,000 draws of the same answer


def test_where_no_proposal_is_trusted_the_k_hat_flag_stays_and_says_what_they_gave(tmp_path):
    banana = f"{HERE.parent / 'auto_models.py'}:banana"
    summary, _ = fit(tmp_path, source=one_fit_recipe(banana, 200))
    auto = summary["auto"]
    assert auto["answer"] != answer.TAILS and not auto["trusted"]
    flag = next(flag for flag in auto["flags"] if flag.startswith("k-hat "))
    assert "heavier-tailed proposals from 1 fits: k-hat defensive" in flag
    assert set(summary["diagnostics"]["proposals"]) == set(tails.PROPOSALS)
