"""``vibench compare``: a grid of settings times seeds, each a real ``vibench run`` child."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import COIN, vibench
from workbench.compare import CSV_TAIL, metrics, parse_grid
from workbench.errors import UsageError


def read_csv(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def session_hparams(run_dir: Path) -> dict:
    """The hparams of the TensorBoard HParams session in a run directory, read with
    TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import metadata

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(
        content[metadata.SESSION_START_INFO_TAG])
    assert metadata.SESSION_END_INFO_TAG in content
    assert metadata.EXPERIMENT_TAG not in content  # TensorBoard builds it from the sessions
    scalars = acc.Tags()["scalars"]
    assert "Train/loss" in scalars  # the run's own events are intact beside the hparams
    assert {"hparam/final_loss", "hparam/mean_error", "hparam/std_error",
            "hparam/steps_per_second"} <= set(scalars)
    return {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
            for name, value in start.hparams.items()}


def test_a_grid_runs_every_combination_and_reports_them(tmp_path: Path):
    out = tmp_path / "cmp"
    result = vibench("compare", str(COIN), "--grid", "guide=beta,auto_normal",
                     "--grid", "loss.num_particles=1,4", "--steps", "30", "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    names = {f"guide={g},loss.num_particles={n},seed=0" for g in ("beta", "auto_normal")
             for n in (1, 4)}
    assert {p.name for p in out.iterdir() if p.is_dir()} == names
    for name in names:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["steps"] == 30
        guide, particles = name.split(",")[:2]
        assert summary["recipe"]["guide"]["name"] == guide.split("=")[1]
        assert summary["recipe"]["loss"]["num_particles"] == int(particles.split("=")[1])
        assert (out / name / "stderr.txt").is_file()
    # a whole-component swap leaves none of the Beta guide's options behind
    swapped = json.loads((out / "guide=auto_normal,loss.num_particles=1,seed=0" /
                          "summary.json").read_text())
    assert "init_alpha" not in swapped["recipe"]["guide"]

    rows = read_csv(out / "compare.csv")
    assert len(rows) == 4
    assert list(rows[0]) == ["guide", "loss.num_particles", *CSV_TAIL]
    assert {(r["guide"], r["loss.num_particles"]) for r in rows} == {
        (g, n) for g in ("beta", "auto_normal") for n in ("1", "4")}
    for row in rows:
        assert row["status"] == "ok" and row["seed"] == "0" and row["error"] == ""
        assert float(row["final_loss"]) > 0
        assert 0 <= float(row["mean_error"]) < 0.2 and 0 <= float(row["std_error"]) < 0.2

    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for header in ("guide", "loss.num_particles", "final loss", "mean err", "std err",
                   "k-hat", "steps/s", "wall s"):
        assert header in result.stdout
    table_rows = [line for line in result.stdout.splitlines() if "auto_normal" in line]
    assert len(table_rows) == 2 and all("ok" in line for line in table_rows)
    assert f"compare.csv: {out / 'compare.csv'}" in result.stdout
    assert f"compare.png: {out / 'compare.png'}" in result.stdout
    assert "4 runs" in result.stderr

    hparams = session_hparams(out / "guide=beta,loss.num_particles=4,seed=0")
    assert hparams == {"guide": "beta", "loss.num_particles": 4.0, "seed": 0.0}


def test_a_failing_combination_is_reported_and_the_others_complete(tmp_path: Path):
    out = tmp_path / "cmp"
    result = vibench("compare", str(COIN), "--grid", "loss=elbo,analytic_kl_elbo",
                     "--set", "guide=auto_normal", "--steps", "30", "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: 1 of 2 runs failed")
    rows = {r["loss"]: r for r in read_csv(out / "compare.csv")}
    assert rows["elbo"]["status"] == "ok" and rows["elbo"]["error"] == ""
    failed = rows["analytic_kl_elbo"]
    assert failed["status"] == "failed" and failed["exit_code"] == "2"
    assert failed["error"].startswith("error: model 'beta_bernoulli', guide 'auto_normal' and "
                                      "loss 'analytic_kl_elbo' do not work together")
    assert failed["final_loss"] == ""
    assert (out / "loss=elbo,seed=0" / "summary.json").is_file()
    assert "do not work together" in (out / "loss=analytic_kl_elbo,seed=0" /
                                      "stderr.txt").read_text()
    assert "failed: model 'beta_bernoulli'" in result.stdout  # in the table
    assert (out / "compare.png").is_file()
    session_hparams(out / "loss=elbo,seed=0")


