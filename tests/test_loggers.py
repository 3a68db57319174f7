"""Loggers are plugins: TensorBoard by default, a CSV file and MLflow on request, each read
back with its own reader; a resumed run logs each step once; a failing logger costs nothing."""

from __future__ import annotations

import csv
import os
import signal
from pathlib import Path

import pytest

from tests.conftest import COIN, start, vibench, wait_for_checkpoint
from workbench import hookimpl

STEPS = ["--steps", "60", "--set", "train.plots=false", "--set", "train.diagnostics=false"]


def rows(path: Path) -> list[dict]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def loss_steps(path: Path) -> list[int]:
    return [int(r["step"]) for r in rows(path) if r["tag"] == "Train/loss"]


def tensorboard_steps(run_dir: Path) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return [e.step for e in events.Scalars("Train/loss")]


def test_tensorboard_and_csv_both_get_every_step(tmp_path: Path):
    out = tmp_path / "r"
    result = vibench("run", str(COIN), *STEPS, "--set", "train.eval_every=10",
                     "--set", "loggers=[tensorboard, csv]",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert loss_steps(out / "metrics.csv") == list(range(60)) == tensorboard_steps(out)
    assert {"Eval/loss", "Params/log_alpha_q", "LR/log_alpha_q"} <= {
        r["tag"] for r in rows(out / "metrics.csv")}


def test_no_loggers_writes_no_event_file(tmp_path: Path):
    out = tmp_path / "r"
    assert vibench("run", str(COIN), *STEPS, "--set", "loggers=[]",
                   "--out", str(out)).returncode == 0
    assert not list(out.glob("events.out.tfevents.*"))


def test_a_resumed_run_logs_each_step_once(tmp_path: Path):
    out = tmp_path / "r"
    child = start(COIN, out, "--steps", "100000", "--set", "train.checkpoint_every=20",
                  "--set", "loggers=[tensorboard, csv]")
    wait_for_checkpoint(out, 40, child)
    child.send_signal(signal.SIGKILL)
    child.wait()
    resumed = vibench("run", "--resume", str(out), "--steps", "300")
    assert resumed.returncode == 0, resumed.stderr
    assert loss_steps(out / "metrics.csv") == list(range(300)) == tensorboard_steps(out)


def test_an_unknown_logger_is_refused_before_the_run(tmp_path: Path):
    result = vibench("run", str(COIN), "--set", "loggers=[tensorbord]", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown logger 'tensorbord'; did you mean 'tensorboard'?" in result.stderr
    assert list(tmp_path.iterdir()) == []


class Broken:
    def scalar(self, tag, value, step):
        raise ConnectionError("tracker down")


class BrokenPlugin:
    @hookimpl
    def register_loggers(self, register):
        register("broken", lambda run_dir: Broken())


def test_a_failing_logger_is_reported_once_and_the_run_goes_on(tmp_path: Path):
    from workbench import recipe as recipes
    from workbench.registry import collect, make_plugin_manager
    from workbench.runner import Run

    pm, problems = make_plugin_manager()
    pm.register(BrokenPlugin(), name="test-broken-logger")
    registry = collect(pm, problems)
    raw, overridden = recipes.apply_overrides(recipes.load(COIN), [
        "train.steps=30", "loggers=[broken, csv]", "train.plots=false"])
    resolved = recipes.resolve(raw, registry, str(COIN), overridden)
    with pytest.warns(UserWarning, match="logger 'broken' failed in scalar .* tracker down"):
        summary = Run.setup(resolved, registry).train(tmp_path)
    assert summary["status"] == "completed"
    assert loss_steps(tmp_path / "metrics.csv") == list(range(30))


def test_mlflow_gets_params_metrics_and_artifacts(tmp_path: Path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    store = f"file://{tmp_path / 'mlruns'}"
    out = tmp_path / "r"
    env = {"MLFLOW_ALLOW_FILE_STORE": "true"}
    result = vibench("run", str(COIN), "--steps", "40", "--set",
                     f"loggers=[{{name: mlflow, tracking_uri: '{store}'}}]", "--out", str(out),
                     env=env)
    assert result.returncode == 0, result.stderr
    os.environ.update(env)
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("vibench").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "r"
    assert run.data.params["loss.num_particles"] == "7"
    history = client.get_metric_history(run.info.run_id, "Train.loss")
    assert sorted(m.step for m in history) == list(range(40))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "plots"}
