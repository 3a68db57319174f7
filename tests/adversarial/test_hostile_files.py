"""Hostile files and folders (made by ``hostile.py``): each is refused with one line and exit 2,
runs no code, writes through no link and exhausts nothing."""

from __future__ import annotations

import json
import shutil
import stat
import time
from pathlib import Path

import pytest
import torch
from hostile import (
    can_chown,
    inflating_checkpoint,
    link_to_victim,
    names_code,
    one_line_exit_2,
    others_can_write,
    owned_by_another_user,
    rewrite_checkpoint,
    shared_list,
    sparse_file,
)

from tests.helpers import COIN, vibench
from workbench.compile import package_cache
from workbench.errors import UsageError
from workbench.rundir import files
from workbench.train import checkpoint

QUICK = ["--steps", "40", "--set", "train.plots=false", "--set", "train.diagnostics=false"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("finished") / "run"
    done = vibench("run", str(COIN), *QUICK, "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def run_dir(finished: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    (copy / ".lock").unlink(missing_ok=True)
    return copy


# --- cache folders and compiled-step packages -------------------------------------------

@pytest.mark.parametrize("make", [
    others_can_write,
    pytest.param(owned_by_another_user, marks=pytest.mark.skipif(
        not can_chown(), reason="needs root to give a folder to another user")),
])
def test_a_cache_folder_others_can_write_is_never_compiled_into(tmp_path: Path, make):
    cache = tmp_path / "torchinductor_shared"
    make(cache)
    env = {"TORCHINDUCTOR_CACHE_DIR": str(cache)}
    refused = vibench("run", str(COIN), *QUICK, "--set", "train.compile=true",
                      "--out", str(tmp_path / "a"), env=env)
    one_line_exit_2(refused, str(cache), "TORCHINDUCTOR_CACHE_DIR")
    assert not (cache / package_cache.FOLDER).exists()
    auto = vibench("run", str(COIN), *QUICK, "--set", "train.compile=auto",
                   "--out", str(tmp_path / "b"), env=env)
    assert auto.returncode == 0, auto.stderr
    assert "training eagerly" in auto.stderr and str(cache) in auto.stderr
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["compiled"] is False


def test_cache_folders_are_made_for_this_user_alone(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "fresh" / "cache"))
    ours = package_cache.check_folders()
    for folder in (ours, ours.parent):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700


def test_a_damaged_or_foreign_package_is_not_opened(tmp_path: Path, monkeypatch):
    """A file under a key that is no package, or a package whose own key is another, is
    passed over (the run compiles afresh) without loading its library."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    key = "0" * 40
    (package_cache.check_folders() / f"{key}.pt2").write_bytes(b"PK\x03\x04 not a package")
    assert package_cache.load(key) is None


@pytest.mark.slow
def test_a_package_copied_over_another_key_is_refused(tmp_path: Path, monkeypatch):
    """The attack of a legitimate package built for one recipe copied over another's key."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def step(x):
        return (x * 2.0,)

    inputs = [torch.ones(3)]
    graph = torch.fx.symbolic_trace(lambda x: (x * 2.0,))
    key = package_cache.key(package_cache.record(step, inputs), inputs)
    assert package_cache.build(graph, inputs, key) is not None
    other = "f" * 40
    folder = package_cache.check_folders()
    shutil.copy(folder / f"{key}.pt2", folder / f"{other}.pt2")
    assert package_cache.load(key) is not None
    assert package_cache.load(other) is None
    assert stat.S_IMODE((folder / f"{key}.pt2").stat().st_mode) == 0o600


# --- links planted in run folders --------------------------------------------------------

def test_a_lock_linked_to_another_file_is_refused_and_the_file_kept(run_dir: Path,
                                                                  tmp_path: Path):
    victim = tmp_path / "victim.txt"
    link_to_victim(run_dir / ".lock", victim)
    for args in (["run", "--resume", str(run_dir), "--steps", "60"], ["export", str(run_dir)]):
        one_line_exit_2(vibench(*args), "symbolic link")
        assert victim.read_text() == "precious\n"
    out = tmp_path / "new"
    out.mkdir()
    link_to_victim(out / ".lock", victim)
    one_line_exit_2(vibench("run", str(COIN), *QUICK, "--out", str(out)), "symbolic link")
    assert victim.read_text() == "precious\n"


def test_temporary_names_planted_as_links_are_never_written_through(run_dir: Path,
                                                                    tmp_path: Path):
    victims = []
    for name in ("checkpoint.pt.tmp", "summary.json.tmp", "params.pt.tmp", "posterior.nc.tmp",
                 "recipe.yaml.tmp"):
        victims.append(tmp_path / f"victim-{name}")
        link_to_victim(run_dir / name, victims[-1])
    resumed = vibench("run", "--resume", str(run_dir), "--steps", "60")
    assert resumed.returncode == 0, resumed.stderr
    exported = vibench("export", str(run_dir))
    assert exported.returncode == 0, exported.stderr
    assert all(victim.read_text() == "precious\n" for victim in victims)


def test_a_run_folder_file_linked_elsewhere_is_replaced_not_written_through(run_dir: Path,
                                                                           tmp_path: Path):
    victim = tmp_path / "victim.json"
    link_to_victim(run_dir / "summary.json", victim)
    resumed = vibench("run", "--resume", str(run_dir), "--steps", "60")
    assert resumed.returncode == 0, resumed.stderr
    assert victim.read_text() == "precious\n"
    assert not (run_dir / "summary.json").is_symlink()


# --- code named by a run folder ---------------------------------------------------------

def test_export_and_load_never_import_code_named_only_in_the_checkpoint(run_dir: Path,
                                                                       tmp_path: Path):
    from workbench import service
    from workbench.plugins.registry import get_registry

    marker = tmp_path / "ran"
    names_code(run_dir, marker)
    one_line_exit_2(vibench("export", str(run_dir)), "--trust-code", "evil.py:model")
    with pytest.raises(UsageError, match="trust_code=True"):
        service.load(run_dir, get_registry())
    assert not marker.exists()


def test_resume_says_it_runs_named_code_before_running_it(run_dir: Path, tmp_path: Path):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.py"
    evil.write_text("import sys\nprint('EVIL RAN', file=sys.stderr, flush=True)\n"
                    "from my_model_for_tests import model\n")
    (tmp_path / "my_model_for_tests.py").write_text(
        (COIN.parent / "my_model.py").read_text())
    recipe = (COIN.parent / "my_model.yaml").read_text()
    source = tmp_path / "mine.yaml"
    source.write_text(recipe.replace("my_model.py:model", f"{evil}:model"))
    out = tmp_path / "own"
    first = vibench("run", str(source), *QUICK, "--out", str(out),
                    env={"PYTHONPATH": str(tmp_path)})
    assert first.returncode == 0, first.stderr
    resumed = vibench("run", "--resume", str(out), "--steps", "60",
                      env={"PYTHONPATH": str(tmp_path)})
    assert resumed.returncode == 0, resumed.stderr
    note = resumed.stderr.index("names code")
    assert note < resumed.stderr.index("EVIL RAN")
    assert not marker.exists()


# --- checkpoints, summaries: bounded before they are parsed --------------------------------

DAMAGE = {
    "state is text": lambda s: s.update(state="step 10"),
    "state lacks step": lambda s: s["state"].pop("step"),
    "step is text": lambda s: s["state"].update(step="10"),
    "step is negative": lambda s: s["state"].update(step=-5),
    "more losses than steps": lambda s: s["state"].update(losses=10**12),
    "world_size is text": lambda s: s.update(world_size="2"),
    "optimizer state of nothing": lambda s: s.update(optim={"x": 1}),
    "rng is text": lambda s: s.update(rng="seed"),
    "params is a list": lambda s: s.update(params=[1, 2]),
    "recipe nested in itself": lambda s: s["recipe"]["data"].update(y=shared_list(28)),
    "recipe nested deep": lambda s: s["recipe"]["data"].update(y=shared_list(60)),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_a_damaged_checkpoint_is_refused_quickly(run_dir: Path, damage):
    rewrite_checkpoint(run_dir, damage)
    began = time.monotonic()
    with pytest.raises(UsageError, match="checkpoint.pt"):
        checkpoint.load(run_dir, "test")
    assert time.monotonic() - began < 30  # the naive walk of 2**40 items would never end


def test_a_damaged_checkpoint_is_one_line_from_every_command(run_dir: Path):
    rewrite_checkpoint(run_dir, DAMAGE["recipe nested in itself"])
    (run_dir / "summary.json").unlink()
    one_line_exit_2(vibench("run", "--resume", str(run_dir)), "--resume", "values")
    one_line_exit_2(vibench("export", str(run_dir)), "export", "values")
    runs = vibench("runs", str(run_dir.parent))
    assert runs.returncode == 0 and "Traceback" not in runs.stderr, runs.stderr


def test_a_bad_rng_state_is_one_line(run_dir: Path):
    rewrite_checkpoint(run_dir, lambda s: s["rng"].update(torch=torch.zeros(3)))
    one_line_exit_2(vibench("run", "--resume", str(run_dir), "--steps", "60"),
                    "random generators")


def test_an_inflating_checkpoint_is_refused_before_it_inflates(run_dir: Path):
    inflating_checkpoint(run_dir)
    with pytest.raises(UsageError, match="inflate"):
        checkpoint.load(run_dir, "test")
    one_line_exit_2(vibench("export", str(run_dir)), "inflate")


def test_a_huge_summary_is_refused_unread(run_dir: Path):
    sparse_file(run_dir / "summary.json", files.MAX_TEXT_BYTES + 1)
    one_line_exit_2(vibench("show", str(run_dir)), "summary.json", "bytes")
    runs = vibench("runs", str(run_dir.parent))
    assert runs.returncode == 0 and "Traceback" not in runs.stderr, runs.stderr
