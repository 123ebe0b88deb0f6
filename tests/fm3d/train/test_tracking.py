"""One MLflow store per runs root, experiments per task, fit runs continued, evaluate runs linked."""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from fm3d.train.tracking import (
    CHECKPOINT_TAG,
    FIT_RUN_TAG,
    RUN_ID_FILE,
    build_mlflow_logger,
    fit_run_tags,
    local_tracking_uri,
    store_root,
)


def test_runs_under_the_root_share_its_store_and_others_keep_their_own(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    assert store_root(root / "demo" / "20260101-000000", root) == root.resolve()
    assert store_root(tmp_path / "elsewhere", root) == (tmp_path / "elsewhere").resolve()


def test_two_tasks_one_store_and_a_linked_evaluation(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    fit_dir, other_dir, eval_dir = root / "seg" / "a", root / "demo" / "b", root / "seg" / "c"
    fit = build_mlflow_logger(fit_dir, "finetune/seg", root)
    fit.log_metrics({"val/loss": 1.0}, step=0)
    (fit_dir / RUN_ID_FILE).write_text(fit.run_id)
    build_mlflow_logger(other_dir, "pretrain/demo", root).log_metrics({"train/loss": 2.0}, step=0)
    checkpoint = fit_dir / "checkpoints" / "best.ckpt"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"")
    tags = fit_run_tags(checkpoint)
    evaluation = build_mlflow_logger(eval_dir, "finetune/seg", root, tags=tags, continue_run=False)
    evaluation.log_metrics({"eval/dice": 0.5}, step=0)

    client = MlflowClient(tracking_uri=local_tracking_uri(root))
    names = {e.name for e in client.search_experiments()}
    assert {"finetune/seg", "pretrain/demo"} <= names
    seg = client.get_experiment_by_name("finetune/seg")
    assert seg.artifact_location == (root / "mlartifacts" / "finetune" / "seg").resolve().as_uri()
    linked = client.get_run(evaluation.run_id)
    assert linked.data.tags[FIT_RUN_TAG] == fit.run_id
    assert linked.data.tags[CHECKPOINT_TAG] == str(checkpoint.resolve())
    assert evaluation.run_id != fit.run_id
    # A fit attempt in the same folder continues the fit run (resume, SLURM requeue).
    assert build_mlflow_logger(fit_dir, "finetune/seg", root).run_id == fit.run_id


def test_a_checkpoint_from_elsewhere_is_recorded_by_path(tmp_path: Path) -> None:
    checkpoint = tmp_path / "model.ckpt"
    checkpoint.write_bytes(b"")
    assert fit_run_tags(checkpoint) == {CHECKPOINT_TAG: str(checkpoint.resolve())}
    assert fit_run_tags(None) == {}
