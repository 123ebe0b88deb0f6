"""slurm/finetune.sbatch run for real on the local SLURM cluster: USR1 -> save + requeue -> resume.

Fine-tuning shares pretraining's run setup (fm3d.train): the requeued job keeps its run folder
`<runs_root>/<task>/slurm-<jobid>` and Lightning resumes from the `hpc_ckpt` it wrote there.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
import pytest
import torch

import fm3d

pytestmark = pytest.mark.slow

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "image_size": (16, 32, 32)}


def test_usr1_saves_requeues_and_the_fine_tuning_resumes_to_the_end(
    slurm, demo_cohort: Path, cli_kit, tmp_path: Path
) -> None:
    max_epochs = 150
    export = tmp_path / "encoder"
    fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", **TINY), export)
    studies = pl.read_parquet(demo_cohort / "manifest.parquet")["study_id"].to_list()
    args = [
        "--model.encoder", str(export),
        "--data.cache_dir", str(demo_cohort / "cache"),
        "--data.labels", str(demo_cohort / "findings.parquet"), "--data.image_size", "[16, 32, 32]",
        "--data.loader.num_workers", "0", "--data.loader.batch_size", "4",
        "--data.loader.fixed_splits", f"{{train: {studies[:6]}, val: {studies[6:]}, test: {studies[6:]}}}",
        "--runs_root", "runs", "--trainer.max_epochs", str(max_epochs),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    config = cli_kit.conf / "classification.yaml"
    job = slurm.submit("finetune.sbatch", [], tmp_path, str(config), *args)
    output = tmp_path / f"job-{job}.out"
    run_dir = tmp_path / "runs" / "classification" / f"slurm-{job}"
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        slurm.wait(last.exists, 300, "the first checkpoint", output)
        slurm.preempt_and_release(job, output)
        state = slurm.wait_finished(job, 600, output)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = output.read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "fm3d: preemption signal 10; saving" in log
    assert f"fm3d: requeued SLURM job {job}" in log
    assert f"finetune.sbatch: job {job} attempt 1" in log
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert f"Restored all states from the checkpoint at {hpc.relative_to(tmp_path)}" in log
    preempted_at = torch.load(hpc, weights_only=True)["epoch"]
    assert 0 <= preempted_at < max_epochs - 1
    # The resumed run trained on to the last epoch in the same folder (epochs count from 0).
    assert torch.load(last, weights_only=True)["epoch"] == max_epochs - 1
    assert (run_dir / "checkpoints" / "best.ckpt").is_file()
