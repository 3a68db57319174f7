"""Default loggers: TensorBoard (every run's, unless a recipe lists others), a CSV file,
MLflow (with the optional ``mlflow`` extra) and Weights & Biases (with the ``wandb`` extra)."""

from __future__ import annotations

import csv
import io
import os
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

from workbench import hookimpl
from workbench.rundir import files


@hookimpl
def register_loggers(register):
    register("tensorboard", tensorboard)
    register("csv", csv_logger)
    register("mlflow", mlflow_logger)
    register("wandb", wandb_logger)


def tensorboard(run_dir, start_step):
    """TensorBoard event files in the run directory (tensorboard --logdir runs)."""
    from vibench_plugins.tensorboard_events import EventLog

    return EventLog(Path(run_dir), start_step)


def csv_logger(run_dir, start_step, file: str = "metrics.csv"):
    """Every scalar as a row of step, tag, value in a CSV file in the run directory."""
    return CsvLog(Path(run_dir) / file, start_step)


class CsvLog:
    """Rows of step, tag, value; a resumed run keeps the rows from before its start step."""

    def __init__(self, path: Path, start_step: int):
        kept = []
        if start_step and path.exists():
            with path.open(newline="") as handle:
                kept = [row for row in csv.DictReader(handle) if int(row["step"]) < start_step]
        self.handle = io.TextIOWrapper(files.open_for_writing(path), newline="")
        self.writer = csv.writer(self.handle)
        self.writer.writerow(["step", "tag", "value"])
        self.writer.writerows([row["step"], row["tag"], row["value"]] for row in kept)

    def scalars(self, records: list[tuple[str, float, int, float]]) -> None:
        self.writer.writerows([step, tag, repr(float(value))] for tag, value, step, _ in records)

    def flush(self) -> None:
        self.handle.flush()

    def close(self, summary=None) -> None:
        self.handle.close()


def mlflow_logger(run_dir, start_step, recipe, tracking_uri: str | None = None,
                  experiment: str = "vibench"):
    """MLflow: the recipe as params, scalars as metrics, summary.json and plots as artifacts.

    One MLflow run per vibench run; a resumed run goes on in the same one."""
    return MlflowLog(Path(run_dir), start_step, recipe, tracking_uri, experiment)


class MlflowLog:
    """Logs to MLflow through its client, so no global active run is left behind."""

    RUN_ID = "mlflow_run_id"

    def __init__(self, run_dir: Path, start_step: int, recipe: dict, tracking_uri: str | None,
                 experiment: str):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ValueError("needs MLflow: pip install 'vibench[mlflow]'") from None
        self.run_dir = run_dir
        self.pending: list = []
        scheme = urlparse(tracking_uri or "").scheme.split("+")[0]
        # A folder path or file: URI that the recipe names is a file store chosen on purpose.
        self.file_store = tracking_uri is not None and scheme in ("", "file")
        _check_database_store(tracking_uri, scheme)
        with self._mlflow():
            self.client = MlflowClient(tracking_uri=tracking_uri)
            saved = run_dir / self.RUN_ID
            if start_step and saved.exists():
                self.run_id = saved.read_text().strip()
            else:
                found = self.client.get_experiment_by_name(experiment)
                experiment_id = (found.experiment_id if found is not None
                                 else self.client.create_experiment(experiment))
                run = self.client.create_run(experiment_id, run_name=run_dir.name)
                self.run_id = run.info.run_id
                files.write_atomic(saved, self.run_id.encode())
                for key, value in _flat(recipe).items():
                    self.client.log_param(self.run_id, key, str(value)[:500])

    @contextmanager
    def _mlflow(self):
        """MLflow 3 refuses a file store (in maintenance mode there) unless
        MLFLOW_ALLOW_FILE_STORE is true, its documented opt-in. For a file store the recipe
        names, the opt-in holds while this logger calls MLflow and the variable is restored
        after; a store MLflow picks by itself (no tracking_uri) is left to MLflow's rules."""
        if not self.file_store:
            yield
            return
        before = os.environ.get(ALLOW_FILE_STORE)
        os.environ[ALLOW_FILE_STORE] = "true"
        try:
            yield
        finally:
            if before is None:
                os.environ.pop(ALLOW_FILE_STORE, None)
            else:
                os.environ[ALLOW_FILE_STORE] = before

    def scalars(self, records: list[tuple[str, float, int, float]]) -> None:
        from mlflow.entities import Metric

        self.pending.extend(Metric(tag.replace("/", "."), float(value), int(wall_time * 1000),
                                   step) for tag, value, step, wall_time in records)

    def flush(self) -> None:
        """Send the metrics in batches: one request per step would slow training down."""
        with self._mlflow():
            while self.pending:
                batch, self.pending = self.pending[:1000], self.pending[1000:]
                self.client.log_batch(self.run_id, metrics=batch)

    def close(self, summary=None) -> None:
        self.flush()
        with self._mlflow():
            for name in ("summary.json", "plots"):
                path = self.run_dir / name
                if path.is_file():
                    self.client.log_artifact(self.run_id, str(path))
                elif path.is_dir():
                    self.client.log_artifacts(self.run_id, str(path), artifact_path="plots")
            status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(
                (summary or {}).get("status"), "FAILED")
            self.client.set_terminated(self.run_id, status)


