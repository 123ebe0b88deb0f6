"""Preemption under SLURM: save an hpc checkpoint and requeue at a step every rank has reached.

SLURM sends SIGUSR1 before a job's time limit (`#SBATCH --signal=USR1@300`). Lightning's own
handler saves the checkpoint and requeues from inside the signal handler, which interrupts
whatever the rank was doing: a DDP rank caught inside a collective (a gradient all-reduce, a
CLIP gather) then enters the checkpoint's barrier out of step with the others and the job
hangs until its time limit (seen on the local cluster, tests/pretrain/test_slurm.py). Here the
handler only records the signal; after each training batch the ranks agree whether any of them
got it, and if so all of them save `<run>/hpc_ckpt_<n>.ckpt` (Lightning's name, from which
`fit` resumes by itself) and rank zero runs `scontrol requeue <job>`. SLURM then ends the job
and starts it again with the same id, hence the same run folder.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from types import FrameType
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

logger = logging.getLogger(__name__)


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` takes: `<array job>_<task>` for an array task, else the job id."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    if array_job:
        return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ.get("SLURM_JOB_ID")


class SlurmRequeue(Callback):
    """Save and requeue on SIGUSR1 at the first training-batch end after it (see module docstring)."""

    def __init__(self, signal_number: int = signal.SIGUSR1) -> None:
        self.signal_number = signal_number
        self.requested = False
        self._previous: Any = None

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._previous = signal.signal(self.signal_number, self._record)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._previous is not None:
            signal.signal(self.signal_number, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        # One small all-reduce a step: every rank takes the same branch at the same step.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        self.requested = False
        path = trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir)
        rank_zero_info(f"fm3d: preemption signal {self.signal_number}; saving {path} and requeueing")
        trainer.save_checkpoint(path)
        job = slurm_job_id()
        if trainer.is_global_zero and job is not None:
            done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if done.returncode == 0:
                rank_zero_info(f"fm3d: requeued SLURM job {job}")
            else:
                logger.warning("scontrol requeue %s failed (%s); training goes on", job, done.stderr.strip())
