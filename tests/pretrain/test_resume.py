"""`--ckpt_path last` resumes exactly: 3 steps + resume 3 steps logs the same losses as 6 steps straight.

All four objectives train (VoCo's EMA teacher and feature dropout, CLIP's temperature, the
EHR heads), on real prepared data with random crops and augmentation, so weights, optimizer
and scheduler state, the EMA teacher, the global RNGs and the data loader's state must all
come back for the losses to match.
"""

from __future__ import annotations

from pathlib import Path

from mlflow import MlflowClient

from fm3d.cli import main as fm3d_main
from pretrain.tracking import local_tracking_uri

LOSSES = ("train/loss", "train/voco/loss", "train/clip/loss", "train/phenotype/loss", "train/tte/loss")


def _losses(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    client = MlflowClient(tracking_uri=local_tracking_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    return {
        key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        for key in LOSSES
    }


def test_resume_reproduces_the_uninterrupted_run(demo_cohort, run_config, tmp_path: Path) -> None:
    # Epochs of 3 batches: the interrupted run stops at an epoch boundary, where last.ckpt is written.
    def fit(name: str, max_steps: int, *extra: str) -> Path:
        config = run_config(
            demo_cohort,
            tmp_path / f"{name}.yaml",
            max_steps=max_steps,
            limit_train_batches=3,
            limit_val_batches=0,
        )
        run_dir = tmp_path / name
        argv = [
            "pretrain",
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(run_dir),
            *extra,
        ]
        assert fm3d_main(argv) == 0
        return run_dir

    straight = _losses(fit("straight", 6))
    fit("resumed", 3)
    resumed = _losses(fit("resumed", 6, "--ckpt_path", "last"))
    for key in LOSSES:
        assert [step for step, _ in resumed[key]] == list(range(6)), key
        for (step, expected), (_, got) in zip(straight[key], resumed[key], strict=True):
            assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), (key, step, expected, got)
