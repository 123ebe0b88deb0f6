"""Two-process DDP (CPU, gloo) through `fm3d pretrain fit` on batches where no study has a report or EHR.

Every objective still runs its heads on masked rows (loss x 0), so every parameter gets a
gradient on every rank and DDP needs no `find_unused_parameters`: with an unused parameter,
DDP's reducer fails at the second step ("Expected to have finished reduction in the prior
iteration"), so two steps are run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
import torch
from mlflow import MlflowClient

from fm3d.train.tracking import local_tracking_uri

FM3D = Path(sys.executable).parent / "fm3d"

pytestmark = pytest.mark.slow


def _masked_cohort(cohort: dict[str, Path], tmp_path: Path) -> tuple[Path, Path]:
    """Label table with has_ehr False everywhere and a report table of empty texts."""
    labels = pl.read_parquet(cohort["labels"]).with_columns(pl.lit(False).alias("has_ehr"))
    labels.write_parquet(tmp_path / "labels_none.parquet")
    index = pl.read_parquet(cohort["cache"] / "index.parquet").select("study_id")
    reports = index.with_columns(pl.lit("").alias("findings"), pl.lit("").alias("impression"))
    reports.write_parquet(tmp_path / "reports_none.parquet")
    return tmp_path / "labels_none.parquet", tmp_path / "reports_none.parquet"


def _fit(config: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    # Lightning's DDP launcher re-runs this command line for rank 1, as it does for users.
    argv = [
        str(FM3D),
        "pretrain",
        "fit",
        "--config",
        str(config),
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.devices",
        "2",
        *overrides,
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FM3D_RUN_DIR"))}
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, env=env)


def test_ddp_two_cpu_processes_with_every_modality_missing(demo_cohort, run_config, tmp_path: Path) -> None:
    labels, reports = _masked_cohort(demo_cohort, tmp_path)
    config = run_config(
        {**demo_cohort, "labels": labels}, tmp_path / "run.yaml", max_steps=2, limit_val_batches=0
    )
    raw = json.loads(config.read_text())
    raw["data"]["reports"] = str(reports)
    config.write_text(json.dumps(raw))
    run_dir = tmp_path / "run"
    done = _fit(config, run_dir, "--trainer.strategy", "ddp")
    assert done.returncode == 0, done.stderr[-4000:]
    assert "All distributed processes registered. Starting with 2 processes" in done.stderr
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    client = MlflowClient(tracking_uri=local_tracking_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain/test").experiment_id])

    def history(key: str) -> list[float]:
        return [
            m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)
        ]

    # Masked objectives contribute exactly 0 (their rows still ran); VoCo needs neither modality.
    for key in ("train/clip/loss", "train/phenotype/loss", "train/tte/loss", "train/clip/valid_fraction"):
        assert history(key) == [0.0, 0.0], key
    assert all(value > 0 for value in history("train/voco/loss"))
    assert (run_dir / "export" / "encoder" / "model.safetensors").is_file()


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="Lightning's FSDP strategy needs CUDA devices (2 here)"
)
def test_fsdp_two_gpus_runs_and_exports(demo_cohort, run_config, tmp_path: Path) -> None:
    config = run_config(
        demo_cohort, tmp_path / "run.yaml", max_steps=2, limit_val_batches=0, accelerator="gpu"
    )
    run_dir = tmp_path / "run"
    done = _fit(config, run_dir, "--trainer.strategy", "fsdp")
    assert done.returncode == 0, done.stderr[-4000:]
    import fm3d

    assert fm3d.load_encoder(run_dir / "export" / "encoder").config.name == "vit3d_tiny"
