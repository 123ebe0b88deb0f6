"""slurm/*.sbatch run for real on the local SLURM cluster: 2 DDP tasks, USR1 -> save + requeue -> resume.

The cluster comes from `../shared/tools/local-slurm.sh start` (a one-node slurmctld+slurmd);
the tests skip with the reason when it cannot start. SLURM holds a requeued job for 120 s
before it is eligible again; the test releases it at once (`scontrol update StartTime=now`),
which changes only the waiting, not what runs.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import fm3d

pytestmark = pytest.mark.slow


def _submit(slurm, script: str, sbatch_options: list[str], config: Path, cwd: Path) -> str:
    run_options = ["--runs_root", "runs", "--trainer.enable_progress_bar", "false"]
    return slurm.submit(script, sbatch_options, cwd, str(config), *run_options)


def test_usr1_saves_requeues_and_the_job_resumes_to_the_end(
    slurm, demo_cohort, run_config, tmp_path: Path
) -> None:
    max_steps = 120
    config = run_config(
        demo_cohort,
        tmp_path / "run.yaml",
        objectives=("voco", "clip"),
        max_steps=max_steps,
        limit_train_batches=3,
        limit_val_batches=0,
        strategy="ddp",
    )
    job = _submit(slurm, "pretrain.sbatch", ["--ntasks-per-node=2"], config, tmp_path)
    output = tmp_path / f"job-{job}.out"
    run_dir = tmp_path / "runs" / "test" / f"slurm-{job}"
    try:
        # Preempt once training is under way (the first epoch's last.ckpt exists).
        slurm.wait(
            lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 300, "the first checkpoint", output
        )
        slurm.preempt_and_release(job, output)
        state = slurm.wait_finished(job, 600, output)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = output.read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "fm3d: preemption signal 10; saving" in log
    assert f"fm3d: requeued SLURM job {job}" in log
    assert f"job {job} attempt 1" in log
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert f"Restored all states from the checkpoint at runs/test/slurm-{job}/hpc_ckpt_1.ckpt" in log
    preempted_at = torch.load(hpc, weights_only=True)["global_step"]
    assert 1 <= preempted_at < max_steps
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == max_steps
    # Two tasks, one world: both ranks reported, one export.
    assert log.count("Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # 2 attempts
    assert fm3d.load_encoder(run_dir / "export" / "encoder").config.name == "vit3d_tiny"


def test_multinode_script_runs_with_two_tasks(slurm, demo_cohort, run_config, tmp_path: Path) -> None:
    # The local cluster has one node and no GPUs: the allocation is overridden on the command
    # line, which is how the script's own #SBATCH defaults are meant to be adapted.
    config = run_config(
        demo_cohort, tmp_path / "run.yaml", objectives=("phenotype",), max_steps=2, strategy="ddp"
    )
    job = _submit(
        slurm,
        "pretrain-multinode.sbatch",
        ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0"],
        config,
        tmp_path,
    )
    output = tmp_path / f"job-{job}.out"
    try:
        state = slurm.wait_finished(job, 400, output)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = output.read_text()
    assert state == "COMPLETED", log[-3000:]
    assert "1 node(s) x 2 task(s)" in log
    run_dir = tmp_path / "runs" / "test" / f"slurm-{job}"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert (run_dir / "export" / "encoder" / "model.safetensors").is_file()
