"""`--ckpt_path last` resumes exactly: 1 epoch + resume 1 epoch against 2 epochs straight.

Two sets of objectives train: the four of issue 5 (VoCo's EMA teacher and feature dropout, CLIP's
temperature, the EHR heads) and the self-supervised pair DINO + MAE (DINO's EMA teacher encoder
and heads, its running centres and step-driven temperature and momentum schedules, multi-crop
views with TorchIO augmentation and token masks; MAE's random masks), on real prepared data, so
weights, optimizer and scheduler state, the teachers, the global RNGs (ResumableRNG) and the data
(drawn by (seed, epoch, position), see fm3d.data.datamodule) must all come back for the losses
to match.
The run is epoch-based: with `max_steps` Lightning restarts an iteration-based run from an
epoch-end checkpoint as if mid-epoch and runs one batch more in the old epoch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from fm3d.cli import main as fm3d_main
from fm3d.train.tracking import local_tracking_uri

OBJECTIVE_SETS = {"issue5": ("voco", "clip", "phenotype", "tte"), "ssl": ("dino", "mae")}


def _losses(run_dir: Path, objectives: tuple[str, ...]) -> dict[str, list[float]]:
    client = MlflowClient(tracking_uri=local_tracking_uri(run_dir))
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain/test").experiment_id])
    return {
        key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]
        for key in ("train/loss", *(f"train/{name}/loss" for name in objectives))
    }


@pytest.fixture(scope="module", params=sorted(OBJECTIVE_SETS))
def straight_and_resumed(request, demo_cohort, run_config, tmp_path_factory) -> tuple[dict, dict]:
    objectives = OBJECTIVE_SETS[request.param]
    tmp = tmp_path_factory.mktemp(f"resume-{request.param}")

    # Epochs of 3 batches: the interrupted run stops at an epoch boundary, where last.ckpt is written.
    def fit(name: str, max_epochs: int, *extra: str) -> Path:
        config = run_config(
            demo_cohort,
            tmp / f"{name}-{max_epochs}.yaml",
            objectives=objectives,
            max_epochs=max_epochs,
            limit_train_batches=3,
            limit_val_batches=0,
        )
        run_dir = tmp / name
        # The schedule spans the full 6 steps in both runs (it is part of what resumes).
        argv = [
            "pretrain",
            "fit",
            "--config",
            str(config),
            "--trainer.default_root_dir",
            str(run_dir),
            "--model.optimizer.max_steps",
            "6",
            *extra,
        ]
        assert fm3d_main(argv) == 0
        return run_dir

    straight = _losses(fit("straight", 2), objectives)
    fit("resumed", 1)
    resumed = _losses(fit("resumed", 2, "--ckpt_path", "last"), objectives)
    return straight, resumed


def _assert_same(straight: dict, resumed: dict, steps: range) -> None:
    for key in straight:
        assert len(resumed[key]) == 6, key
        for step in steps:
            expected, got = straight[key][step], resumed[key][step]
            assert abs(got - expected) <= 1e-6 * max(1.0, abs(expected)), (key, step, expected, got)


def test_the_first_step_after_resuming_matches_the_uninterrupted_run(straight_and_resumed) -> None:
    straight, resumed = straight_and_resumed
    assert straight["train/loss"][3] != straight["train/loss"][2]  # the step is not trivially equal
    _assert_same(straight, resumed, range(4))


def test_every_later_step_matches_the_uninterrupted_run(straight_and_resumed) -> None:
    straight, resumed = straight_and_resumed
    _assert_same(straight, resumed, range(6))
