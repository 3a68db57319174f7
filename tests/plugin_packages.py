"""Third-party plugins as real packages: written, pip-installed into a private target
directory (the shared environment is left alone), and found by the installed ``vibench``
console script run with that directory on PYTHONPATH."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.helpers import REPO

TIMEOUT = 180  # seconds for one subprocess; a hang fails the test instead of the session


def vibench_script() -> str:
    """The installed ``vibench`` console script (the test is skipped without one)."""
    beside = Path(sys.executable).with_name("vibench")
    found = str(beside) if beside.exists() else shutil.which("vibench")
    if not found:
        pytest.skip("the vibench console script is not installed")
    return found


def plugin_env(site: Path | None) -> dict[str, str]:
    """This environment with the plugins in ``site`` on the path and no plugin settings."""
    env = dict(os.environ)
    for name in ("PYTHONPATH", "VIBENCH_DISABLE_PLUGINS", "VIBENCH_DEBUG",
                 "VIBENCH_PLUGIN_TIMEOUT", "VIBENCH_TRACE_PLUGINS"):
        env.pop(name, None)
    if site is not None:
        env["PYTHONPATH"] = str(site)
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def vibench(*args: str, site: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``vibench ARGS`` from the repo root, with the plugins installed in ``site`` and
    ``env`` added to the environment."""
    return subprocess.run(
        [vibench_script(), *args], cwd=REPO, env={**plugin_env(site), **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )


def by_name(entries: list[dict]) -> dict[str, dict]:
    """``vibench list --json``'s entries by name."""
    return {entry["name"]: entry for entry in entries}


def write_package(root: Path, dist: str, module: str, entry_point: str, source: str) -> Path:
    """A minimal plugin package: ``module/__init__.py`` plus ``module/plugin.py``."""
    pkg = root / dist
    (pkg / module).mkdir(parents=True)
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""\
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "{dist}"
        version = "0.1.0"
        requires-python = ">=3.10"

        [project.entry-points.vibench]
        {entry_point} = "{module}.plugin"

        [tool.setuptools]
        packages = ["{module}"]
        """))
    (pkg / module / "__init__.py").write_text("")
    (pkg / module / "plugin.py").write_text(textwrap.dedent(source))
    return pkg


def pip_install(packages: list[Path], target: Path) -> Path:
    """Install the packages into ``target`` offline, building with the environment's setuptools."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--target", str(target), *map(str, packages)],
        env=plugin_env(None), capture_output=True, text=True, timeout=TIMEOUT,
    )
    assert result.returncode == 0, f"pip install failed:\n{result.stdout}\n{result.stderr}"
    return target
