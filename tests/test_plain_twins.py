"""Plain-Pyro twins of every shipped model (tests/plain_models.py) and of the posteriordb ports
(tests/plain_ports.py), written for one draw: vibench finds each does not broadcast over a
leading dimension of draws, each has its model's log density, and the automatic pipeline
fits each from a recipe that names only the model and the data (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pyro import poutine

from tests.helpers import REPO, setup, vibench

PLAIN, PORTS = REPO / "tests" / "plain_models.py", REPO / "tests" / "plain_ports.py"

# twin: (its file and name, the shipped model, its data as a recipe names them, its loss)
SHIPPED = {
    "logistic": (f"{PLAIN}:logistic", "logistic_regression",
                 {"dataset": {"name": "synthetic_classification", "n": 500}}, "elbo"),
    "eight_schools": (f"{PLAIN}:eight_schools", "eight_schools",
                      {"dataset": {"name": "eight_schools"}}, "elbo"),
    "gaussian_mixture": (f"{PLAIN}:gaussian_mixture", "gaussian_mixture",
                         {"dataset": {"name": "synthetic_mixture", "n": 200}}, "enum_elbo"),
}
PORTED = {  # twin: its port's name, which names its data set too
    "kilpisjarvi": "pdb_kilpisjarvi", "earnings": "pdb_earnings", "nes": "pdb_nes",
    "diamonds": "pdb_diamonds", "arma11": "pdb_arma11", "garch11": "pdb_garch11",
    "gauss_mix": "pdb_gauss_mix", "hmm_drive": "pdb_hmm_drive",
}
DETERMINISTIC = {"eight_schools": {"theta"}, "garch11": {"beta1"}}  # sites with no density plot


def twin_of(case: str) -> tuple[str, str, dict, str]:
    """The twin's recipe name, its model's registered name, the data and the loss."""
    if case in SHIPPED:
        return SHIPPED[case]
    from tests import plain_ports

    port = PORTED[case]
    return (f"{PORTS}:{plain_ports.TWINS[port].__name__}", port, {"dataset": {"name": port}},
            "elbo")


@pytest.mark.parametrize("case", [*SHIPPED, *PORTED])
def test_vibench_finds_that_a_plain_twin_does_not_broadcast(case: str):
    """The run's set-up notes say the model does not broadcast, at a line of its own file,
    and that the report evaluates its draws another way."""
    name, _, data, loss = twin_of(case)
    run = setup(source={"model": {"name": name}, "data": data, "guide": {"name": "auto_normal"},
                        "loss": {"name": loss}, "optimizer": {"name": "adam", "lr": 0.01},
                        "loggers": [], "train": {"steps": 1, "eval_every": 0}})
    file = Path(name.split(":")[0]).name
    assert run.notes and run.notes[0].startswith(
        f"model {name!r} does not broadcast over a leading dimension of draws: {file}:"
    ), run.notes
    assert "the report" in run.notes[1], run.notes


def values_at(trace: poutine.Trace) -> dict:
    """The latent sample sites' values of a trace."""
    return {name: site["value"] for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]
            and not site["infer"].get("_deterministic")}


def log_joint(model, data: dict, values: dict) -> torch.Tensor:
    return poutine.trace(poutine.condition(model, values)).get_trace(**data).log_prob_sum()


def registered(kind: str, name: str):
    from workbench.plugins.registry import get_registry

    return get_registry().get(kind, name)


@pytest.mark.parametrize("case", list(SHIPPED))
def test_a_shipped_models_twin_has_its_log_density(case: str, float64):
    """At prior draws of the shipped model (every latent site, the mixture's assignments
    too), the twin's log joint density is the model's."""
    import pyro

    from tests import plain_models

    _, model_name, data, _ = SHIPPED[case]
    model = registered("model", model_name).build({})
    dataset = data["dataset"]
    arrays = registered("dataset", dataset["name"]).build(
        {k: v for k, v in dataset.items() if k != "name"})
    data = {key: torch.as_tensor(value, dtype=torch.float64) for key, value in arrays.items()}
    twin = getattr(plain_models, case)
    for seed in range(5):
        pyro.set_rng_seed(seed)
        trace = poutine.trace(model).get_trace(**data)
        expected = trace.log_prob_sum()
        assert torch.isclose(log_joint(twin, data, values_at(trace)), expected,
                             rtol=1e-12, atol=1e-9), (seed, expected)


@pytest.mark.parametrize("case", list(PORTED))
def test_a_ports_twin_has_its_log_density(case: str, float64):
    """At reference draws (two from each of the ten chains), the twin's log joint density
    is the port's."""
    from vibench_posteriordb import plugin, reference

    from tests import plain_ports

    port = plugin.MODELS[PORTED[case]]()
    data = {key: torch.as_tensor(value, dtype=torch.float64)
            for key, value in reference.load_data(port.posterior).items()}
    draws = reference.load_draws(port.posterior)
    twin = plain_ports.TWINS[PORTED[case]]()
    for i in range(7, 10_000, 500):
        values = port.latent_values({k: float(v[i]) for k, v in draws.items()}, torch.float64)
        expected = log_joint(port, data, values)
        assert torch.isclose(log_joint(twin, data, values), expected, rtol=1e-12,
                             atol=1e-9), (i, expected)


@pytest.mark.slow
@pytest.mark.parametrize("case", [*PORTED, *SHIPPED])
def test_the_automatic_pipeline_fits_a_plain_twin(tmp_path: Path, case: str):
    """A recipe naming only the twin and its data: the pipeline completes with a k-hat, its
    answer's posterior.nc and plots, every fit's draws evaluated by vmap; a port's twin is
    scored against the reference and is good (max z <= 0.2, 0.8 <= r <= 1.2) or flagged."""
    import h5netcdf

    name, _, data, _ = twin_of(case)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"model": {"name": name},
                                                          "data": data}))
    out = tmp_path / "run"
    result = vibench("run", str(tmp_path / "recipe.yaml"), "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["diagnostics"]["khat"] is not None
    latent = set(summary["posterior"]) - DETERMINISTIC.get(case, set())
    predictive = case != "hmm_drive"  # its likelihood is a pyro.factor: nothing to replicate
    plotted = {path.name for path in (out / "plots").iterdir()}
    assert {f"site-{site}.png" for site in latent} | ({"ppc.png"} if predictive else set()) \
        <= plotted, plotted
    with h5netcdf.File(str(out / "posterior.nc"), "r") as nc:
        assert set(summary["posterior"]) <= set(nc.groups["posterior"].variables)
        assert not predictive or "posterior_predictive" in nc.groups, set(nc.groups)
    for fitted in sorted((out / "fits").iterdir()):
        inner = json.loads((fitted / "summary.json").read_text())
        assert inner["status"] == "completed", inner.get("error")
        assert "vmap" in inner["diagnostics"].get("per_draw", ""), inner["diagnostics"]
    reference, flags = summary.get("reference"), summary["auto"]["flags"]
    print(f"{case}: seed {summary['recipe']['seed']}, k-hat "
          f"{summary['diagnostics']['khat']:.2f}, {summary['wall_seconds']:.0f} s, reference "
          f"{reference and {k: reference[k] for k in ('max_z', 'min_r', 'max_r', 'good')}}, "
          f"flags {flags}")
    if case in PORTED:
        assert reference["good"] or flags, reference
