"""slurm/*.sbatch run for real on the local SLURM cluster: 2 DDP tasks, USR1 -> save + requeue -> resume.

The cluster comes from `../shared/tools/local-slurm.sh start` (a one-node slurmctld+slurmd);
the tests skip with the reason when it cannot start. SLURM holds a requeued job for 120 s
before it is eligible again; the test releases it at once (`scontrol update StartTime=now`),
which changes only the waiting, not what runs.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fm3d

REPO = Path(__file__).resolve().parents[2]
LOCAL_SLURM = REPO.parent / "shared" / "tools" / "local-slurm.sh"
FM3D = Path(sys.executable).parent / "fm3d"

pytestmark = pytest.mark.slow


MUNGE_RUN = Path("/run/munge")
SLURM_LOGS = (Path("/var/log/slurm/slurmctld.log"), Path("/var/log/slurm/slurmd.log"))


def _clear_stale_munge_socket() -> None:
    """Remove munged's socket when the munged that made it is gone.

    A machine restored from a snapshot keeps /run/munge/munge.socket.2 but not the process;
    local-slurm.sh then takes munged for running, SLURM's authentication is refused, and every
    `sinfo` waits out its timeout (the start took > 5 min and never came up).
    """
    pid_file = MUNGE_RUN / "munged.pid"
    if not pid_file.is_file():
        return
    try:
        os.kill(int(pid_file.read_text().strip()), 0)
    except (ValueError, ProcessLookupError):
        for stale in ("munge.socket.2", "munge.socket.2.lock", "munged.pid"):
            (MUNGE_RUN / stale).unlink(missing_ok=True)


def _log_tails() -> str:
    return "\n".join(f"{log}:\n{log.read_text()[-800:]}" for log in SLURM_LOGS if log.is_file())


@pytest.fixture(scope="module")
def slurm_cluster() -> None:
    if not LOCAL_SLURM.is_file():
        pytest.skip(f"{LOCAL_SLURM} is absent: no local SLURM cluster to test the sbatch scripts on")
    _clear_stale_munge_socket()
    try:
        started = subprocess.run(
            ["bash", str(LOCAL_SLURM), "start"], capture_output=True, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"the local SLURM cluster did not come up within 10 min:\n{_log_tails()}")
    if started.returncode != 0 or shutil.which("sbatch") is None:
        pytest.skip(f"the local SLURM cluster did not start: {started.stderr.strip()[-500:]}\n{_log_tails()}")


def _job_state(job_id: str) -> dict[str, str]:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", shown))


def _wait(condition, timeout_s: float, what: str, output: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            tail = output.read_text()[-3000:] if output.exists() else "(no output yet)"
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; job output:\n{tail}")
        time.sleep(2)


def _submit(script: str, sbatch_options: list[str], config: Path, cwd: Path, *overrides: str) -> str:
    argv = [
        "sbatch",
        "--parsable",
        "--cpus-per-task=1",
        "--time=20",
        "--output=job-%j.out",
        *sbatch_options,
        str(REPO / "slurm" / script),
        str(config),
        "--runs_root",
        "runs",
        "--trainer.enable_progress_bar",
        "false",
        *overrides,
    ]
    submitted = subprocess.run(
        argv, cwd=cwd, capture_output=True, text=True, env={**os.environ, "FM3D": str(FM3D)}
    )
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def test_usr1_saves_requeues_and_the_job_resumes_to_the_end(
    slurm_cluster, demo_cohort, run_config, tmp_path: Path
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
    job = _submit("pretrain.sbatch", ["--ntasks-per-node=2"], config, tmp_path)
    output = tmp_path / f"job-{job}.out"
    run_dir = tmp_path / "runs" / "test" / f"slurm-{job}"
    try:
        # Preempt once training is under way (the first epoch's last.ckpt exists).
        _wait(lambda: (run_dir / "checkpoints" / "last.ckpt").exists(), 300, "the first checkpoint", output)
        subprocess.run(["scancel", "--signal=USR1", job], check=True)
        _wait(lambda: _job_state(job).get("Restarts") == "1", 120, "the requeue", output)
        _wait(lambda: _job_state(job).get("JobState") == "PENDING", 120, "the requeued job to pend", output)
        subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True)
        _wait(
            lambda: _job_state(job).get("JobState") in {"COMPLETED", "FAILED", "CANCELLED"},
            600,
            "the resumed job to finish",
            output,
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = output.read_text()
    assert _job_state(job)["JobState"] == "COMPLETED", log[-3000:]
    assert "Handling auto-requeue signal" in log
    assert f"job {job} attempt 1" in log
    hpc = run_dir / "hpc_ckpt_1.ckpt"
    assert f"Restored all states from the checkpoint at runs/test/slurm-{job}/hpc_ckpt_1.ckpt" in log
    preempted_at = torch.load(hpc, weights_only=True)["global_step"]
    assert 1 <= preempted_at < max_steps
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == max_steps
    # Two tasks, one world: both ranks reported, one export.
    assert log.count("SLURM auto-requeueing enabled") == 4  # 2 ranks x 2 attempts
    assert fm3d.load_encoder(run_dir / "export" / "encoder").config.name == "vit3d_tiny"


def test_multinode_script_runs_with_two_tasks(slurm_cluster, demo_cohort, run_config, tmp_path: Path) -> None:
    # The local cluster has one node and no GPUs: the allocation is overridden on the command
    # line, which is how the script's own #SBATCH defaults are meant to be adapted.
    config = run_config(
        demo_cohort, tmp_path / "run.yaml", objectives=("phenotype",), max_steps=2, strategy="ddp"
    )
    job = _submit(
        "pretrain-multinode.sbatch",
        ["--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0"],
        config,
        tmp_path,
    )
    output = tmp_path / f"job-{job}.out"
    try:
        _wait(
            lambda: _job_state(job).get("JobState") in {"COMPLETED", "FAILED", "CANCELLED"},
            400,
            "the job to finish",
            output,
        )
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = output.read_text()
    assert _job_state(job)["JobState"] == "COMPLETED", log[-3000:]
    assert "1 node(s) x 2 task(s)" in log
    run_dir = tmp_path / "runs" / "test" / f"slurm-{job}"
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 2
    assert (run_dir / "export" / "encoder" / "model.safetensors").is_file()
