"""Hostile recipes, command lines, data and plugins (made by ``hostile.py``): each is refused
with one line naming what and where, exit 2, and leaves nothing behind."""

from __future__ import annotations

from pathlib import Path

import pytest
from hostile import one_line_exit_2

from conftest import COIN, vibench

QUICK = ["--steps", "5", "--set", "train.plots=false", "--set", "train.diagnostics=false"]


@pytest.mark.parametrize("seed", [str(2**64), str(2**32), "-1"])
def test_a_seed_no_generator_takes_is_one_line(tmp_path: Path, seed: str):
    refused = vibench("run", str(COIN), *QUICK, "--seed", seed, "--out", str(tmp_path / "run"))
    one_line_exit_2(refused, "seed", "4294967295", seed)
    assert not (tmp_path / "run").exists()
