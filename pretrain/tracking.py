"""MLflow tracking for pretraining runs: an embedded SQLite store in the run folder by default.

Every run folder is self-contained: `<run>/mlflow.db` holds runs, params and metrics,
`<run>/mlartifacts/` the artifacts (config, plots, exported encoder), so a run can be copied
or archived as one folder and browsed with `mlflow ui --backend-store-uri sqlite:///<run>/mlflow.db`.
On a cluster, `--tracking_uri http://server:5000` sends everything to a tracking server instead.
A resumed or requeued run continues the same MLflow run (its id is kept in
`<run>/mlflow_run_id`), so its curves stay in one place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from filelock import FileLock
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

logger = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"


def local_tracking_uri(run_dir: str | Path) -> str:
    """The embedded SQLite tracking URI of a run folder (`sqlite:////abs/run/mlflow.db`)."""
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def build_mlflow_logger(
    run_dir: str | Path, experiment_name: str, tracking_uri: str | None = None, run_name: str | None = None
) -> MLFlowLogger:
    """An MLFlowLogger for `run_dir`: the local store unless `tracking_uri` names a server.

    Artifacts of a new local experiment go to `<run>/mlartifacts`; a server keeps its own
    artifact location. The MLflow run of an earlier attempt in the same folder is reused.
    """
    run_dir = Path(run_dir).resolve()
    local = tracking_uri is None
    run_id_file = run_dir / RUN_ID_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    # Every rank builds the logger, and building it opens the store: on a new SQLite file two
    # ranks would both create its tables and one fails. The lock serialises the first opening.
    with FileLock(run_dir / ".mlflow.lock"):
        return MLFlowLogger(
            experiment_name=experiment_name,
            run_name=run_name or run_dir.name,
            tracking_uri=local_tracking_uri(run_dir) if local else tracking_uri,
            artifact_location=(run_dir / "mlartifacts").as_uri() if local else None,
            run_id=run_id_file.read_text().strip() if run_id_file.is_file() else None,
            log_model=False,
        )


def mlflow_logger(trainer: Trainer) -> MLFlowLogger | None:
    """The trainer's MLFlowLogger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)


@rank_zero_only
def remember_run_id(trainer: Trainer, run_dir: str | Path) -> None:
    """Write the MLflow run id into the run folder so a resumed attempt logs into the same run."""
    tracker = mlflow_logger(trainer)
    if tracker is not None:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        (Path(run_dir) / RUN_ID_FILE).write_text(tracker.run_id)


@rank_zero_only
def log_artifacts(trainer: Trainer, local_path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or folder as MLflow artifacts of the trainer's run (no-op without MLflow)."""
    tracker = mlflow_logger(trainer)
    if tracker is None:
        return
    local_path = Path(local_path)
    if local_path.is_dir():
        tracker.experiment.log_artifacts(tracker.run_id, str(local_path), artifact_path)
    else:
        tracker.experiment.log_artifact(tracker.run_id, str(local_path), artifact_path)
    logger.info("logged %s to MLflow run %s", local_path, tracker.run_id)

