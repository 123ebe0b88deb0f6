"""The block a command ends with names every output by its absolute path."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fm3d.train.summary import RunSummary, scalar_metrics, write_metrics


def test_the_summary_names_every_output(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "demo" / "20260101-000000"
    summary = RunSummary(
        command="fm3d pretrain fit",
        run_dir=run,
        latest=tmp_path / "runs" / "demo" / "latest",
        best=f"{run / 'checkpoints' / 'best.ckpt'}  (val/clip/loss 1.2 at epoch 3, step 40)",
        last=run / "checkpoints" / "last.ckpt",
        exported=[run / "export" / "encoder", run / "export" / "clip"],
        export_source="from best.ckpt: epoch 3, step 40 (val/clip/loss 1.2)",
        outputs={"predictions": run / "predictions" / "predictions.parquet"},
        metrics_file=run / "metrics.json",
        tracking_uri="sqlite:////x/runs/mlflow.db",
        run_id="abc123",
    )
    lines = summary.render().splitlines()
    assert lines[0] == "fm3d pretrain fit: done"
    assert lines[1] == f"  run folder   {run.resolve()}  (also {tmp_path / 'runs' / 'demo' / 'latest'})"
    assert lines[2].startswith("  best ckpt    ") and "(val/clip/loss 1.2 at epoch 3, step 40)" in lines[2]
    assert lines[3] == f"  last ckpt    {(run / 'checkpoints' / 'last.ckpt').resolve()}"
    assert lines[4].endswith("(from best.ckpt: epoch 3, step 40 (val/clip/loss 1.2))")
    assert lines[5] == f"  predictions  {(run / 'predictions' / 'predictions.parquet').resolve()}"
    assert lines[6] == f"  metrics      {(run / 'metrics.json').resolve()}"
    assert lines[7] == (
        "  MLflow       sqlite:////x/runs/mlflow.db  run abc123  "
        "(browse: mlflow ui --backend-store-uri sqlite:////x/runs/mlflow.db)"
    )


def test_metrics_file_keeps_finite_scalars(tmp_path: Path) -> None:
    metrics = scalar_metrics(
        {"b": torch.tensor(2.0), "a": 1, "nan": torch.tensor(float("nan")), "vector": torch.ones(3)}
    )
    assert metrics == {"a": 1.0, "b": 2.0}
    path = write_metrics(tmp_path / "metrics.json", metrics)
    assert json.loads(path.read_text()) == {"a": 1.0, "b": 2.0}
