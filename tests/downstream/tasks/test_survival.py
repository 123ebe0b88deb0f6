"""Survival: CLI fit (LoRA) + evaluate on the demo cohort's EHR labels, and the C-index, IBS and
Kaplan-Meier estimates checked against scikit-survival called directly."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import torch
from sksurv.metrics import concordance_index_censored, integrated_brier_score
from sksurv.nonparametric import kaplan_meier_estimator
from sksurv.util import Surv

import fm3d
from downstream.cli import main as finetune
from downstream.evaluate import main as evaluate
from downstream.plots import kaplan_meier
from downstream.tasks.survival import SurvivalTask

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "image_size": (16, 32, 32)}


def test_survival_fit_and_evaluate_through_the_cli(
    demo_cohort: Path, tmp_path: Path, cli_kit: SimpleNamespace
) -> None:
    studies = pl.read_parquet(demo_cohort / "manifest.parquet")["study_id"].to_list()
    run = tmp_path / "run"
    args = [
        "--config", str(cli_kit.conf / "survival.yaml"),
        "--model.encoder", "vit3d_tiny", "--model.encoder_overrides", cli_kit.tiny_vit,
        "--model.strategy.name", "lora", "--model.strategy.lora_rank", "2", "--model.num_bins", "3",
        "--data.cache_dir", str(demo_cohort / "cache"), "--data.labels", str(demo_cohort / "tte.parquet"),
        "--data.image_size", "[16, 32, 32]",
        "--data.loader.num_workers", "0", "--data.loader.batch_size", "4",
        "--data.loader.fixed_splits", f"{{train: {studies}, val: {studies}, test: {studies}}}",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert finetune(["fit", *args, "--trainer.max_epochs", "2"]) == 0
    checkpoint = next(run.rglob("*.ckpt"))
    state = torch.load(checkpoint, weights_only=True)
    assert state["hyper_parameters"]["task_names"] == ["MEDS_DEATH", "HOSPITAL_ADMISSION//EMERGENCY"]
    # LoRA: only adapters and the head changed; the saved edges are the training-event quantiles.
    assert any("lora_A" in k for k in state["state_dict"])
    merged = fm3d.create_encoder("vit3d_tiny", **TINY)
    merged.load_state_dict(state["fm3d_encoder_state_dict"])  # adapters folded in, plain names
    assert state["state_dict"]["head.bin_edges_days"][0] == 0 and torch.isinf(
        state["state_dict"]["head.bin_edges_days"][-1]
    )

    out = tmp_path / "evaluation"
    assert evaluate([*args, "--ckpt_path", str(checkpoint), "--out", str(out)]) == 0
    per_task = pl.read_csv(out / "per_task.csv")
    admission = per_task.filter(pl.col("task") == "HOSPITAL_ADMISSION//EMERGENCY").row(0, named=True)
    assert admission["events"] > 0 and 0.0 <= admission["c_index"] <= 1.0
    assert (out / "kaplan_meier_HOSPITAL_ADMISSION_EMERGENCY.png").stat().st_size > 0
    assert "eval/c_index_mean" in cli_kit.runs(run)[-1].data.metrics


def test_metrics_match_scikit_survival() -> None:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n = 40
    task = SurvivalTask(
        "vit3d_tiny", ["death"], bin_edges_days=[0, 100, 300, float("inf")], encoder_overrides=TINY
    )
    task.horizon_days = 200.0
    time = rng.uniform(10, 500, (n, 1))
    event = rng.random((n, 1)) < 0.6
    task._train_time, task._train_event = time, event
    log_hazard = torch.tensor(rng.normal(-5, 0.5, (n, 3, 1)), dtype=torch.float32)
    risk = task.head.cumulative_hazard(log_hazard, torch.tensor([200.0]))[:, 0]
    collected = {
        "log_hazard": log_hazard, "risk": risk, "time": torch.tensor(time), "event": torch.tensor(event),
        "has_ehr": torch.ones(n, dtype=torch.bool),
    }  # fmt: skip
    row = task.summarize(collected, "test").tables["per_task"].row(0, named=True)

    expected_c = concordance_index_censored(event[:, 0], time[:, 0], risk[:, 0].double().numpy())[0]
    assert np.isclose(row["c_index"], expected_c)
    times = np.unique(np.quantile(time[:, 0], np.linspace(0.1, 0.8, 8)))
    probs = task.head.survival(log_hazard, torch.tensor(times, dtype=torch.float32))[:, :, 0].double().numpy()
    surv = Surv.from_arrays(event[:, 0], time[:, 0])
    assert np.isclose(row["ibs"], integrated_brier_score(surv, surv, probs, times), atol=1e-6)


def test_kaplan_meier_matches_scikit_survival() -> None:
    rng = np.random.default_rng(3)
    time = rng.integers(1, 30, 50).astype(float)
    event = rng.random(50) < 0.7
    ours_t, ours_s = kaplan_meier(time, event)
    ref_t, ref_s = kaplan_meier_estimator(event, time)
    # sksurv lists every distinct time too (censor-only times keep S unchanged).
    np.testing.assert_allclose(ours_t, ref_t)
    np.testing.assert_allclose(ours_s, ref_s)
