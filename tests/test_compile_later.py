"""A new model's first run: ``train.compile: auto`` trains eagerly where no package of the step
is cached and a first compile would cost more than the eager steps, saying so, and compiles
the step for later runs in a child process (one per package at a time, switched off by
VIBENCH_BACKGROUND_COMPILE=false); the next run loads what the child packaged."""

from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import COIN, QUICK, fitted, setup, vibench
from workbench.compile import background, compiled_step, package_cache

SWITCH = "VIBENCH_BACKGROUND_COMPILE"
EAGER = re.compile(r"training eagerly, not compiled: a first compile of this step \((\d+) "
                   r"operations\) takes about (\d+) s, more than its (\d+) eager steps \(about "
                   r"(\d+) s\)")
TRACED = re.compile(r"training on the traced step, replayed uncompiled: a first compile of this "
                    r"step \((\d+) operations\) takes about (\d+) s, more than its (\d+) eager "
                    r"steps \(about (\d+) s\)")
EAGER_OPS = re.compile(r"\((\d+) operations\)")
STARTED = re.compile(r"compiling this step for later runs in the background \(pid (\d+), log "
                     r"(.+)\)")


class Traced(Exception):
    """Raised where the step would be traced."""


@pytest.fixture
def cold(tmp_path: Path, monkeypatch) -> Path:
    """An empty compile cache (ours, in its folder), and no step ever traced."""
    def refuse(*args, **kwargs):
        raise Traced("traced")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compiled_step, "_make_fx", refuse)
    return package_cache.check_folders()


def later_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".later." in p.name)


def test_auto_trains_eagerly_on_a_cold_cache_where_compiling_would_not_pay(cold: Path):
    run = setup("train.compile=auto", "train.steps=4000", "train.eval_every=0")
    assert run.compiled is None and len(run.notes) == 1, run.notes
    ops, first, steps, eager = map(int, EAGER.fullmatch(run.notes[0]).groups())
    assert steps == 4000 and eager < first and ops > 100
    assert later_files(cold) == []  # switched off for the suite (tests/conftest.py)
    many = setup("train.compile=auto", "train.steps=1000000", "train.eval_every=0")
    assert many.notes == ["training eagerly, not compiled: tracing failed: traced"]


def test_meanwhile_the_traced_step_is_replayed_where_tracing_pays(tmp_path: Path, monkeypatch):
    """With no package cached and a first compile dearer than the eager steps, a run long
    enough to pay for tracing replays the traced step uncompiled (no Pyro in it), checked
    against eager: the same fit to rounding, and summary.json says it was not compiled."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    fits = []
    for setting in ("auto", "false"):
        run = setup("train.steps=4000", f"train.compile={setting}", "train.eval_every=0")
        for _ in range(20):
            assert run.step()[1] == ""
        fits.append(fitted())
        if setting == "auto":
            assert run.compiled is not None and not run.compiled.compiled
            ops, first, steps, eager = map(int, TRACED.fullmatch(run.notes[0]).groups())
            assert steps == 4000 and eager < first
    assert all(torch.allclose(fits[0][k], fits[1][k], rtol=1e-5, atol=1e-6) for k in fits[0])


def test_a_pipelines_fit_never_compiles_its_step_itself(cold: Path):
    """A fit of the automatic pipeline (``compile_for``: the steps its stage's fits share)
    loads a package where one is cached; where none is, it never compiles, even where a first
    compile would pay, and leaves the compiling to a child (switched off here): eager where
    the step cannot be traced (as here), else the traced step replayed (below)."""
    from tests.helpers import resolved
    from workbench.plugins.registry import get_registry
    from workbench.train.runner import Run

    recipe = resolved("train.compile=auto", "train.steps=300", "train.eval_every=0")
    run = Run.setup(recipe, get_registry(), compile_for=10**7)
    assert run.compiled is None
    assert run.notes == ["training eagerly, not compiled: no compiled package of this step "
                         f"({EAGER_OPS.search(' '.join(run.notes))[1]} operations) is cached "
                         "yet, and a pipeline's fits compile none themselves"]
    alone = setup("train.compile=auto", "train.steps=10000000", "train.eval_every=0")
    assert alone.notes == ["training eagerly, not compiled: tracing failed: traced"]


def test_a_pipelines_fits_replay_the_first_ones_traced_step(tmp_path: Path, monkeypatch):
    """With no package cached, a pipeline's fits (``compile_for``: the steps they share,
    enough to pay for tracing) replay the traced step uncompiled: traced and checked once,
    the second fit of the same step replays the first's graph, and trains as eager does."""
    from tests.helpers import resolved
    from workbench.plugins.registry import get_registry
    from workbench.train.runner import Run

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(compiled_step, "_TRACED", {})
    checked = []
    original = compiled_step._checked_graph

    def counted(*args, **kwargs):
        checked.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(compiled_step, "_checked_graph", counted)
    recipe = resolved("train.compile=auto", "train.steps=300", "train.eval_every=0")
    fits = []
    for _ in range(2):
        run = Run.setup(recipe, get_registry(), compile_for=4000)
        assert run.compiled is not None and not run.compiled.compiled, run.notes
        assert TRACED.fullmatch(run.notes[0]), run.notes
        for _ in range(20):
            assert run.step()[1] == ""
        fits.append(fitted())
    assert len(checked) == 1
    run = setup("train.steps=300", "train.compile=false", "train.eval_every=0")
    for _ in range(20):
        assert run.step()[1] == ""
    eager = fitted()
    assert all(torch.allclose(fits[1][k], eager[k], rtol=1e-5, atol=1e-6) for k in eager)


