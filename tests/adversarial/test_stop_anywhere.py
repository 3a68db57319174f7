"""One stop policy at every moment of ``vibench run``: a stop signal (SIGINT, SIGTERM, SIGHUP)
sent at any point of a real run (its imports, plugin loading, set-up, ``lr: auto``, training,
each stage of the automatic pipeline, the report) ends it with the shell's code, 128 + the
signal's number (or, once the run is complete, dies of the signal itself, which the shell
reports so too), one line and no traceback, and leaves every file it wrote whole.

The signals are sent at random moments spread over a run's life, measured first on an
unsignalled run; the moment the child has installed vibench's handlers (its SigCgt in
/proc/PID/status: a signal before that meets Python's own start-up, which vibench cannot
reach) is the start of its life. The quick test sends a handful; the slow one loops enough
signals to catch a policy that fails one time in five."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import COIN, REPO

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(),
                                reason="readiness is read from /proc/PID/status (Linux)")

COIN_RUN = [str(COIN), "--steps", "300", "--set", "train.checkpoint_every=50"]
AUTO_RUN = [str(COIN), "--set", "guide=auto", "--set", "train.plots=false", "--set",
            "auto.stages=[start, {name: gaussian, runs: 2, max_steps: 60}, rhat, psis]"]
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
BAD = ("Traceback", "(a bug)", "could not write", "Exception ignored", "Fatal Python error")


@dataclass
class Outcome:
    """One signalled run: what was sent when, and how the child ended."""

    signum: int
    delay: float
    completed_before: bool
    code: int
    stderr: str
    out: Path
    problems: list[str] = field(default_factory=list)


def handles_stop_signals(pid: int) -> bool:
    """Whether the process catches SIGTERM yet: vibench's handlers are installed."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next(line for line in text.splitlines() if line.startswith("SigCgt:"))
    return bool(int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)))


def launch(args: list[str], out: Path, env: dict | None = None
           ) -> tuple[subprocess.Popen, float]:
    """``vibench run ARGS --out OUT`` in a child (its environment plus ``env``), once it
    handles stop signals, and when."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("VIBENCH_DEBUG", None)
    child = subprocess.Popen([sys.executable, "-m", "workbench", "run", *args, "--out",
                              str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    while not handles_stop_signals(child.pid):
        if child.poll() is not None:
            raise AssertionError(f"the run ended before it handled signals: "
                                 f"{child.communicate()[1]}")
        time.sleep(0.001)
    return child, time.monotonic()


def life(args: list[str], out: Path, env: dict | None = None) -> float:
    """Seconds an unsignalled run lives once it handles signals (it must succeed)."""
    child, ready = launch(args, out, env)
    _, stderr = child.communicate(timeout=600)
    assert child.returncode == 0, stderr
    return time.monotonic() - ready


def completed(out: Path) -> bool:
    try:
        return json.loads((out / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def signalled(args: list[str], out: Path, signum: int, delay: float,
              env: dict | None = None) -> Outcome:
    """A run sent ``signum`` ``delay`` seconds after it handles signals, and its end."""
    child, ready = launch(args, out, env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(child.stderr), daemon=True)
    reader.start()
    time.sleep(max(0.0, ready + delay - time.monotonic()))
    before = completed(out)
    if child.poll() is None:
        child.send_signal(signum)
    try:
        child.wait(timeout=180)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    reader.join(timeout=10)
    outcome = Outcome(signum, delay, before, child.returncode, "".join(lines), out)
    outcome.problems = judge(outcome)
    return outcome


def judge(o: Outcome) -> list[str]:
    """What is wrong with how a signalled run ended (nothing, when the policy held)."""
    problems = []
    expected = {128 + o.signum} | ({0} if o.completed_before else set())
    if completed(o.out):  # killed by the signal's own default action in Python's last
        expected.add(-o.signum)  # moments, the handlers gone: the shell sees 128 + signum
    if o.code not in expected:
        problems.append(f"exit {o.code}, expected {sorted(expected)}")
    problems += [f"stderr has {bad!r}" for bad in BAD if bad in o.stderr]
    if o.code == 128 + o.signum and "interrupted" not in o.stderr:
        problems.append("no 'interrupted' line")
    problems += whole_files(o.out)
    return problems


def whole_files(out: Path) -> list[str]:
    """Files in the run directory (and its fits) that are not whole."""
    from workbench.train import checkpoint

    problems = []
    for summary in out.rglob("summary.json"):
        try:
            json.loads(summary.read_text())
        except ValueError as exc:
            problems.append(f"{summary} does not parse: {exc}")
    for saved in out.rglob("checkpoint.pt"):
        try:
            checkpoint.read(saved, str(saved))
        except Exception as exc:  # noqa: BLE001 - any failure to read it back is the finding
            problems.append(f"{saved} is not readable: {exc}")
    return problems


def sweep(tmp_path: Path, args: list[str], count: int, seed: int, env: dict | None = None
          ) -> list[Outcome]:
    """``count`` runs of ``args``, each sent a signal: the first as its handlers go in (the
    command line still to import), the others at random moments of its life, more of them
    early (imports, plugins, set-up: where most can go wrong) than late."""
    span = life(args, tmp_path / "whole", env)
    chance = random.Random(seed)
    delays = [0.0] + [span * chance.random() ** 2 for _ in range(count - 1)]
    return [signalled(args, tmp_path / f"r{i}", chance.choice(SIGNALS), delay, env)
            for i, delay in enumerate(delays)]


def failures(outcomes: list[Outcome]) -> list[str]:
    return [f"{signal.Signals(o.signum).name} at {o.delay:.2f} s: {'; '.join(o.problems)}\n"
            f"{o.stderr[-600:]}" for o in outcomes if o.problems]


def test_a_stop_signal_at_a_few_moments_of_a_run_ends_it_with_its_code(tmp_path: Path):
    outcomes = sweep(tmp_path, COIN_RUN, 4, seed=1)
    assert not failures(outcomes), "\n".join(failures(outcomes))


@pytest.mark.slow
@pytest.mark.parametrize("args,count,env", [
    pytest.param(COIN_RUN, 45, {}, id="coin"),
    pytest.param(AUTO_RUN, 20, {}, id="auto"),  # lr: auto, each stage, the answer's report
    pytest.param(COIN_RUN, 10, {"VIBENCH_COMPILE": "true"}, id="coin-compiled"),
])
def test_a_stop_signal_at_any_moment_of_a_run_ends_it_with_its_code(tmp_path: Path,
                                                                    args: list[str],
                                                                    count: int, env: dict):
    outcomes = sweep(tmp_path, args, count, count, env)
    assert not failures(outcomes), "\n".join(failures(outcomes))
