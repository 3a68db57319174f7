"""Third-party plugins, end to end: real packages, really installed, found by real `vibench`.

Each fixture writes one or more tiny plugin packages (a pyproject.toml with the setuptools
backend and one module registering through the ``vibench`` entry-point group), installs them
with pip into a private target directory (so the shared environment is left alone), and the
tests run the ``vibench`` console script in a subprocess with that directory on PYTHONPATH.
Clean, broken and conflicting plugins live in separate target directories so they cannot
interfere with one another.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import COIN
from tests.plugin_packages import by_name, pip_install, vibench, write_package


def listing(site: Path | None) -> dict:
    result = vibench("list", "--json", site=site)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return json.loads(result.stdout)


# A genuinely useful guide for the coin (Pyro's AutoDiagonalNormal), and a model.
GOOD_SOURCE = '''
    from workbench import hookimpl


    @hookimpl
    def register_guides(register):
        register("tp_diag_normal", tp_diag_normal)


    @hookimpl
    def register_models(register):
        register("tp_logit_coin", LogitCoin)


    def tp_diag_normal(model, init_scale: float = 0.1):
        """Pyro's AutoDiagonalNormal: one Gaussian with a diagonal covariance, unconstrained."""
        from pyro.infer.autoguide import AutoDiagonalNormal

        return AutoDiagonalNormal(model, init_scale=init_scale)


    class LogitCoin:
        """Coin flips with a Normal prior on the log-odds of heads."""

        def __init__(self, prior_scale: float = 1.5):
            self.prior_scale = prior_scale

        def __call__(self, flips):
            import pyro
            import pyro.distributions as dist
            import torch

            logit = pyro.sample("logit", dist.Normal(torch.tensor(0.0), self.prior_scale))
            with pyro.plate("flips", flips.shape[-1]):
                pyro.sample("obs", dist.Bernoulli(logits=logit), obs=flips)
'''

BROKEN_IMPORT_SOURCE = '''
    from workbench import hookimpl

    raise RuntimeError("tp_broken_import exploded on purpose")


    @hookimpl
    def register_guides(register):
        register("never_seen", lambda model: None)
'''

MISSPELT_SOURCE = '''
    from workbench import hookimpl


    @hookimpl
    def register_guide(register):  # the hook is register_guides: a typo
        register("tp_typo_guide", typo_guide)


    def typo_guide(model):
        """Never registered: its hook is misspelt."""
        return None
'''

CONFLICT_SOURCE = '''
    from workbench import hookimpl


    @hookimpl
    def register_guides(register):
        register("beta", other_beta)


    def other_beta(model, init_scale: float = 0.1):
        """A second guide under the built-in name 'beta'."""
        from pyro.infer.autoguide import AutoNormal

        return AutoNormal(model, init_scale=init_scale)
