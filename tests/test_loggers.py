"""Loggers are plugins: TensorBoard by default, a CSV file and MLflow on request, each read
back with its own reader; a resumed run logs each step once; a failing logger costs nothing."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import COIN, start, vibench, wait_for_checkpoint
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
    from workbench.config import recipe as recipes
    from workbench.plugins.registry import collect, make_plugin_manager
    from workbench.train.runner import Run

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


class OneByOne:
    def __init__(self):
        self.calls = []

    def scalar(self, tag, value, step):
        self.calls.append(("scalar", tag, value, step))

    def histogram(self, tag, values, step):
        self.calls.append(("histogram", tag, step))


class Batched:
    def __init__(self):
        self.batches = []

    def scalars(self, records):
        self.batches.append(list(records))


def test_scalars_reach_each_logger_in_batches_in_the_order_logged(monkeypatch):
    """Queued, then handed over before any other call, at a batch's size, or once due; a
    logger without ``scalars`` gets them one by one."""
    from workbench.train import loggers

    monkeypatch.setattr(loggers, "HAND_OVER_SECONDS", 1e9)  # none due while the test runs
    monkeypatch.setattr(loggers, "HAND_OVER_RECORDS", 4)
    one, batched = OneByOne(), Batched()
    log = loggers.Loggers([("one", one), ("batched", batched)])
    before = time.time()
    for step in range(3):
        log.scalar("Train/loss", step / 2, step)
    assert one.calls == [] and batched.batches == []
    log.histogram("Params/w", [1.0, 2.0], 2)
    after = time.time()
    assert one.calls == [("scalar", "Train/loss", step / 2, step) for step in range(3)] + [
        ("histogram", "Params/w", 2)]
    (first,) = batched.batches
    assert [record[:3] for record in first] == [("Train/loss", step / 2, step)
                                                for step in range(3)]
    assert all(before <= record[3] <= after for record in first)  # each its own wall time
    for step in range(3, 7):
        log.scalar("Train/loss", 0.0, step)
    assert [len(batch) for batch in batched.batches] == [3, 4]  # a full batch, unasked
    monkeypatch.setattr(loggers, "HAND_OVER_SECONDS", 0.0)
    log.flush()  # due again at once from here
    log.scalar("Eval/loss", 1.0, 7)
    assert batched.batches[-1] == [("Eval/loss", 1.0, 7, batched.batches[-1][0][3])]
    assert one.calls[-1] == ("scalar", "Eval/loss", 1.0, 7)


def test_a_slow_run_s_scalars_reach_the_event_file_while_it_runs(tmp_path: Path, monkeypatch):
    """A scalar waits in the queue at most the hand-over's time and then the event file's:
    the next step's scalar after both have passed brings it to the file, unflushed."""
    from vibench_plugins import tensorboard_events
    from workbench.train import loggers

    monkeypatch.setattr(loggers, "HAND_OVER_SECONDS", 0.2)
    monkeypatch.setattr(tensorboard_events, "LIVE_SECONDS", 0.2)
    log = loggers.Loggers([("tensorboard", tensorboard_events.EventLog(tmp_path))])
    log.scalar("Train/loss", 7.0, 0)
    time.sleep(0.5)  # a slow step; a busy machine only makes it longer
    log.scalar("Train/loss", 6.5, 1)
    assert tensorboard_steps(tmp_path) == [0, 1]
    log.close()


def mlflow_store(tmp_path: Path, kind: str) -> str:
    """A local store as a user names it: a folder, a file: URI, a SQLite database."""
    return {"folder": str(tmp_path / "mlruns"),
            "file_uri": (tmp_path / "mlruns").as_uri(),
            "sqlite": f"sqlite:///{tmp_path / 'mlflow.db'}"}[kind]


def read_mlflow_run(store: str, out: Path):
    """The one run in the store's 'vibench' experiment, read with MLflow's own client, after
    checking it holds the recipe, every step's loss and the run's summary and plots."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("vibench").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == out.name
    assert run.data.params["loss.num_particles"] == "7"
    assert run.data.params["model.name"] == "beta_bernoulli"
    history = client.get_metric_history(run.info.run_id, "Train.loss")
    assert sorted(m.step for m in history) == list(range(40))
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"summary.json", "plots"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {
        "plots/loss.png", "plots/ppc.png"}
    copied = client.download_artifacts(run.info.run_id, "summary.json", str(out.parent))
    assert json.loads(Path(copied).read_text()) == json.loads((out / "summary.json").read_text())
    return run


@pytest.mark.parametrize("kind", ["folder", "file_uri", "sqlite"])
def test_mlflow_logs_to_a_local_store_the_recipe_names(tmp_path: Path, kind: str, monkeypatch):
    """A folder or file: URI needs no MLFLOW_ALLOW_FILE_STORE from the user (MLflow 3 refuses
    a file store without it); SQLite needs no model registry."""
    pytest.importorskip("mlflow")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = mlflow_store(tmp_path, kind)
    out = tmp_path / "r"
    # cwd: a database store keeps artifacts in ./mlruns, MLflow's default artifact root
    result = vibench("run", str(COIN), "--steps", "40", "--set",
                     f"loggers=[{{name: mlflow, tracking_uri: '{store}'}}]", "--out", str(out),
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower(), result.stderr
    if kind != "sqlite":
        monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the reader, this process
    read_mlflow_run(store, out)


def test_a_file_store_mlflow_picks_by_itself_is_refused_with_mlflows_remedy(tmp_path: Path):
    """No tracking_uri: MLflow's own choice (here MLFLOW_TRACKING_URI, a folder) and its own
    rules; the one line keeps the remedy at the end of MLflow's long message."""
    pytest.importorskip("mlflow")
    env = {"MLFLOW_TRACKING_URI": str(tmp_path / "mlruns"), "MLFLOW_ALLOW_FILE_STORE": "false"}
    result = vibench("run", str(COIN), "--steps", "5", "--set", "loggers=[mlflow]",
                     "--out", str(tmp_path / "r"), env=env)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: logger 'mlflow': The filesystem tracking backend")
    assert line.endswith("set `MLFLOW_ALLOW_FILE_STORE=true` to opt out of this exception.")
    assert "Traceback" not in result.stderr


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path: Path):
    """A real ``mlflow server`` on SQLite in a child process (its own process group), ready
    when its /health answers; stopped, with its workers, when the test ends."""
    pytest.importorskip("mlflow.server", reason="mlflow server needs the full mlflow package")
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
         f"sqlite:///{tmp_path / 'server.db'}", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server not ready: " + (
                tmp_path / "server.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


