"""Shared fixtures for downstream tests: a tiny demo cohort, prepared, with EHR labels, and CLI helpers."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from ehr.cli import main as ehr_main
from fm3d.data.prepare import prepare_cache
from fm3d.demo import generate_demo_cohort

REPO_ROOT = Path(__file__).resolve().parents[2]
CONF = REPO_ROOT / "conf" / "downstream"
# A tiny vit3d (patch 8, three blocks) keeps every CLI run to seconds on CPU.
TINY_VIT = "{embed_dim: 32, depth: 3, num_heads: 2, patch_size: 8, image_size: [16, 32, 32]}"


@pytest.fixture(scope="session")
def demo_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`fm3d demo-data --studies 8`, prepared into `cache/`, with `tte.parquet` from `fm3d ehr labels`."""
    root = tmp_path_factory.mktemp("demo")
    manifest = generate_demo_cohort(root, num_studies=8, seed=0, progress=False)
    prepare_cache(manifest, root / "cache", progress=False)
    status = ehr_main(
        [
            "labels", "--meds", str(root / "meds"), "--studies", str(manifest),
            "--out", str(root / "tte.parquet"), "--tasks", "MEDS_DEATH,HOSPITAL_ADMISSION//EMERGENCY",
        ]
    )  # fmt: skip
    assert status in (0, None)
    return root


def mlflow_runs(run_dir: Path) -> list[mlflow.entities.Run]:
    """Every run in the embedded MLflow store under `run_dir`, queried through MLflow's own client."""
    db = run_dir / "mlflow.db"
    assert db.is_file() and sqlite3.connect(db).execute("select count(*) from runs").fetchone()[0] > 0
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}")
    experiments = [e.experiment_id for e in client.search_experiments() if e.name.startswith("finetune/")]
    return client.search_runs(experiments, order_by=["attributes.start_time ASC"])


def metric_history(run_dir: Path, run_id: str, key: str) -> list[float]:
    """A metric's values in step order, read back from the MLflow store."""
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


@pytest.fixture(scope="session")
def cli_kit() -> SimpleNamespace:
    """What CLI tests share: the config folder, a tiny encoder override, MLflow read-back helpers."""
    return SimpleNamespace(
        conf=CONF, tiny_vit=TINY_VIT, runs=mlflow_runs, history=metric_history, client=mlflow_client
    )


def mlflow_client(run_dir: Path) -> mlflow.MlflowClient:
    """An MLflow client on the embedded store under `run_dir`."""
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
