"""What each run of a comparison left: its output kept in its run directory, its status
(ok, failed or interrupted) and error, and its numbers. What the run saved decides before its
exit code does, so the table says the same whichever backend ran it."""

from __future__ import annotations

import signal
from dataclasses import dataclass, field
from pathlib import Path

from workbench.compare.backends import Outcome
from workbench.compare.metrics import read_summary
from workbench.compare.plan import Spec
from workbench.rundir import files

STOPPED_CODES = (130, 143, -signal.SIGINT, -signal.SIGTERM)  # a run that stopped as asked
STDOUT, STDERR = "stdout.txt", "stderr.txt"  # a run's output, beside what it wrote itself


@dataclass
class Result:
    spec: Spec
    run_dir: Path
    status: str  # ok | failed | interrupted
    exit_code: int | None = None
    error: str = ""
    metrics: dict[str, float | None] = field(default_factory=dict)
    khat_reading: str = ""  # what the run's k-hat says: good, ok or bad: do not trust
    draws: int | None = None  # the guide draws behind its k-hat, ELBO and log evidence
    steps: int | None = None
    wall_seconds: float | None = None
    process_seconds: float | None = None


def refused(spec: Spec, run_dir: Path) -> Result:
    """A run its problems kept from starting (exit code 2, as ``vibench run`` would give):
    the problems go in its stderr.txt."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lines = [f"error: {line}" for line in spec.refused]
    files.write_atomic(run_dir / STDERR, ("\n".join(lines) + "\n").encode())
    return Result(spec, run_dir, "failed", 2, lines[-1])


def collect(spec: Spec, run_dir: Path, outcome: Outcome, timeout: float | None) -> Result:
    """A finished run's result: its output written to its run directory (made here for a run
    refused before training made one), then its status, error and numbers."""
    stderr = outcome.stderr + (f"error: {outcome.lost}\n" if outcome.lost else "")
    _write_output(run_dir, stderr, outcome.stdout)
    result = Result(spec, run_dir, "failed", outcome.exit_code, process_seconds=outcome.seconds)
    classify(result, outcome, timeout)
    return result


def _write_output(run_dir: Path, stderr: str, stdout: str, tries: int = 3) -> None:
    """The run's stderr and stdout in its directory, made again where it went meanwhile: a run
    whose Ray worker died is sent SIGTERM and, stopping in its set-up, removes the directory
    it claimed, possibly after the task was already reported lost."""
    for attempt in range(tries):
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            files.write_atomic(run_dir / STDERR, stderr.encode())
            files.write_atomic(run_dir / STDOUT, stdout.encode())
            return
        except FileNotFoundError:
            if attempt == tries - 1:
                raise


def classify(result: Result, outcome: Outcome, timeout: float | None) -> None:
    """A finished run's status, error and numbers. What it saved decides: a run whose
    summary.json says completed or interrupted is ok or interrupted whatever its exit
    code (it may have been killed after saving); else its exit code, or why its task
    was lost, does."""
    summary = read_summary(result)
    saved = summary.status if summary else None
    code, reason = outcome.exit_code, outcome.reason
    lines = [line.strip() for line in outcome.stderr.splitlines() if line.strip()]
    last = lines[-1] if lines else ""
    if saved == "completed" or (saved is None and code == 0):
        result.status, result.error = "ok", ""
    elif reason == "timed out":
        at = f", at step {result.steps}" if result.steps is not None else ""
        result.status, result.error = "failed", f"timed out after {timeout:g} s{at}"
    elif code is None:  # its task was lost; what the run saved may still be there
        result.status = "interrupted" if reason else "failed"
        result.error = outcome.lost or "lost"
    elif saved in ("interrupted", "failed"):
        result.status = saved
        result.error = last or str(summary.error or saved)
    else:
        stopped = bool(reason) or code in STOPPED_CODES
        result.status = "interrupted" if stopped else "failed"
        killed = code < 0 and code != -signal.SIGINT
        result.error = (f"killed by {_signal_name(-code)}" if killed
                        else last or f"exit code {code}")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def group(results: list[Result]) -> list[list[Result]]:
    """The results per combination, in the grid's order."""
    groups: dict[tuple[str, ...], list[Result]] = {}
    for result in results:
        groups.setdefault(result.spec.combo, []).append(result)
    return list(groups.values())
