"""``vibench run`` sets up with the cyclic garbage collector off and freezes what set-up
made, but only in the console script's own process: an app invoked inside another program
(a test's CliRunner, a notebook) keeps its collector as it was."""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

from tests.helpers import COIN, REPO

# The console script's entry point (``vibench = workbench.cli:main``) called twice in one
# process: a recipe that runs, then (after ``--then``) one that fails to set up; after each,
# whether the collector is on and how many objects it holds frozen.
CONSOLE = """
import gc, sys
from workbench.cli import main

cut = sys.argv.index("--then")
for argv in (sys.argv[1:cut], sys.argv[cut + 1:]):
    try:
        main(argv)
    except SystemExit as stop:
        print("gc:", stop.code, gc.isenabled(), gc.get_freeze_count())
"""


def test_the_console_script_sets_up_without_collections_then_freezes(tmp_path: Path):
    """A run's set-up ends with the collector on again and what it made frozen (never walked
    again); a set-up that fails leaves the collector on."""
    args = ["run", str(COIN), "--steps", "5", "--set", "train.plots=false",
            "--out", str(tmp_path / "r"), "--then",
            "run", str(COIN), "--set", "guide=no_such_guide"]
    done = subprocess.run([sys.executable, "-c", CONSOLE, *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    ran, failed = (line.split()[1:] for line in done.stdout.splitlines() if line[:3] == "gc:")
    assert ran[:2] == ["0", "True"] and int(ran[2]) > 0, done.stderr
    assert failed[:2] == ["2", "True"], done.stderr


def test_an_app_inside_another_program_leaves_the_collector_alone(tmp_path: Path):
    from typer.testing import CliRunner

    from workbench.cli import app

    enabled, frozen = gc.isenabled(), gc.get_freeze_count()
    gc.enable()
    try:
        result = CliRunner().invoke(app, ["run", str(COIN), "--steps", "5", "--set",
                                          "train.plots=false", "--out", str(tmp_path / "r")])
        assert result.exit_code == 0, result.output
        assert gc.isenabled() and gc.get_freeze_count() == frozen
    finally:
        (gc.enable if enabled else gc.disable)()