def test_a_run_left_eager_for_a_cold_cache_is_bitwise_the_eager_run(cold: Path):
    fits = []
    for setting in ("auto", "false"):
        run = setup("train.steps=4000", f"train.compile={setting}", "train.eval_every=0")
        assert run.compiled is None
        for _ in range(3):
            run.step()
        fits.append(fitted())
    assert all(torch.equal(fits[0][k], fits[1][k]) for k in fits[0])


def key_of_the_coin() -> str:
    run = setup("train.compile=false", "train.steps=4000", "train.eval_every=0")
    with pytest.raises(compiled_step.NotYet) as caught:
        compiled_step.compile_step(run.svi, run.data, steps=4000)
    return caught.value.key


def holding(lock: Path) -> subprocess.Popen:
    """A process that takes ``lock`` as a child would (flock, its pid written) and keeps it
    until its stdin closes; it prints ``ready`` once it holds it."""
    return subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys\n"
         f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, b'%d' % os.getpid())\n"
         "print('ready', flush=True)\n"
         "sys.stdin.read()"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def test_one_child_per_step_and_a_dead_ones_lock_is_taken_over(cold: Path, monkeypatch):
    """A child holding the step's lock keeps a second from starting; once it is gone (its
    pid still in the file), the next run starts one, which holds the lock in its turn."""
    monkeypatch.setenv(SWITCH, "true")
    lock = package_cache.file(key_of_the_coin(), background.LOCK)
    holder = holding(lock)
    assert holder.stdout.readline() == "ready\n"
    run = setup("train.compile=auto", "train.steps=4000", "train.eval_every=0")
    assert run.notes[1:] == [f"a child is compiling this step for later runs in the "
                             f"background already (pid {holder.pid})"]
    assert not any(name.endswith(background.LOG) for name in later_files(cold))
    holder.communicate("")  # it exits; its pid stays in the lock file
    assert lock.read_text() == str(holder.pid)
    run = setup("train.compile=auto", "train.steps=4000", "train.eval_every=0")
    pid = int(STARTED.fullmatch(run.notes[1])[1])
    try:
        assert lock.read_text() == f"{pid}\n"
        with open(lock, "rb") as handle:  # the child holds it
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.killpg(pid, signal.SIGKILL)  # its own session: it and anything it started
        os.waitpid(pid, 0)  # this process started it
    again = setup("train.compile=auto", "train.steps=4000", "train.eval_every=0")
    assert again.notes == run.notes  # one child a process, however often set-up asks


def test_one_child_at_a_time_and_a_few_waiting_another_step_waits_for_a_later_run(
        cold: Path, monkeypatch):
    """While a child compiles one step (the folder's lock held) and others wait for their
    turn (every waiting slot's lock held), a run of another step starts none, so a pipeline's
    refit or a grid never has more than one compiling and a few waiting beside it."""
    monkeypatch.setenv(SWITCH, "true")
    holders = [holding(package_cache.file(name, background.LOCK))
               for name in (background.ANY, *background.WAITING)]
    try:
        assert [holder.stdout.readline() for holder in holders] == ["ready\n"] * len(holders)
        run = setup("train.compile=auto", "train.steps=4000", "train.eval_every=0")
        working, *waiting = (str(holder.pid) for holder in holders)
        assert run.notes[1:] == [f"another step is being compiled in the background (pid "
                                 f"{working}) and 3 more wait for their turn (pids "
                                 f"{', '.join(waiting)}); this step will be compiled by a "
                                 "later run"]
        assert not any(name.endswith(background.LOG) for name in later_files(cold))
    finally:
        for holder in holders:
            holder.communicate("")


