"""The plugin author's guide and its example package, end to end.

``examples/vibench-example-plugin`` is pip-installed (a copy, so no build files land in the
repository) into a private target directory, and the real ``vibench`` runs with that directory
on PYTHONPATH, as a user's would after ``pip install``. The guide, docs/plugins.md, must
mention every hook and every parameter vibench injects into a factory, so a new one cannot
go undocumented.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from workbench import hookspecs
from workbench.config.kinds import INJECTED, KINDS

REPO = Path(__file__).resolve().parents[1]
COIN = REPO / "recipes" / "coin.yaml"
EXAMPLE = REPO / "examples" / "vibench-example-plugin"
RECIPE = EXAMPLE / "recipe.yaml"
GUIDE = REPO / "docs" / "plugins.md"
PLUGIN = "vibench_example"  # the entry-point name in the example's pyproject.toml


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The example package, installed with pip into a target directory of its own."""
    root = tmp_path_factory.mktemp("example")
    source = root / "vibench-example-plugin"
    shutil.copytree(EXAMPLE, source,
                    ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--disable-pip-version-check", "--target", str(root / "site"),
         str(source)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    return root / "site"


def with_plugin(site: Path, **extra: str) -> dict[str, str]:
    """The environment of a user who installed the plugin: its site on the path before what
    the machine has there (a machine whose packages come on PYTHONPATH keeps them)."""
    path = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return {"PYTHONPATH": path, "VIBENCH_DISABLE_PLUGINS": "", **extra}


@pytest.fixture
def vibench(run_vibench):
    """conftest's ``vibench(*args, env=...)``: the real command, in a child process."""
    return run_vibench


def listing(vibench, env: dict[str, str]) -> dict:
    result = vibench("list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def by_name(entries: list[dict]) -> dict[str, dict]:
    return {entry["name"]: entry for entry in entries}


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_example_components_are_listed_with_their_options(vibench, site):
    found = listing(vibench, with_plugin(site))
    assert found["broken"] == [] and found["conflicts"] == []
    model = by_name(found["model"])["normal_mean"]
    assert model["plugin"] == PLUGIN
    assert model["description"].startswith("Data x ~ Normal(mu, sd)")
    assert model["options"] == {
        "sd": {"default": 1.0, "required": False, "type": "float"},
        "prior_loc": {"default": 0.0, "required": False, "type": "float"},
        "prior_scale": {"default": 10.0, "required": False, "type": "float"},
    }
    guide = by_name(found["guide"])["normal"]
    assert guide["plugin"] == PLUGIN
    assert guide["description"].startswith("A Normal per real-valued latent site")
    assert guide["options"] == {  # `model` is injected, not an option
        "init_loc": {"default": 0.0, "required": False, "type": "float"},
        "init_scale": {"default": 1.0, "required": False, "type": "float"},
    }
    # The built-ins are still there beside it.
    assert by_name(found["model"])["beta_bernoulli"]["plugin"] == "vibench.models"


def test_example_plugin_can_be_disabled_by_its_entry_point_name(vibench, site):
    found = listing(vibench, with_plugin(site, VIBENCH_DISABLE_PLUGINS=PLUGIN))
    assert "normal_mean" not in by_name(found["model"])
    assert "normal" not in by_name(found["guide"])
    assert "beta" in by_name(found["guide"])


def test_example_recipe_finds_the_exact_posterior(vibench, site, tmp_path):
    out = tmp_path / "run"
    result = vibench("run", str(RECIPE), "--out", str(out), env=with_plugin(site))
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    mu = summary["posterior"]["mu"]
    # The conjugate update by hand: prior Normal(0, 10), sd 1, eight points summing to 41.3.
    precision = 10.0**-2 + 8
    assert mu["exact_mean"] == pytest.approx(41.3 / precision, rel=1e-5)
    assert mu["exact_std"] == pytest.approx(precision**-0.5, rel=1e-5)
    # The guide's family holds the posterior; what is left is SVI's noise. Over seeds 0-19 the
    # errors were at most 0.035 (mean) and 0.032 (sd); the posterior sd is 0.353.
    assert mu["method"] == "analytic"
    assert mu["mean"] == pytest.approx(mu["exact_mean"], abs=0.1)
    assert mu["std"] == pytest.approx(mu["exact_std"], abs=0.07)
    assert set(summary["params"]) == {"mu.loc", "mu.log_scale"}
    assert re.search(r"^mu: 5\.\d{3} \+- 0\.3\d{2} \(exact 5\.156 \+- 0\.353\)$", result.stdout,
                     re.MULTILINE), result.stdout


def test_example_guide_refuses_a_site_that_is_not_real_valued(vibench, site, tmp_path):
    out = tmp_path / "run"
    result = vibench("run", str(COIN), "--set", "guide=normal", "--steps", "5",
                     "--out", str(out), env=with_plugin(site))
    line = one_error_line(result)
    assert "'normal'" in line and "latent_fairness" in line and "real values" in line, line
    assert not out.exists()


def test_example_factory_refuses_a_bad_option_value(vibench, site, tmp_path):
    out = tmp_path / "run"
    result = vibench("run", str(RECIPE), "--set", "guide.init_scale=0", "--out", str(out),
                     env=with_plugin(site))
    assert one_error_line(result) == "error: guide 'normal': init_scale must be > 0"
    assert not out.exists()


def test_guide_documents_every_hook_and_injected_parameter():
    text = GUIDE.read_text(encoding="utf-8")
    specs = sorted(name for name, value in vars(hookspecs).items()
                   if hasattr(value, f"{hookspecs.PROJECT}_spec"))
    assert set(specs) >= set(KINDS.values())
    undocumented = [hook for hook in specs if f"`{hook}`" not in text]
    assert not undocumented, f"docs/plugins.md does not mention the hooks {undocumented}"
    injected = sorted(set().union(*INJECTED.values()))
    undocumented = [name for name in injected if f"`{name}`" not in text]
    assert not undocumented, f"docs/plugins.md does not mention the injected {undocumented}"