@pytest.mark.slow
def test_mlflow_logs_to_a_local_mlflow_server(tmp_path: Path, mlflow_server: str):
    out = tmp_path / "r"
    result = vibench("run", str(COIN), "--steps", "40", "--set",
                     f"loggers=[{{name: mlflow, tracking_uri: '{mlflow_server}'}}]",
                     "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    read_mlflow_run(mlflow_server, out)


def wandb_records(run_dir: Path) -> tuple[list[dict], dict]:
    """The W&B offline run in ``run_dir``, read back by W&B's own reader of its ``.wandb``
    files (``wandb leet inspect``: the public API reads only from a server): its history rows
    and the run's state, config and summary. Skips where wandb is not installed."""
    pytest.importorskip("wandb")

    def inspect(folder: Path, *options: str) -> str:
        done = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", *options,
                               str(folder)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    rows, state = [], {}
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        records = [json.loads(line) for line in inspect(folder, "--json").splitlines()]
        rows += [r["history"] for r in records if r["type"] == "history"]
        state = json.loads(inspect(folder, "--summary", "--json"))
    return rows, state


def test_wandb_logs_offline_into_the_run_folder(tmp_path: Path):
    """Offline by default, in the run directory: the recipe as config, every step's loss, the
    plots as images and summary.json's numbers as the run's summary."""
    pytest.importorskip("wandb")
    out = tmp_path / "r"
    result = vibench("run", str(COIN), "--steps", "40", "--set",
                     "loggers=[tensorboard, wandb]", "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr.lower() and "wandb:" not in result.stderr
    rows, state = wandb_records(out)
    assert (state["state"], state["exit_code"], state["name"]) == ("finished", 0, "r")
    assert state["config"]["loss"]["num_particles"] == 7
    assert state["config"]["model"]["name"] == "beta_bernoulli"
    summary = json.loads((out / "summary.json").read_text())
    assert state["summary"]["final_loss"] == summary["final_loss"]
    assert state["summary"]["status"] == "completed"
    losses = {row["step"]["num"]: row["item"]["Train/loss"] for row in rows
              if "Train/loss" in row["item"]}
    assert sorted(losses) == list(range(40))
    assert {"Plots/loss", "Plots/ppc", "Plots/latent_fairness"} <= {
        key for key, value in state["summary"].items()
        if isinstance(value, dict) and value.get("_type") == "image-file"}


def test_wandb_online_without_a_key_says_wandbs_remedy(tmp_path: Path):
    """``mode: online`` with no API key: one line with W&B's own advice, before the run."""
    pytest.importorskip("wandb")
    result = vibench("run", str(COIN), "--steps", "5", "--set",
                     "loggers=[{name: wandb, mode: online}]", "--out", str(tmp_path / "r"),
                     env={"WANDB_API_KEY": "", "HOME": str(tmp_path), "NETRC": "",
                          "WANDB_CONFIG_DIR": str(tmp_path / "config")})
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith("error: logger 'wandb': W&B did not start:"), line
    assert "wandb login" in line and "Traceback" not in result.stderr


def test_a_stopped_and_resumed_run_goes_on_in_the_same_wandb_run(tmp_path: Path):
    """Stopped (Ctrl-C) and resumed: a second offline folder under the same W&B run id,
    which ``wandb sync`` joins; between them each step's loss once."""
    pytest.importorskip("wandb")
    out = tmp_path / "r"
    child = start(COIN, out, "--steps", "100000", "--set", "train.checkpoint_every=20",
                  "--set", "loggers=[wandb]")
    wait_for_checkpoint(out, 40, child)
    child.send_signal(signal.SIGINT)
    child.communicate(timeout=120)
    resumed = vibench("run", "--resume", str(out), "--steps", "300")
    assert resumed.returncode == 0, resumed.stderr
    rows, state = wandb_records(out)
    folders = sorted((out / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and {f.name.rsplit("-", 1)[1] for f in folders} == {
        state["run_id"]}
    steps = [row["step"]["num"] for row in rows if "Train/loss" in row["item"]]
    assert sorted(steps) == list(range(300)) and state["state"] == "finished"