def test_a_step_met_by_a_child_at_work_is_compiled_after_it(cold: Path, monkeypatch):
    """A run of another step while a child is at work starts a child that waits for its
    turn: it holds a waiting slot's lock, not the folder's, until the child at work is done;
    then it holds the folder's and lets the slot go, for the next run's child."""
    monkeypatch.setenv(SWITCH, "true")
    first = package_cache.file(background.ANY, background.LOCK)
    second = package_cache.file(background.WAITING[0], background.LOCK)
    holder = holding(first)
    assert holder.stdout.readline() == "ready\n"
    run = setup("train.compile=auto", "train.steps=4000", "train.eval_every=0")
    waiting = re.fullmatch(r"compiling this step for later runs in the background once pid "
                           rf"{holder.pid} is done \(pid (\d+), log .+\)", run.notes[1])
    assert waiting, run.notes
    pid = int(waiting[1])
    try:
        assert second.read_text() == f"{pid}\n" and first.read_text() == str(holder.pid)
        holder.communicate("")  # done: the waiting child's turn
        deadline = time.monotonic() + 60
        while first.read_text().strip() != str(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert first.read_text() == f"{pid}\n"
        with open(first, "rb") as handle:  # it holds the first lock now
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with open(second, "rb") as handle:  # and has let the second go
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.killpg(pid, signal.SIGKILL)  # its own session: it and anything it started
        os.waitpid(pid, 0)



def test_a_short_run_loads_a_cached_package_and_has_none_built(cold: Path, monkeypatch):
    """Eager steps estimated at more than loading a package costs, and fewer than would pay
    for building one: a cached package is looked up (it loads in a tenth of a second), none
    is built, and nothing is said; a still shorter run does not look."""
    looked = []

    def packaged(*args):
        looked.append(True)
        return None, "key"

    monkeypatch.setattr(compiled_step, "_packaged", packaged)
    per_step = 236 * compiled_step.EAGER_OP_SECONDS["cpu"]  # the coin's step, about
    between = (compiled_step.LOAD_SECONDS + compiled_step.PAYS_SECONDS["cpu"]) / 2 / per_step
    run = setup("train.compile=auto", f"train.steps={int(between)}", "train.eval_every=0")
    assert run.compiled is None and run.notes == [] and looked == [True]
    shorter = int(compiled_step.LOAD_SECONDS / 2 / per_step)
    run = setup("train.compile=auto", f"train.steps={shorter}", "train.eval_every=0")
    assert run.compiled is None and run.notes == [] and looked == [True]


@pytest.mark.parametrize("value, said", [
    ("false", None),
    ("maybe", "could not start compiling this step in the background: "
              "VIBENCH_BACKGROUND_COMPILE='maybe': expected true or false (default true)")])
def test_the_switch_turns_it_off_and_a_bad_value_is_a_note(cold: Path, monkeypatch, value: str,
                                                          said: str | None):
    monkeypatch.setenv(SWITCH, value)
    run = setup("train.compile=auto", "train.steps=4000", "train.eval_every=0")
    assert run.compiled is None and EAGER.fullmatch(run.notes[0])
    assert run.notes[1:] == ([said] if said else [])
    assert later_files(cold) == []


def wait_for_the_child(log: Path) -> str:
    """The child's log once it has exited: its lock is free then."""
    lock = log.with_name(log.name.replace(background.LOG, background.LOCK))
    with open(lock, "rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
    return log.read_text()


@pytest.mark.slow  # a real cold compile in the child
def test_the_child_fills_the_cache_and_the_next_run_loads_the_step(tmp_path: Path):
    env = {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"), "VIBENCH_COMPILE": "auto",
           SWITCH: "true"}
    sets = [x for s in QUICK for x in ("--set", s)]
    first = vibench("run", str(COIN), *sets, "--out", str(tmp_path / "a"), env=env,
                    timeout=600)
    assert first.returncode == 0, first.stderr
    assert TRACED.search(first.stderr), first.stderr
    started = STARTED.search(first.stderr)
    log = wait_for_the_child(Path(started[2]))
    assert "packaged the step" in log, log
    second = vibench("run", str(COIN), *sets, "--out", str(tmp_path / "b"), env=env,
                     timeout=600)
    assert second.returncode == 0, second.stderr
    assert "training eagerly" not in second.stderr and "compiling" not in second.stderr
    summaries = [json.loads((tmp_path / d / "summary.json").read_text()) for d in "ab"]
    assert [s["compiled"] for s in summaries] == [False, True]
    assert summaries[0]["final_loss"] == pytest.approx(summaries[1]["final_loss"], rel=1e-4)


@pytest.mark.slow  # a real child, which fails once it has imported vibench
def test_a_child_that_fails_leaves_a_note_and_no_run_starts_another(tmp_path: Path):
    """A recipe naming a notebook's model cannot be set up in another process."""
    script = ("import sys\n"
              "import pyro, pyro.distributions as dist\n"
              "from workbench import fit\n"
              "def coin(flips):\n"
              "    fairness = pyro.sample('fairness', dist.Beta(10.0, 10.0))\n"
              "    with pyro.plate('flips', flips.shape[0]):\n"
              "        pyro.sample('obs', dist.Bernoulli(fairness), obs=flips)\n"
              "fit(model=coin, data={'flips': [1.0] * 6 + [0.0] * 4}, guide='auto_normal',\n"
              "    loss='elbo', optimizer={'name': 'adam', 'lr': 0.01}, out=sys.argv[1],\n"
              "    train={'steps': 2000, 'eval_every': 0, 'plots': False,\n"
              "           'diagnostics': False})\n")
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache"),
           "VIBENCH_COMPILE": "auto", SWITCH: "true"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "a")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    log = wait_for_the_child(Path(STARTED.search(done.stderr)[2]))
    assert log.startswith("failed: ") and "notebook:" in log, log
    again = subprocess.run([sys.executable, "-c", script, str(tmp_path / "b")], env=env,
                           capture_output=True, text=True, timeout=300)
    waits = EAGER.search(again.stderr) or TRACED.search(again.stderr)  # as long as it pays
    assert waits and not STARTED.search(again.stderr), again.stderr