def test_seeds_multiply_the_runs_and_a_name_grid_keeps_options(tmp_path: Path):
    """--seeds 2 runs each combination twice. ``guide.name=...`` keeps the Beta guide's
    options: auto_normal cannot take them, so those runs fail (found before any child starts)
    while beta's run."""
    out = tmp_path / "cmp"
    result = vibench("compare", str(COIN), "--grid", "guide.name=beta,auto_normal",
                     "--seeds", "2", "--steps", "10", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    rows = read_csv(out / "compare.csv")
    assert [(r["guide.name"], r["seed"], r["status"]) for r in rows] == [
        ("beta", "0", "ok"), ("beta", "1", "ok"),
        ("auto_normal", "0", "failed"), ("auto_normal", "1", "failed")]
    assert "guide 'auto_normal' has no option 'init_" in rows[2]["error"]
    seeds = [json.loads((out / f"guide.name=beta,seed={s}" / "summary.json").read_text())
             ["recipe"]["seed"] for s in (0, 1)]
    assert seeds == [0, 1]
    assert session_hparams(out / "guide.name=beta,seed=1") == {"guide.name": "beta",
                                                               "seed": 1.0}
    assert "2/2" in result.stdout and "0/2" in result.stdout  # the table aggregates seeds


@pytest.mark.parametrize("args, expected", [
    (["--grid", "loss.num_particle=1,4"],
     f"error: {COIN}: loss.num_particle: loss 'elbo' has no option 'num_particle'; "
     "did you mean 'num_particles'? (set on the command line)"),
    (["--grid", "guide=beta,betta"],
     f"error: {COIN}: guide.name: unknown guide 'betta'; did you mean 'beta'? "
     "(set on the command line)"),
    (["--grid", "gide=beta"],
     "error: command line: --grid 'gide=beta': no recipe section 'gide'; did you mean 'guide'?"),
    (["--grid", "optimizer.lr=0.01,fast"],
     f"error: {COIN}: optimizer.lr: expected float, got 'fast' (set on the command line)"),
    (["--grid", "optimizer.lr"], "error: command line: --grid 'optimizer.lr': expected KEY=V1,V2"),
    (["--grid", "optimizer.lr="], "error: command line: --grid 'optimizer.lr=': an empty value"),
    (["--grid", "optimizer.lr=0.1,,0.2"], "error: command line: --grid 'optimizer.lr=0.1,,0.2': "
                                          "an empty value"),
    (["--grid", "seed=1,2"], "error: command line: --grid 'seed=1,2': use --seeds N"),
    (["--grid", "optimizer.lr=0.1", "--set", "loss.num_particle=2"],
     f"error: {COIN}: loss.num_particle: loss 'elbo' has no option 'num_particle'"),
    (["--seeds", "0"], "error: Invalid value for '--seeds'"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path: Path, args, expected):
    result = vibench("compare", str(COIN), *args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_every_bad_grid_is_reported_at_once(tmp_path: Path):
    result = vibench("compare", str(COIN), "--grid", "gide=x", "--grid", "guide=betta",
                     "--grid", "loss.num_particle=1", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), lines
    assert list(tmp_path.iterdir()) == []


def test_out_must_be_new_or_empty(tmp_path: Path):
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "x").write_text("")
    result = vibench("compare", str(COIN), "--grid", "optimizer.lr=0.1", "--out",
                     str(tmp_path / "cmp"), cwd=tmp_path)
    assert result.returncode == 2
    assert "already exists and is not an empty directory" in result.stderr


def test_grid_values_split_on_top_level_commas_only():
    grids = parse_grid(["optimizer.betas=[0.9, 0.99],[0.8,0.9]", "guide=beta, auto_normal",
                        "name='a,b',c"])
    assert [g.values for g in grids] == [["[0.9, 0.99]", "[0.8,0.9]"], ["beta", "auto_normal"],
                                         ["'a,b'", "c"]]
    with pytest.raises(UsageError):
        parse_grid(["loss.num_particles=1,1"])
    with pytest.raises(UsageError):
        parse_grid(["guide=beta", "guide=auto_normal"])


def test_metrics_take_the_largest_error_over_sites_and_elements():
    summary = {
        "final_loss": 3.5, "steps_per_second": 100.0,
        "posterior": {
            "a": {"mean": 0.5, "std": 0.1, "exact_mean": 0.4, "exact_std": 0.1},
            "b": {"mean": [1.0, 2.0], "std": [1.0, 1.0], "exact_mean": [1.0, 2.5],
                  "exact_std": [0.8, 1.0]},
            "c": {"mean": 9.0, "std": 9.0},  # no exact posterior
        },
        "diagnostics": {"khat": 0.3},
    }
    got = metrics(summary)
    assert got["final_loss"] == 3.5 and got["steps_per_second"] == 100.0
    assert got["mean_error"] == pytest.approx(0.5) and got["std_error"] == pytest.approx(0.2)
    assert got["khat"] == 0.3
    assert metrics({"final_loss": 1.0, "posterior": {"c": {"mean": 1.0, "std": 1.0}}}) == {
        "final_loss": 1.0, "mean_error": None, "std_error": None, "khat": None,
        "steps_per_second": None}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGHUP])
def test_ctrl_c_stops_every_run_reports_what_finished_and_exits_130(tmp_path: Path, signum):
    """Ctrl-C, and the terminal closing (SIGHUP), stop the runs; each saves."""
    out = tmp_path / "cmp"
    child = subprocess.Popen(
        [sys.executable, "-m", "workbench", "compare", str(COIN), "--grid",
         "optimizer.lr=0.01,0.02", "--steps", "1000000", "--jobs", "1", "--out", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    run = out / "optimizer.lr=0.01,seed=0"
    deadline = time.monotonic() + 120
    while not list(run.glob("events.out.tfevents.*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    assert child.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("interrupted: 0 of 2 runs finished")
    rows = read_csv(out / "compare.csv")
    assert [r["status"] for r in rows] == ["interrupted", "interrupted"]
    assert rows[1]["error"] == "not started: interrupted"  # one at a time: never started
    summary = json.loads((run / "summary.json").read_text())  # saved as on Ctrl-C
    assert 0 < summary["steps"] < 1_000_000
    assert "optimizer.lr" in stdout