'''


@pytest.fixture(scope="module")
def defaults() -> dict:
    """What ``vibench list --json`` shows with no third-party plugin installed."""
    return listing(None)


@pytest.fixture(scope="module")
def clean_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clean")
    good = write_package(root / "src", "vibench-tp-guides", "tp_guides", "tp_guides", GOOD_SOURCE)
    return pip_install([good], root / "site")


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory) -> Path:
    """A plugin that raises at import, one with a misspelt hook, and a good one beside them."""
    root = tmp_path_factory.mktemp("broken")
    src = root / "src"
    packages = [
        write_package(src, "vibench-tp-broken", "tp_broken", "tp_broken_import",
                      BROKEN_IMPORT_SOURCE),
        write_package(src, "vibench-tp-typo", "tp_typo", "tp_typo", MISSPELT_SOURCE),
        write_package(src, "vibench-tp-guides", "tp_guides", "tp_guides", GOOD_SOURCE),
    ]
    return pip_install(packages, root / "site")


@pytest.fixture(scope="module")
def conflict_site(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("conflict")
    pkg = write_package(root / "src", "vibench-tp-beta", "tp_beta", "tp_beta", CONFLICT_SOURCE)
    return pip_install([pkg], root / "site")


def assert_defaults_present(found: dict, defaults: dict, *, except_names=()) -> None:
    """Every built-in component is still listed, from the same plugin."""
    for kind in ("model", "guide", "loss", "optimizer", "optim_args"):
        assert defaults[kind], f"no default {kind}"
        have = by_name(found[kind])
        for entry in defaults[kind]:
            if (kind, entry["name"]) in except_names:
                continue
            assert entry["name"] in have, f"default {kind} {entry['name']!r} is gone"
            assert have[entry["name"]]["plugin"] == entry["plugin"]


# -- 1. a clean third-party plugin -------------------------------------------------------


def test_third_party_guide_and_model_are_listed(clean_site, defaults):
    found = listing(clean_site)
    assert found["broken"] == []
    assert found["conflicts"] == []
    guide = by_name(found["guide"])["tp_diag_normal"]
    assert guide["plugin"] == "tp_guides"
    assert guide["description"].startswith("Pyro's AutoDiagonalNormal")
    # `model` is injected by vibench, so it is not an option.
    assert guide["options"] == {"init_scale": {"default": 0.1, "required": False, "type": "float"}}
    model = by_name(found["model"])["tp_logit_coin"]
    assert model["plugin"] == "tp_guides"
    assert model["options"] == {"prior_scale": {"default": 1.5, "required": False, "type": "float"}}
    assert_defaults_present(found, defaults)


def test_third_party_guide_shows_in_text_listing(clean_site):
    result = vibench("list", site=clean_site)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    at = [i for i, l in enumerate(lines) if l.split()[:1] == ["tp_diag_normal"]]
    assert len(at) == 1, result.stdout
    # the entry's options-and-plugin line, after its description (wrapped on a narrow screen)
    options = next(line for line in lines[at[0]:] if "options:" in line)
    assert "init_scale=0.1" in options and "[plugin tp_guides]" in options, result.stdout


def test_third_party_guide_runs_the_coin(clean_site, tmp_path):
    out = tmp_path / "run"
    result = vibench(
        "run", str(COIN), "--set", "guide=tp_diag_normal", "--set", "optimizer.lr=0.02",
        "--steps", "300", "--out", str(out), site=clean_site,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert not [l for l in result.stderr.splitlines() if l.startswith("warning:")], result.stderr
    summary = json.loads((out / "summary.json").read_text())
    # The whole section was swapped: the new guide with its default, no beta option left.
    assert summary["recipe"]["guide"] == {"name": "tp_diag_normal", "init_scale": 0.1}
    assert summary["steps"] == 300
    # The third party's factory really built the guide: its parameters are AutoDiagonalNormal's.
    assert summary["params"], summary
    assert all(name.startswith("AutoDiagonalNormal.") for name in summary["params"])
    # ... and it is a good guide for the coin: near the exact posterior Beta(16, 14).
    site = summary["posterior"]["latent_fairness"]
    assert site["mean"] == pytest.approx(16 / 30, abs=0.03)
    assert site["std"] == pytest.approx(0.0896, abs=0.03)
    assert "latent_fairness:" in result.stdout


def test_third_party_guide_options_are_checked(clean_site, tmp_path):
    result = vibench(
        "run", str(COIN), "--set", "guide=tp_diag_normal", "--set", "guide.init_scal=0.05",
        "--steps", "5", "--out", str(tmp_path / "run"), site=clean_site,
    )
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and all(l.startswith("error: ") for l in lines), result.stderr
    assert any("tp_diag_normal" in l and "init_scal" in l and "init_scale" in l for l in lines)
    assert not (tmp_path / "run" / "summary.json").exists()


# -- 2. a plugin that raises at import ---------------------------------------------------


def test_import_error_is_listed_as_broken(broken_site, defaults):
    found = listing(broken_site)
    broken = [b for b in found["broken"] if b["plugin"] == "tp_broken_import"]
    assert len(broken) == 1, found["broken"]
    assert "tp_broken.plugin" in broken[0]["where"]  # the entry point
    assert "exploded on purpose" in broken[0]["error"]
    assert "never_seen" not in by_name(found["guide"])
    assert_defaults_present(found, defaults)
    # The good plugin installed beside it still works.
    assert by_name(found["guide"])["tp_diag_normal"]["plugin"] == "tp_guides"


def test_import_error_is_shown_in_text_listing(broken_site):
    result = vibench("list", site=broken_site)
    assert result.returncode == 0, result.stderr
    assert any(l.startswith("broken:") and "tp_broken_import" in l
               for l in result.stdout.splitlines()), result.stdout


def test_run_warns_about_broken_plugin_and_still_works(broken_site, tmp_path):
    out = tmp_path / "run"
    result = vibench("run", str(COIN), "--steps", "10", "--out", str(out), site=broken_site)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    warnings = [l for l in result.stderr.splitlines() if l.startswith("warning")]
    assert any("tp_broken_import" in line and "exploded on purpose" in line
               for line in warnings), result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["guide"]["name"] == "beta"
    assert summary["steps"] == 10


# -- 4. a plugin with a misspelt hook name -----------------------------------------------


def test_misspelt_hook_is_listed_as_broken(broken_site, defaults):
    found = listing(broken_site)
    typo = [b for b in found["broken"] if b["plugin"] == "tp_typo"]
    assert len(typo) == 1, found["broken"]
    assert "register_guide" in typo[0]["error"]
    assert "tp_typo_guide" not in by_name(found["guide"])
    assert_defaults_present(found, defaults)
    assert by_name(found["guide"])["tp_diag_normal"]["plugin"] == "tp_guides"


def test_others_keep_working_beside_a_misspelt_hook(broken_site, tmp_path):
    out = tmp_path / "run"
    result = vibench(
        "run", str(COIN), "--set", "guide=tp_diag_normal", "--steps", "10", "--out", str(out),
        site=broken_site,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert any(l.startswith("warning") and "tp_typo" in l for l in result.stderr.splitlines())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["guide"]["name"] == "tp_diag_normal"


# -- 3. a plugin that registers a taken name ---------------------------------------------


def test_conflict_is_listed_naming_both_plugins(conflict_site, defaults):
    found = listing(conflict_site)
    assert found["conflicts"] == [
        {"kind": "guide", "name": "beta", "plugins": ["vibench.guides", "tp_beta"]}
    ]
    # Neither 'beta' wins silently; everything else is still there.
    assert "beta" not in by_name(found["guide"])
    assert_defaults_present(found, defaults, except_names={("guide", "beta")})

    text = vibench("list", site=conflict_site)
    assert text.returncode == 0, text.stderr
    assert any("conflict" in l and "beta" in l and "vibench.guides" in l and "tp_beta" in l
               for l in text.stdout.splitlines()), text.stdout


def test_run_of_conflicting_name_is_an_error_naming_both(conflict_site, tmp_path):
    out = tmp_path / "run"
    result = vibench("run", str(COIN), "--steps", "10", "--out", str(out), site=conflict_site)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "beta" in lines[0] and "vibench.guides" in lines[0] and "tp_beta" in lines[0]
    assert result.stdout == ""
    assert not (out / "summary.json").exists()


def test_other_guide_still_runs_beside_a_conflict(conflict_site, tmp_path):
    out = tmp_path / "run"
    result = vibench(
        "run", str(COIN), "--set", "guide=auto_normal", "--steps", "10", "--out", str(out),
        site=conflict_site,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["recipe"]["guide"]["name"] == "auto_normal"