ALLOW_FILE_STORE = "MLFLOW_ALLOW_FILE_STORE"


def _check_database_store(tracking_uri: str | None, scheme: str) -> None:
    """A database store (sqlite:///mlflow.db) needs SQLAlchemy and Alembic, which
    mlflow-skinny leaves out; without them MLflow's store lookup fails with a message about
    the model registry, which the run never uses."""
    import importlib.util

    from mlflow.store.db.db_types import DATABASE_ENGINES

    missing = [name for name in ("sqlalchemy", "alembic") if importlib.util.find_spec(name) is None]
    if scheme in DATABASE_ENGINES and missing:
        raise ValueError(f"tracking_uri {tracking_uri!r} is a database store, which needs "
                         f"{' and '.join(missing)} beside mlflow-skinny: "
                         "pip install 'vibench[mlflow]'")


def _flat(value, prefix: str = "") -> dict:
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def wandb_logger(run_dir, start_step, recipe, project: str = "vibench", mode: str = "offline",
                 dir: str | None = None, entity: str | None = None):
    """Weights & Biases: the recipe as config, scalars by step, the summary and the plots.

    Offline by default, into ``dir`` (the run directory unless given), for ``wandb sync`` to
    upload later; ``mode: online`` logs to the W&B server as the run goes. A resumed run
    goes on in the same W&B run."""
    return WandbLog(Path(run_dir), start_step, recipe, project, mode, dir, entity)


class WandbLog:
    """Logs to one W&B run of its own (not the global ``wandb.run``); scalars and images are
    kept per step and sent at each checkpoint, as one history row per step."""

    RUN_ID = "wandb_run_id"

    def __init__(self, run_dir: Path, start_step: int, recipe: dict, project: str, mode: str,
                 folder: str | None, entity: str | None):
        try:
            import wandb
        except ImportError:
            raise ValueError("needs Weights & Biases: pip install 'vibench[wandb]'") from None
        self.wandb = wandb
        self.rows: dict[int, dict] = {}
        saved = run_dir / self.RUN_ID
        resumed = bool(start_step) and saved.exists()
        root = Path(folder).expanduser() if folder else run_dir
        files.make_folder(root)
        # W&B's own console capture would come between the run and its terminal; its git
        # lookup starts from ``dir``, a run folder outside any repository
        settings = wandb.Settings(console="off", silent=True, disable_git=True)
        try:
            self.run = wandb.init(
                project=project, entity=entity, mode=mode, dir=str(root), name=run_dir.name,
                id=saved.read_text().strip() if resumed else None,
                resume="allow" if resumed else None, config=recipe, settings=settings,
                reinit="create_new")
        except Exception as exc:  # W&B's own message says what to do (wandb login, ...)
            raise ValueError(f"W&B did not start: {exc}") from None
        if not resumed:
            files.write_atomic(saved, self.run.id.encode())

    def scalars(self, records: list[tuple[str, float, int, float]]) -> None:
        for tag, value, step, _ in records:
            self.rows.setdefault(step, {})[tag] = float(value)

    def image(self, tag: str, image, step: int) -> None:
        self.rows.setdefault(step, {})[tag] = self.wandb.Image(image)

    def flush(self) -> None:
        """One history row per step, in order: W&B drops a row logged at an earlier step."""
        for step in sorted(self.rows):
            self.run.log(self.rows[step], step=step)
        self.rows.clear()

    def close(self, summary=None) -> None:
        self.flush()
        summary = summary or {}
        self.run.summary.update({key: value for key, value in summary.items()
                                 if key not in ("recipe", "params")})
        self.run.finish(exit_code=0 if summary.get("status") == "completed" else 1)
