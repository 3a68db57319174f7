"""``vibench compare`` under signals and with bad children: real processes, real signals."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import COIN, LONG, alive, read_csv, runs_of, wait_training

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads /proc and relies on Linux's parent-death signal")

# A child that, once it has saved an interrupted run, goes on writing to its run directory
# (as a slow report would) for LINGER_SECONDS, longer than compare once waited, then exits
# with an unusual code. Put on PYTHONPATH, Python imports it in every process it starts.
LINGER = '''
import atexit, json, os, sys, time
from pathlib import Path


def linger():
    if "run" not in sys.argv or "--out" not in sys.argv:
        return
    run_dir = Path(sys.argv[sys.argv.index("--out") + 1])
    try:
        status = json.loads((run_dir / "summary.json").read_text())["status"]
    except OSError:
        return
    if status == "interrupted":
        for i in range(int(float(os.environ["LINGER_SECONDS"]) * 4)):
            (run_dir / "linger.txt").write_text(str(i))
            time.sleep(0.25)
        (run_dir / "lingered").touch()
        real_exit(3)


real_exit = os._exit  # vibench leaves by os._exit after a stop signal: linger there too


def exit_after_lingering(code):
    linger()
    real_exit(code)


os._exit = exit_after_lingering
atexit.register(linger)
'''


def start_compare(tmp_path: Path, out: Path, *args: str, env: dict | None = None,
                  unset: tuple[str, ...] = (), stderr: Path | None = None) -> subprocess.Popen:
    """``vibench compare COIN ARGS --out OUT`` (runs without plots) in a child process, as a
    user would start it, with ``env`` added to this environment and ``unset`` taken out; its
    stderr to a pipe, or to the file ``stderr`` for a test to read while it runs."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    for name in ("VIBENCH_DEBUG", *unset):
        full_env.pop(name, None)
    with open(stderr, "w") if stderr is not None else contextlib.nullcontext() as log:
        return subprocess.Popen(
            [sys.executable, "-m", "workbench", "compare", str(COIN), *args,
             "--set", "train.plots=false", "--out", str(out)],  # no test here reads them
            cwd=tmp_path, env=full_env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE if log is None else log, text=True,
        )


def wait_line(path: Path, text: str, timeout: float = 60) -> None:
    """Wait until the file ``path`` (a child's stderr) has a line starting with ``text``."""
    deadline = time.monotonic() + timeout
    while not any(line.startswith(text) for line in path.read_text().splitlines()):
        assert time.monotonic() < deadline, f"no line {text!r} in {path.name}"
        time.sleep(0.1)


