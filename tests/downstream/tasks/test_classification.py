"""Classification: CLI fit + evaluate on the demo cohort from an encoder export folder (frozen probe),
and the metrics, thresholds and class weights checked against sklearn / torch directly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import f1_score, roc_auc_score

import fm3d
from downstream.base import TaskConfigError
from downstream.cli import main as finetune
from downstream.evaluate import main as evaluate
from downstream.tasks.classification import ClassificationTask, tune_threshold

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "image_size": (16, 32, 32)}


def test_classification_fit_and_evaluate_through_the_cli(
    demo_cohort: Path, tmp_path: Path, cli_kit: SimpleNamespace
) -> None:
    export = tmp_path / "encoder"
    fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", **TINY), export)
    studies = pl.read_parquet(demo_cohort / "manifest.parquet")["study_id"].to_list()
    run = tmp_path / "run"
    args = [
        "--config", str(cli_kit.conf / "classification.yaml"), "--model.encoder", str(export),
        "--data.cache_dir", str(demo_cohort / "cache"),
        "--data.labels", str(demo_cohort / "findings.parquet"), "--data.image_size", "[16, 32, 32]",
        "--data.loader.num_workers", "0", "--data.loader.batch_size", "4",
        "--data.loader.fixed_splits", f"{{train: {studies[:6]}, val: {studies}, test: {studies}}}",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert finetune(["fit", *args, "--trainer.max_epochs", "2"]) == 0
    checkpoint = next(run.rglob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)
    findings = pl.read_parquet(demo_cohort / "findings.parquet")
    names = [c for c, t in findings.schema.items() if t == pl.Boolean]
    assert state["hyper_parameters"]["class_names"] == names  # linked from the data module
    assert state["fm3d_task"] == "classification" and state["fm3d_encoder_config"]["embed_dim"] == 32
    # pos_weight = negatives / positives of the training split (clamped for classes without positives)
    train = findings.filter(pl.col("study_id").is_in(studies[:6]))
    positive = torch.tensor([train[c].cast(pl.Float64).mean() for c in names]).clamp(1e-3, 1 - 1e-3)
    assert torch.allclose(state["state_dict"]["pos_weight"], ((1 - positive) / positive).float())

    out = tmp_path / "evaluation"
    assert evaluate([*args, "--ckpt_path", str(checkpoint), "--out", str(out)]) == 0
    metrics = pl.read_csv(out / "metrics.csv")
    assert {"auroc_macro", "f1_macro"} <= set(metrics["metric"].to_list())
    per_class = pl.read_csv(out / "per_class.csv")
    assert per_class["class"].to_list() == names
    assert per_class["threshold"].to_list() == state["state_dict"]["thresholds"].tolist()
    assert (out / "roc_curves.png").stat().st_size > 0
    runs = cli_kit.runs(run)
    assert "eval/auroc_macro" in runs[-1].data.metrics
    artifacts = {a.path for a in cli_kit.client(run).list_artifacts(runs[-1].info.run_id, "evaluation")}
    assert {"evaluation/metrics.md", "evaluation/metrics.csv", "evaluation/roc_curves.png"} <= artifacts


def test_threshold_tuning_maximises_f1() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    scores = np.clip(labels * 0.3 + rng.random(40) * 0.7, 0, 1)
    best = tune_threshold(labels, scores)
    brute = max(f1_score(labels, scores >= t) for t in np.unique(scores))
    assert np.isclose(f1_score(labels, scores >= best), brute)
    assert tune_threshold(np.zeros(5), rng.random(5)) == 0.5


def test_summary_and_loss_match_sklearn_and_torch() -> None:
    torch.manual_seed(0)
    task = ClassificationTask("vit3d_tiny", ["a", "b"], encoder_overrides=TINY, pos_weight=[2.0, 0.5])
    batch = {
        "image": torch.rand(3, 1, 16, 32, 32) * 1000,
        "labels": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]),
        "label_mask": torch.tensor([[True, True], [True, False], [True, True]]),
        "study_id": ["x", "y", "z"],
    }
    out = task.step(batch, "val")
    logits = torch.logit(out.collect["probs"])
    mask = batch["label_mask"]
    expected = F.binary_cross_entropy_with_logits(
        logits[mask], batch["labels"][mask], pos_weight=torch.tensor([2.0, 0.5]).expand(3, 2)[mask]
    )
    assert torch.allclose(out.loss, expected, atol=1e-5)

    rng = np.random.default_rng(1)
    collected = {
        "probs": torch.tensor(rng.random((30, 2)), dtype=torch.float32),
        "labels": torch.tensor(rng.integers(0, 2, (30, 2)), dtype=torch.float32),
        "mask": torch.ones(30, 2, dtype=torch.bool),
    }
    evaluation = task.summarize(collected, "val")
    for k, name in enumerate(["a", "b"]):
        y, s = collected["labels"][:, k].numpy(), collected["probs"][:, k].numpy()
        assert np.isclose(evaluation.metrics[f"auroc_{name}"], roc_auc_score(y, s))
        row = evaluation.tables["per_class"].row(k, named=True)
        assert np.isclose(row["f1"], f1_score(y, s >= float(task.thresholds[k])))


def test_pos_weight_of_the_wrong_length_names_the_classes() -> None:
    with pytest.raises(TaskConfigError, match=r"model.pos_weight has 3 values for 2 classes \['a', 'b'\]"):
        ClassificationTask("vit3d_tiny", ["a", "b"], encoder_overrides=TINY, pos_weight=[1.0, 2.0, 3.0])
