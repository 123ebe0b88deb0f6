"""SlurmRequeue: a SIGUSR1 in a step saves the hpc checkpoint at that step's end; fit resumes from it."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from fm3d.train.preemption import SlurmRequeue, slurm_job_id

SIGNAL_AT_STEP = 2


class Regression(pl.LightningModule):
    """A linear regression that sends itself SIGUSR1 in one training step, as SLURM would."""

    def __init__(self, signal_at: int | None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(3, 1)
        self.signal_at = signal_at
        self.started_at: int | None = None

    def on_train_start(self) -> None:
        self.started_at = self.global_step

    def training_step(self, batch, batch_idx):
        if self.global_step == self.signal_at:
            os.kill(os.getpid(), signal.SIGUSR1)
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def _trainer(root: Path, callbacks: list) -> pl.Trainer:
    return pl.Trainer(
        default_root_dir=root, max_steps=8, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def test_the_signal_is_handled_at_the_step_end_and_fit_resumes_there(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # no job to requeue: only the checkpoint
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    before = signal.getsignal(signal.SIGUSR1)
    _trainer(tmp_path, [SlurmRequeue()]).fit(Regression(signal_at=SIGNAL_AT_STEP), _loader())
    assert signal.getsignal(signal.SIGUSR1) is before  # the handler is put back after fit

    saved = torch.load(tmp_path / "hpc_ckpt_1.ckpt", weights_only=True)
    assert saved["global_step"] == SIGNAL_AT_STEP + 1  # the step that got the signal, finished
    assert sorted(p.name for p in tmp_path.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"]  # once only

    resumed = Regression(signal_at=None)
    _trainer(tmp_path / "again", []).fit(resumed, _loader(), ckpt_path=str(tmp_path / "hpc_ckpt_1.ckpt"))
    assert resumed.started_at == SIGNAL_AT_STEP + 1


def test_the_job_id_is_the_array_task_for_array_jobs(monkeypatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "1234")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "1234"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "1200")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert slurm_job_id() == "1200_7"
