"""`fm3d finetune` / `fm3d evaluate` runs: folders, latest, checkpoints, linked MLflow runs, summaries.

One classification fit through a real `fm3d` subprocess whose stdout is a pipe (as under SLURM
or CI), then evaluate and predict from its best checkpoint, each into a run folder of its own.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest
import torch
from mlflow import MlflowClient

import fm3d
from downstream.cli import main as finetune
from downstream.evaluate import main as evaluate
from fm3d.train.tracking import CHECKPOINT_TAG, FIT_RUN_TAG, RUN_ID_FILE, local_tracking_uri

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "image_size": (16, 32, 32)}


@pytest.fixture(scope="module")
def fitted(demo_cohort: Path, tmp_path_factory: pytest.TempPathFactory, cli_kit) -> SimpleNamespace:
    """A 2-epoch classification fit under `<tmp>/runs`, run as `python -m fm3d.cli` with piped stdout."""
    tmp = tmp_path_factory.mktemp("finetune_cli")
    export = tmp / "encoder"
    fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", **TINY), export)
    studies = pl.read_parquet(demo_cohort / "manifest.parquet")["study_id"].to_list()
    args = [
        "--config", str(cli_kit.conf / "classification.yaml"), "--model.encoder", str(export),
        "--data.cache_dir", str(demo_cohort / "cache"),
        "--data.labels", str(demo_cohort / "findings.parquet"), "--data.image_size", "[16, 32, 32]",
        "--data.loader.num_workers", "0", "--data.loader.batch_size", "4",
        "--data.loader.fixed_splits", f"{{train: {studies[:6]}, val: {studies}, test: {studies}}}",
        "--runs_root", str(tmp / "runs"),
    ]  # fmt: skip
    command = [sys.executable, "-m", "fm3d.cli", "finetune", "fit", *args]
    command += ["--trainer.max_epochs", "2", "--progress_every_s", "0"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = (p for p in (tmp / "runs" / "classification").iterdir() if p.name != "latest")
    return SimpleNamespace(
        args=args, runs=tmp / "runs", run=run, stdout=done.stdout, studies=studies, cwd=tmp
    )


def test_fit_prints_progress_lines_and_a_summary(fitted: SimpleNamespace) -> None:
    lines = fitted.stdout.splitlines()
    assert "fit: start, 0/4 steps" in lines
    assert any(line.startswith("fit: step 2/4 epoch 0 loss ") and " it/s ETA " in line for line in lines)
    assert any(line.startswith("fit: done: step 4/4 epoch") for line in lines)
    summary = fitted.stdout[fitted.stdout.index("fm3d finetune fit: done") :]
    run = fitted.run.resolve()
    assert f"run folder   {run}  (also {fitted.runs / 'classification' / 'latest'})" in summary
    assert f"best ckpt    {run / 'checkpoints' / 'best.ckpt'}  (val/loss " in summary
    assert f"last ckpt    {run / 'checkpoints' / 'last.ckpt'}" in summary
    assert f"metrics      {run / 'metrics.json'}" in summary
    run_id = (fitted.run / RUN_ID_FILE).read_text()
    assert f"MLflow       {local_tracking_uri(fitted.runs)}  run {run_id}" in summary


def test_fit_fills_its_run_folder(fitted: SimpleNamespace) -> None:
    assert (fitted.runs / "classification" / "latest").resolve() == fitted.run.resolve()
    assert sorted(p.name for p in (fitted.run / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert torch.load(fitted.run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    assert (fitted.run / "config.yaml").is_file() and (fitted.run / "metrics.json").is_file()
    assert (fitted.runs / "mlflow.db").is_file() and not (fitted.run / "mlflow.db").exists()
    stored = {p.name for p in fitted.runs.iterdir()} - {".mlflow.lock"}
    assert stored == {"classification", "mlflow.db", "mlartifacts"} and not (fitted.cwd / "mlruns").exists()
    client = MlflowClient(tracking_uri=local_tracking_uri(fitted.runs))
    assert client.get_experiment_by_name("finetune/classification") is not None


def test_evaluate_gets_its_own_folder_linked_to_the_fit_run(fitted: SimpleNamespace, capsys) -> None:
    best = fitted.runs / "classification" / "latest" / "checkpoints" / "best.ckpt"
    before = {p.name for p in (fitted.runs / "classification").iterdir()}
    for _ in range(2):  # a second evaluation overwrites nothing of the first
        assert evaluate([*fitted.args, "--ckpt_path", str(best)]) == 0
    new = sorted({p.name for p in (fitted.runs / "classification").iterdir()} - before)
    assert len(new) == 2
    folders = [fitted.runs / "classification" / name for name in new]
    for folder in folders:
        assert (folder / "evaluation" / "metrics.csv").is_file() and (folder / "config.yaml").is_file()
        assert not (folder / "checkpoints").exists()
    # `latest` still names the trained run, whose checkpoints the docs point at.
    assert (fitted.runs / "classification" / "latest").resolve() == fitted.run.resolve()
    printed = capsys.readouterr().out
    assert f"evaluation   {(folders[-1] / 'evaluation').resolve()}" in printed
    assert f"metrics      {(folders[-1] / 'evaluation' / 'metrics.csv').resolve()}" in printed
    client = MlflowClient(tracking_uri=local_tracking_uri(fitted.runs))
    for folder in folders:
        (run,) = client.search_runs(
            [client.get_experiment_by_name("finetune/classification").experiment_id],
            filter_string=f"attributes.run_name = '{folder.name}'",
        )
        assert run.data.tags[FIT_RUN_TAG] == (fitted.run / RUN_ID_FILE).read_text()
        assert run.data.tags[CHECKPOINT_TAG] == str(best.resolve())
        assert "eval/auroc_macro" in run.data.metrics


def test_predict_writes_a_table_and_says_where(fitted: SimpleNamespace, capsys) -> None:
    best = fitted.run / "checkpoints" / "best.ckpt"
    assert finetune(["predict", *fitted.args, "--ckpt_path", str(best)]) == 0
    printed = capsys.readouterr().out
    line = next(line for line in printed.splitlines() if line.startswith("  predictions  "))
    table_path = Path(line.split()[-1])
    assert table_path.name == "predictions.parquet" and table_path.parent.name == "predictions"
    assert table_path.parent.parent != fitted.run.resolve()  # a run folder of its own
    table = pl.read_parquet(table_path)
    assert table.height > 0 and table["study_id"].is_unique().all()
    assert set(table["study_id"].to_list()) <= set(fitted.studies)
    assert {"probs", "findings"} <= set(table.columns)


def test_a_missing_checkpoint_is_one_line(fitted: SimpleNamespace, capsys) -> None:
    missing = fitted.cwd / "nope.ckpt"
    assert finetune(["test", *fitted.args, "--ckpt_path", str(missing)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"fm3d finetune: --ckpt_path {missing}: no such file; pass a checkpoint of an earlier run "
        "(e.g. runs/<name>/latest/checkpoints/last.ckpt) or 'last'"
    ]
    assert evaluate([*fitted.args, "--ckpt_path", str(missing)]) == 2
    assert capsys.readouterr().err.startswith(f"fm3d evaluate: --ckpt_path {missing}: no such file")
