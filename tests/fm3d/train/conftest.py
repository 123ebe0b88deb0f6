"""A tiny LightningModule whose validation metric follows a script, for run-setup tests."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset


class ScriptedModule(pl.LightningModule):
    """A linear model; `val/score` at epoch e is `scores[e]`, so the best epoch is known in advance."""

    def __init__(self, scores: list[float], monitor: tuple[str, str] | None = ("val/score", "min")) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.scores = scores
        self.monitor = monitor

    def checkpoint_monitor(self) -> tuple[str, str] | None:
        return self.monitor

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/score", float(self.scores[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self) -> DataLoader:
        return loader(2)

    def val_dataloader(self) -> DataLoader:
        return loader(1)


def loader(batches: int) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(batches * 2, 4)), batch_size=2)


@pytest.fixture
def scripted():
    return ScriptedModule, loader
