"""The report against a model's reference posterior (workbench/report/reference.py): a small
conjugate model, trained for a few hundred steps in process, whose reference is its exact
posterior in Stan-like names (``mu[1]``, ``mu[2]``, and ``total``, a deterministic site)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import setup
from workbench import hookimpl
from workbench.cli import report_lines
from workbench.plugins.registry import collect, make_plugin_manager
from workbench.report import reference

X = [[0.5, -1.0], [1.5, -0.5], [1.0, -2.0], [0.0, -1.5], [2.0, -1.0]]
PRIOR_SD = 10.0


class Plain:
    """x[i] ~ Normal(mu, 1) with mu (2 numbers) ~ Normal(0, 10); total = mu[0] + mu[1]."""

    def __call__(self, x):
        import pyro
        import pyro.distributions as dist

        mu = pyro.sample("mu", dist.Normal(torch.zeros(2), PRIOR_SD).to_event(1))
        pyro.deterministic("total", mu.sum(-1))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(mu, 1.0).to_event(1), obs=x)


class WithReference(Plain):
    def __init__(self, ghost: bool):
        self.ghost = ghost

    def reference_posterior(self, x):
        """The exact posterior's moments, in 1-based names; with ``ghost``, one more
        parameter on a site the model lacks."""
        precision = x.shape[0] + PRIOR_SD**-2
        means = (x.sum(0) / precision).tolist()
        sd = precision**-0.5
        params = {"mu[1]": {"mean": means[0], "sd": sd}, "mu[2]": {"mean": means[1], "sd": sd},
                  "total": {"mean": sum(means), "sd": sd * math.sqrt(2)}}
        sites = {"mu[1]": ("mu", (0,)), "mu[2]": ("mu", (1,)), "total": ("total", ())}
        if self.ghost:
            params["sigma"] = {"mean": 1.0, "sd": 0.1}
            sites["sigma"] = ("sigma", ())
        return {"params": params, "sites": sites, "draws": None}


def normal_means(reference: bool = True, ghost: bool = False):
    """Two Normal means, with or without a reference posterior."""
    return WithReference(ghost) if reference else Plain()


class Models:
    @hookimpl
    def register_models(self, register):
        register("test_normal_means", normal_means)


@pytest.fixture(scope="module")
def registry():
    pm, problems = make_plugin_manager()
    pm.register(Models(), name="test-reference-models")
    return collect(pm, problems)


def train(registry, run_dir: Path, **options) -> dict:
    """A short run of the test model; its summary as summary.json holds it."""
    raw = {"name": "ref", "seed": 0, "device": "cpu", "data": {"x": X},
           "model": {"name": "test_normal_means", **options}, "guide": {"name": "auto_normal"},
           "loss": {"name": "elbo", "num_particles": 4}, "optimizer": {"name": "adam", "lr": 0.05,
                         "schedule": {"name": "exponential", "gamma": 0.993}},
           "train": {"steps": 600, "plots": False, "eval_every": 0}, "loggers": []}
    summary = setup(source=raw, registry=registry).train(run_dir)
    assert summary["status"] == "completed"
    return summary


@pytest.fixture(scope="module")
def fitted(registry, tmp_path_factory) -> tuple[dict, dict]:
    run_dir = tmp_path_factory.mktemp("fitted")
    in_memory = train(registry, run_dir)
    return in_memory, json.loads((run_dir / "summary.json").read_text())


def test_z_and_r_are_computed_from_the_summary_moments(fitted):
    _, summary = fitted
    post, section = summary["posterior"]["mu"], summary["reference"]
    for name, i in (("mu[1]", 0), ("mu[2]", 1)):
        row = section["params"][name]
        assert row["mean"] == post["mean"][i] and row["std"] == post["std"][i]
        assert row["z"] == pytest.approx(abs(post["mean"][i] - row["ref_mean"]) / row["ref_sd"])
        assert row["r"] == pytest.approx(post["std"][i] / row["ref_sd"])
        assert row["iw_z"] == pytest.approx(abs(post["iw_mean"][i] - row["ref_mean"])
                                            / row["ref_sd"])
        assert row["iw_r"] == pytest.approx(post["iw_std"][i] / row["ref_sd"])
    rows = section["params"].values()
    assert section["max_z"] == max(row["z"] for row in rows)
    assert (section["min_r"], section["max_r"]) == (min(row["r"] for row in rows),
                                                    max(row["r"] for row in rows))
    assert section["good"] is (section["max_z"] <= 0.2 and 0.8 <= section["min_r"]
                               and section["max_r"] <= 1.2)


def test_a_deterministic_site_is_scored_from_guide_draws(fitted):
    _, summary = fitted
    post, row = summary["posterior"]["mu"], summary["reference"]["params"]["total"]
    # AutoNormal is mean-field: total's sd is the root of the summed variances.
    assert row["mean"] == pytest.approx(sum(post["mean"]), abs=0.05 * row["ref_sd"])
    assert row["std"] == pytest.approx(math.hypot(*post["std"]), rel=0.03)
    assert row["z"] == pytest.approx(abs(row["mean"] - row["ref_mean"]) / row["ref_sd"])
    assert "iw_z" in row and row["iw_r"] == pytest.approx(1.0, abs=0.1)


def test_a_fit_to_the_exact_posterior_reads_good_on_the_terminal(fitted):
    in_memory, summary = fitted
    assert summary["reference"]["good"] is True  # AutoNormal is exact here
    lines = report_lines(in_memory)
    assert lines == report_lines(summary)
    ours = [line for line in lines if "(reference " in line or line.startswith("reference:")]
    row = summary["reference"]["params"]["mu[1]"]
    assert ours[0] == (f"mu[1]: {row['mean']:.4g} +- {row['std']:.4g} (reference "
                       f"{row['ref_mean']:.4g} +- {row['ref_sd']:.4g}): z {row['z']:.2f}, "
                       f"r {row['r']:.2f}; importance-weighted z {row['iw_z']:.2f}, "
                       f"r {row['iw_r']:.2f}")
    assert [line.split(":")[0] for line in ours] == ["mu[1]", "mu[2]", "total", "reference"]
    section = summary["reference"]
    assert ours[-1].startswith(f"reference: max z {section['max_z']:.2f}, "
                               f"r {section['min_r']:.2f}-{section['max_r']:.2f} ")
    assert ours[-1].endswith(": good")


def test_a_model_without_a_reference_has_no_section(registry, tmp_path: Path):
    summary = train(registry, tmp_path, reference=False)
    assert "reference" not in summary
    assert "reference" not in json.loads((tmp_path / "summary.json").read_text())
    assert not any(line.startswith("reference") for line in report_lines(summary))


def test_a_reference_site_the_model_lacks_is_a_reason_not_a_crash(registry, tmp_path: Path):
    summary = train(registry, tmp_path, ghost=True)
    section = summary["reference"]
    assert set(section["params"]) == {"mu[1]", "mu[2]", "total"}
    assert section["skipped"] == {"sigma": "the model has no site 'sigma'"}
    assert section["good"] is None  # every compared one passes, but not all were compared
    lines = report_lines(summary)
    assert "reference: sigma not compared: the model has no site 'sigma'" in lines
    assert lines[-1].endswith(": incomplete (1 not compared)")


def test_a_failing_reference_posterior_is_reported_in_the_section():
    class Failing:
        def reference_posterior(self, **data):
            raise ValueError("no reference here")

    found = reference.section(Failing(), {}, {})
    assert found == {"reference": {"reason": "the comparison failed: no reference here"}}
    assert reference.lines(found["reference"]) == [
        "reference: not compared: the comparison failed: no reference here"]


def test_the_verdict_is_off_outside_the_thresholds_and_long_lists_are_cut():
    params = {f"b[{i + 1}]": {"mean": 0.0, "sd": 1.0} for i in range(15)}
    sites = {name: ("b", (i,)) for i, name in enumerate(params)}
    for mean, std, good in ((0.2, 1.2, True), (0.21, 1.0, False), (0.0, 0.79, False),
                            (0.0, float("nan"), False)):
        moments = {"b": {"mean": [mean] * 15, "std": [std] * 15}}
        section = reference.compare(params, sites, moments)
        assert section["good"] is good, (mean, std)
    lines = reference.lines(section)
    assert len(lines) == 12 + 2
    assert lines[12] == "reference: 3 more parameters in summary.json"
    assert lines[-1] == "reference: max z 0.00, r nan-nan: off"


def test_an_index_past_the_site_is_a_reason():
    section = reference.compare({"b[3]": {"mean": 0.0, "sd": 1.0}}, {"b[3]": ("b", (2,))},
                                {"b": {"mean": [0.0, 0.0], "std": [1.0, 1.0]}})
    assert section["skipped"] == {"b[3]": "site 'b' has no element (2,)"}
    assert section["good"] is None and section["max_z"] is None
    assert reference.lines(section)[-1] == "reference: no parameter compared"