def environ(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(e.split("=", 1) for e in entries if "=" in e)


def test_a_run_over_the_timeout_is_stopped_and_reported_and_the_others_finish(tmp_path: Path):
    out = tmp_path / "cmp"
    child = start_compare(tmp_path, out, "--grid", f"train.steps=10,{LONG}", "--jobs", "2",
                          "--timeout", "10")
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 1, stderr
    assert "Traceback" not in stderr
    assert "each for at most 10 s" in stderr
    rows = {r["train.steps"]: r for r in read_csv(out / "compare.csv")}
    assert rows["10"]["status"] == "ok" and rows["10"]["error"] == ""
    slow = rows[LONG]
    assert slow["status"] == "failed" and slow["error"].startswith("timed out after 10 s")
    # SIGTERM kills today's child; one that saves on SIGTERM exits 130 or 143 with its numbers
    assert int(slow["exit_code"]) in (-signal.SIGTERM, 130, 143)
    if slow["exit_code"] != str(-signal.SIGTERM):
        assert slow["error"] == f"timed out after 10 s, at step {slow['steps']}"
        assert int(slow["steps"]) > 0 and slow["final_loss"] != ""
    assert 10 <= float(slow["process_seconds"]) < 50
    assert "failed: timed out after 10 s" in stdout  # in the table
    assert not runs_of(out)


@pytest.mark.slow  # quick: one stop signal to compare and its runs (below), and the timeout
def test_two_quick_ctrl_cs_kill_the_runs_and_still_write_the_results(tmp_path: Path):
    out = tmp_path / "cmp"
    log = tmp_path / "stderr.txt"
    child = start_compare(tmp_path, out, "--grid", "optimizer.lr=0.01,0.02", "--steps", LONG,
                          "--jobs", "2", env={"OMP_NUM_THREADS": "2"}, stderr=log)
    wait_training([out / "optimizer.lr=0.01,seed=0", out / "optimizer.lr=0.02,seed=0"])
    runs = runs_of(out)
    assert len(runs) == 2
    assert all(environ(pid)["OMP_NUM_THREADS"] == "2" for pid in runs)  # the user's choice
    child.send_signal(signal.SIGINT)
    wait_line(log, "stopping: ")  # the first was heard: the second is a second one
    child.send_signal(signal.SIGINT)
    stdout, _ = child.communicate(timeout=60)
    stderr = log.read_text()
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: 0 of 2 runs finished")
    rows = read_csv(out / "compare.csv")
    assert [r["optimizer.lr"] for r in rows] == ["0.01", "0.02"]
    assert all(r["status"] == "interrupted" for r in rows), rows
    assert "optimizer.lr" in stdout and f"compare.csv: {out / 'compare.csv'}" in stdout
    assert not any(alive(pid) for pid in runs)


def test_the_runs_die_with_compare_even_when_it_is_killed(tmp_path: Path):
    out = tmp_path / "cmp"
    child = start_compare(tmp_path, out, "--grid", "optimizer.lr=0.01,0.02", "--steps", LONG,
                          "--jobs", "2", unset=("OMP_NUM_THREADS", "MKL_NUM_THREADS"))
    try:
        wait_training([out / "optimizer.lr=0.01,seed=0", out / "optimizer.lr=0.02,seed=0"])
        runs = runs_of(out)
        assert len(runs) == 2
        threads = str(max(1, len(os.sched_getaffinity(0)) // 2))  # the cores shared by 2 jobs
        assert all(environ(pid)["OMP_NUM_THREADS"] == threads for pid in runs)
        child.kill()
        child.wait(timeout=10)
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in runs) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in runs), "runs outlived compare"
    finally:
        for pid in runs_of(out):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # quick: the timeout test above and the Ctrl-C below stop runs that save
def test_a_run_that_saved_is_waited_for_and_shown_with_its_numbers(tmp_path: Path):
    """After Ctrl-C a run that saved, then goes on working for 4 s (writing a file: progress
    compare sees) and exits 3, is not killed, and is reported as interrupted with its numbers."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(LINGER)
    out = tmp_path / "cmp"
    path = os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))
    child = start_compare(tmp_path, out, "--grid", "optimizer.lr=0.01", "--steps", LONG,
                          env={"PYTHONPATH": path, "LINGER_SECONDS": "4"})
    run = out / "optimizer.lr=0.01,seed=0"
    wait_training([run])
    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert (run / "lingered").is_file()  # it was left to finish
    [row] = read_csv(out / "compare.csv")
    assert row["status"] == "interrupted" and row["exit_code"] == "3"
    steps = json.loads((run / "summary.json").read_text())["steps"]
    assert row["steps"] == str(steps) and float(row["final_loss"]) > 0
    assert row["error"].startswith(f"interrupted after step {steps}")
    table = next(line for line in stdout.splitlines() if line.strip().startswith("0.01"))
    assert f"{float(row['final_loss']):.4f}" in table and "interrupted after step" in table


# The quick suite sends Ctrl-C; SIGTERM and SIGHUP (the terminal closing) here, and two quick
# Ctrl-Cs above, run in the slow suite.
@pytest.mark.parametrize("signum", [signal.SIGINT,
                                    pytest.param(signal.SIGTERM, marks=pytest.mark.slow),
                                    pytest.param(signal.SIGHUP, marks=pytest.mark.slow)])
def test_a_stop_signal_stops_every_run_and_compare_exits_as_vibench_run_does(
        tmp_path: Path, signum: int):
    """Ctrl-C, SIGTERM (what Slurm and Kubernetes send) and the terminal closing (SIGHUP) stop
    the runs, each saving what it learned, and compare exits 128 + the signal's number, as
    ``vibench run`` does: 130, 143, 129."""
    out = tmp_path / "cmp"
    child = start_compare(tmp_path, out, "--grid", "optimizer.lr=0.01,0.02", "--steps", LONG,
                          "--jobs", "1")
    run = out / "optimizer.lr=0.01,seed=0"
    wait_training([run])
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: 0 of 2 runs finished")
    rows = read_csv(out / "compare.csv")
    assert [r["status"] for r in rows] == ["interrupted", "interrupted"]
    assert rows[1]["error"] == "not started: interrupted"  # one at a time: never started
    summary = json.loads((run / "summary.json").read_text())  # saved as on Ctrl-C
    assert 0 < summary["steps"] < 1_000_000
    assert "optimizer.lr" in stdout
