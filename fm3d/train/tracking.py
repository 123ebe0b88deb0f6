"""MLflow tracking of a run: one embedded SQLite store per project, one experiment per task.

Runs under a runs root share its store, `<runs_root>/mlflow.db` with artifacts in
`<runs_root>/mlartifacts/<experiment>/`, so every pretraining and fine-tuning run of a project
compares in one `mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`. A run folder placed
elsewhere (`--trainer.default_root_dir`) keeps its own store inside it, so it stays
self-contained. On a cluster, `--tracking_uri http://server:5000` sends everything to a
server instead. A resumed or requeued run continues the same MLflow run (its id is kept in
`<run>/mlflow_run_id`), and an evaluate/predict run is tagged with the id of the fit run whose
checkpoint it loads.
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
STORE_FILE = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
FIT_RUN_TAG = "fm3d.fit_run_id"
CHECKPOINT_TAG = "fm3d.checkpoint"


def local_tracking_uri(store_root: str | Path) -> str:
    """The embedded SQLite tracking URI of a store folder (`sqlite:////abs/root/mlflow.db`)."""
    return f"sqlite:///{Path(store_root).resolve() / STORE_FILE}"


def store_root(run_dir: str | Path, runs_root: str | Path) -> Path:
    """Where a run's local store lives: the runs root if the run folder is under it, else the run folder."""
    run_dir, runs_root = Path(run_dir).resolve(), Path(runs_root).resolve()
    return runs_root if run_dir.is_relative_to(runs_root) else run_dir


def build_mlflow_logger(
    run_dir: str | Path,
    experiment_name: str,
    root: str | Path,
    tracking_uri: str | None = None,
    tags: dict[str, str] | None = None,
    continue_run: bool = True,
) -> MLFlowLogger:
    """An MLFlowLogger for `run_dir`: the local store in `root` unless `tracking_uri` names a server.

    Artifacts of a new local experiment go to `<root>/mlartifacts/<experiment>`; a server keeps
    its own artifact location. With `continue_run` (fit), the MLflow run of an earlier attempt
    in the same folder is continued; evaluate/predict always start a run of their own.
    """
    run_dir, root = Path(run_dir).resolve(), Path(root).resolve()
    local = tracking_uri is None
    run_id_file = run_dir / RUN_ID_FILE
    run_dir.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    # Every rank builds the logger, and several runs may share one store: the lock serialises
    # the first opening (on a new SQLite file two openers would both create its tables).
    with FileLock(root / ".mlflow.lock"):
        return MLFlowLogger(
            experiment_name=experiment_name,
            run_name=run_dir.name,
            tracking_uri=local_tracking_uri(root) if local else tracking_uri,
            artifact_location=(root / ARTIFACTS_DIR / experiment_name).as_uri() if local else None,
            run_id=run_id_file.read_text().strip() if continue_run and run_id_file.is_file() else None,
            tags=tags,
            log_model=False,
        )


def fit_run_tags(ckpt_path: str | Path | None) -> dict[str, str]:
    """Tags linking an evaluate/predict run to the fit run whose checkpoint it loads.

    The fit run's id is read from `<fit run>/mlflow_run_id` beside `checkpoints/<x>.ckpt`;
    a checkpoint from elsewhere is still recorded by path.
    """
    if ckpt_path is None or not Path(ckpt_path).exists():
        return {}
    checkpoint = Path(ckpt_path).resolve()
    tags = {CHECKPOINT_TAG: str(checkpoint)}
    run_id_file = checkpoint.parent.parent / RUN_ID_FILE
    if run_id_file.is_file():
        tags[FIT_RUN_TAG] = run_id_file.read_text().strip()
    return tags


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
