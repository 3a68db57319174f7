"""``vibench runs`` lists what was run and ``vibench show`` reprints a run's report, both from
the run directories alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import COIN, REPO, python, vibench

QUICK = ("--steps", "30", "--set", "train.plots=false")


def strict_json(text: str):
    """JSON as a strict reader takes it: no NaN or Infinity."""
    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """Two finished runs, the older made in this process (as ``workbench.fit`` makes one),
    the newer by ``vibench run``, and what ``vibench run`` printed for it."""
    from workbench import service
    from workbench.plugins.registry import get_registry

    root = tmp_path_factory.mktemp("runs")
    service.start(COIN, ["train.steps=30", "train.plots=false"], root / "older",
                  get_registry()).train()
    result = vibench("run", str(COIN), *QUICK, "--out", str(root / "newer"))
    assert result.returncode == 0, result.stderr
    return root, {"newer": result.stdout}


def test_runs_lists_runs_newest_first_with_status_and_steps(two_runs):
    root, _ = two_runs
    result = vibench("runs", str(root))
    assert result.returncode == 0, result.stderr
    header, *lines = result.stdout.strip().splitlines()
    assert header.split()[:3] == ["name", "status", "steps"]
    assert [line.split()[-1] for line in lines] == [str(root / "newer"), str(root / "older")]
    assert all(line.split()[:3] == ["coin", "completed", "30"] for line in lines)

    listed = strict_json(vibench("runs", str(root), "--json").stdout)
    assert [Path(info["path"]).name for info in listed] == ["newer", "older"]
    summary = json.loads((root / "newer" / "summary.json").read_text())
    assert listed[0] | {"updated": None} == {
        "name": "coin", "status": "completed", "steps": 30,
        "final_loss": summary["final_loss"], "khat": summary["diagnostics"]["khat"],
        "wall_seconds": summary["wall_seconds"], "path": str(root / "newer"),
        "updated": None, "source": "summary.json"}


def test_show_prints_the_report_run_printed(two_runs):
    root, printed = two_runs
    result = vibench("show", str(root / "newer"))
    assert result.returncode == 0, result.stderr
    assert result.stdout == printed["newer"] and result.stderr == ""
    assert result.stdout.splitlines()[-1].startswith("final loss ")
    shown = strict_json(vibench("show", str(root / "newer"), "--json").stdout)
    assert shown == json.loads((root / "newer" / "summary.json").read_text())


def test_runs_of_finished_runs_does_not_import_torch(two_runs):
    root, _ = two_runs
    code = ("import sys; from workbench.cli import app\n"
            f"app(args=['runs', {str(root)!r}], standalone_mode=False)\n"
            "print('torch' in sys.modules)")
    result = python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_runs_marks_a_locked_run_running_and_a_killed_one_by_its_checkpoint(tmp_path: Path):
    live = tmp_path / "live"
    child = subprocess.Popen(
        [sys.executable, "-m", "workbench", "run", str(COIN), "--steps", "100000",
         "--out", str(live)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not (live / "checkpoint.pt").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        result = vibench("runs", str(tmp_path), "--json")
        assert result.returncode == 0, result.stderr
        [info] = strict_json(result.stdout)
        assert info["status"] == "running" and info["pid"] == child.pid
        assert info["source"] == "checkpoint.pt" and isinstance(info["steps"], int)
        shown = vibench("show", str(live))
        assert shown.returncode == 2
        assert shown.stderr == f"error: {live}: no summary.json yet: the run is still running\n"
    finally:
        child.kill()
        child.wait(timeout=60)
    [info] = strict_json(vibench("runs", str(tmp_path), "--json").stdout)
    assert info["status"] == "interrupted" and info["source"] == "checkpoint.pt"
    assert info["name"] == "coin" and info["steps"] >= 0 and "pid" not in info
    assert vibench("show", str(live)).stderr == (
        f"error: {live}: no summary.json: the run was stopped before writing one; go on "
        f"with: vibench run --resume {live}\n")


def test_runs_shows_an_unreadable_summary_and_looks_in_compare_directories(tmp_path: Path):
    summary = {"recipe": {"name": "coin"}, "steps": 7, "wall_seconds": 75.0,
               "steps_per_second": 0.1, "final_loss": None, "posterior": {},
               "diagnostics": {"khat": None, "reason": "interrupted"}, "status": "interrupted"}
    good = tmp_path / "compare-coin" / "lr=0.1-seed0"
    bad = tmp_path / "broken"
    for path in (good, bad, tmp_path / "compare-coin" / "refused"):
        path.mkdir(parents=True)
    (good / "summary.json").write_text(json.dumps(summary))
    (bad / "summary.json").write_text('{"steps": 3')
    result = vibench("runs", str(tmp_path))
    assert result.returncode == 0 and "Traceback" not in result.stderr
    rows = {line.split()[-1]: line.split()[:-1] for line in result.stdout.splitlines()[1:]}
    assert rows == {str(good): ["coin", "interrupted", "7", "-", "-", "0:01:15"],
                    str(bad): ["?", "unreadable", "-", "-", "-", "-"]}
    listed = {Path(i["path"]).name: i for i in strict_json(vibench("runs", str(tmp_path),
                                                                   "--json").stdout)}
    assert listed["broken"]["error"].startswith(f"{bad / 'summary.json'}: cannot be read: ")

    shown = vibench("show", str(good))
    assert shown.returncode == 0
    assert shown.stdout == ("PSIS k-hat not computed: interrupted\n"
                            f"final loss - | 7 steps in 75.0 s (0 steps/s) | {good}\n")
    assert shown.stderr == "note: this run is interrupted\n"


@pytest.mark.parametrize("make, expected", [
    (lambda d: None, "{d}: not a run directory (no summary.json or checkpoint.pt)"),
    (lambda d: (d / "summary.json").write_text("[1, 2]"),
     "{d}/summary.json: not a vibench summary (not a JSON object)"),
    (lambda d: (d / "summary.json").write_bytes(b"\xff\xfe"), "{d}/summary.json: cannot be read"),
    (lambda d: (d / "summary.json").write_text('{"steps": "many"}'),
     "{d}/summary.json: not a vibench summary (steps is not a number)"),
    (lambda d: d.rmdir(), "{d}: no such run directory"),
])
def test_show_refuses_what_it_cannot_show_in_one_line(tmp_path: Path, make, expected):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    make(run_dir)
    result = vibench("show", str(run_dir))
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: " + expected.format(d=run_dir))


# summary.json as the first vibench wrote it: no status, no diagnostics, NaN for no loss
FIRST_LAYOUT = """{"recipe": {"name": "coin"}, "steps": 0, "wall_seconds": 0.5,
"steps_per_second": 0.0, "final_loss": NaN, "posterior": {"p": {"mean": 0.5, "std": 0.1}},
"params": {"p_loc": 0.0}}"""


def test_a_summary_from_the_first_layout_is_shown_and_listed(tmp_path: Path):
    run_dir = tmp_path / "old"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(FIRST_LAYOUT)
    shown = vibench("show", str(run_dir))
    assert (shown.returncode, shown.stderr) == (0, "")
    assert shown.stdout == ("p: 0.500 +- 0.100\n"
                            f"final loss - | 0 steps in 0.5 s (0 steps/s) | {run_dir}\n")
    [listed] = strict_json(vibench("runs", str(tmp_path), "--json").stdout)
    assert (listed["name"], listed["status"], listed["final_loss"]) == ("coin", "completed", None)


@pytest.mark.parametrize("field, value, said", [
    ("status", 3, "status is not a string"),
    ("posterior", {"p": {"mean": 0.5}}, "posterior 'p' is not a mean and sd"),
    ("recipe", None, "recipe is not an object"),
    ("resumes", {}, "resumes is not a list"),
])
def test_show_names_the_field_a_summary_gets_wrong(tmp_path: Path, field, value, said):
    summary = json.loads(FIRST_LAYOUT.replace("NaN", "null"))
    summary[field] = value
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    result = vibench("show", str(tmp_path))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {tmp_path / 'summary.json'}: not a vibench summary ({said})\n"


def test_runs_in_a_missing_directory_is_one_line_exit_2(tmp_path: Path):
    result = vibench("runs", str(tmp_path / "nowhere"))
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == f"error: {tmp_path / 'nowhere'}: no such directory\n"


def test_runs_lists_runs_that_failed_in_set_up_and_one_still_setting_up(tmp_path: Path):
    """A run whose logger failed in set-up leaves nothing to list. A directory a live process
    has claimed, before any checkpoint: running; once it lets go (a run killed in set-up,
    which cannot tidy up): failed."""
    from workbench.rundir.claim import claim

    failed = tmp_path / "failed"
    result = vibench("run", str(COIN), *QUICK, "--set",
                     "loggers=[{name: csv, file: no/such/folder.csv}]", "--out", str(failed))
    assert result.returncode == 2 and "error: logger 'csv': " in result.stderr
    assert not failed.exists()
    held = claim("coin", tmp_path / "setting-up")  # as `vibench run` holds it in set-up
    try:
        result = vibench("runs", str(tmp_path))
        assert result.returncode == 0, result.stderr
        rows = {line.split()[-1]: line.split()[:-1] for line in result.stdout.splitlines()[1:]}
        assert rows == {str(held.path): ["?", "running", "-", "-", "-", "-"]}
        [listed] = strict_json(vibench("runs", str(tmp_path), "--json").stdout)
        assert listed["pid"] == os.getpid() and "error" not in listed
    finally:
        held.release()
    [info] = [i for i in strict_json(vibench("runs", str(tmp_path), "--json").stdout)
              if i["path"] == str(held.path)]
    assert info["status"] == "failed"  # its process let go without a checkpoint
    assert info["error"] == "stopped in set-up, before its first checkpoint"
