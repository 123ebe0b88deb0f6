"""The base class of every downstream task, and the evaluation result tasks hand back.

A task is a LightningModule named in the registry (`@register_task("name")`). The base class
owns what every task shares, so a task module only says what its head computes:

- `self.encoder`: resolved from a module, an export folder, a Lightning .ckpt or a registry
  name (`resolve_encoder`), then adapted by the fine-tune strategy (`downstream.strategies`).
- optimizer and schedule: AdamW over the strategy's parameter groups (LLRD for "full"), linear
  warm-up then cosine decay over the trainer's total steps.
- the loop: a subclass implements `step(batch, stage) -> StepOutput` (loss plus the tensors to
  collect) and `summarize(collected, stage) -> Evaluation`; the base class logs
  `{stage}/loss`, gathers the collected tensors over the validation/test epoch and logs every
  metric of the summary as `{stage}/{metric}`. After `trainer.test`, `task.evaluation` and
  `task.collected` hold the test summary and raw outputs; `fm3d evaluate` writes them out with
  the figures of `task.figures(collected, evaluation)`.
- checkpoints carry `"fm3d_encoder_config"` (the encoder's config) and `"fm3d_task"`; LoRA runs
  also `"fm3d_encoder_state_dict"`, the encoder with its adapters merged (plain names).
"""

from __future__ import annotations

import copy
import logging
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import lightning as L
import numpy as np
import polars as pl
import torch
from torch import nn

import fm3d
from downstream.strategies import FinetuneStrategy, apply_strategy, parameter_groups
from fm3d.data.regions import scale_window
from fm3d.errors import Fm3dError
from fm3d.io import CKPT_CONFIG_KEY, CKPT_MERGED_KEY
from fm3d.models.lora import merge_lora
from fm3d.train.optim import WarmupCosine

logger = logging.getLogger(__name__)

# Which task wrote a checkpoint (the encoder keys are fm3d.io's, which load_encoder reads).
CKPT_TASK_KEY = "fm3d_task"


class EncoderSpecError(Fm3dError, ValueError):
    """An `encoder` argument that is neither a module, an existing path nor a known encoder name."""


class TaskConfigError(Fm3dError, ValueError):
    """Task arguments that do not fit together (e.g. a per-class setting with the wrong count)."""


def resolve_encoder(encoder: str | Path | nn.Module, overrides: dict[str, Any] | None = None) -> nn.Module:
    """An fm3d encoder from a module, an export folder / .ckpt path, or a registry name.

    `overrides` (e.g. `{"image_size": [32, 64, 64]}`) apply only to a freshly created encoder:
    a saved encoder keeps the configuration it was trained with.
    """
    if isinstance(encoder, nn.Module):
        return encoder
    spec = str(encoder)
    path = Path(spec).expanduser()
    if path.exists():
        if overrides:
            raise EncoderSpecError(
                f"encoder_overrides only apply to a registry name, not the saved encoder {path}"
            )
        return fm3d.load_encoder(path)
    names = fm3d.list_encoders()
    if spec in names:
        return fm3d.create_encoder(spec, **(overrides or {}))
    raise EncoderSpecError(
        f"encoder {spec!r} is not an existing path (export folder or .ckpt) nor a registered encoder; "
        f"registered encoders: {names}"
    )


def safe_name(name: str) -> str:
    """`name` usable as an MLflow metric key and a file name: runs outside [A-Za-z0-9._-] become "_".

    Task codes such as "HOSPITAL_ADMISSION//EMERGENCY" would otherwise be refused by MLflow or
    become folders.
    """
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


@dataclass
class StepOutput:
    """What `DownstreamTask.step` returns: the loss, and per-sample values to gather over the epoch.

    `collect` maps a name to a tensor whose first dimension is the batch (concatenated over the
    epoch) or to a list (extended).
    """

    loss: torch.Tensor
    collect: dict[str, torch.Tensor | list] = field(default_factory=dict)


@dataclass
class Evaluation:
    """A task's evaluation: headline metrics, detail tables and (optionally) figures.

    metrics: scalar name -> value, one row of the metrics table (e.g. `dice_mean`, `auroc_macro`).
    tables: name -> table with one row per class/group (e.g. per-class Dice), written as CSV.
    """

    task: str
    metrics: dict[str, float]
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)


def finite_mean(values: np.ndarray) -> float:
    """Mean of the finite entries (NaN marks a class or group that could not be scored); NaN if none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else float("nan")


class DownstreamTask(L.LightningModule):
    """Base LightningModule of a downstream task; see the module docstring for the contract.

    Args:
        encoder: an encoder module, an export folder, a .ckpt or a registry name (e.g. "vit3d_tiny").
        strategy: how the encoder is fine-tuned (frozen / full with LLRD / LoRA).
        lr: learning rate of the head (and of the last encoder layer's neighbours under LLRD).
        weight_decay: AdamW weight decay (not applied to biases, norms and embeddings).
        warmup_steps: linear warm-up steps before the cosine decay.
        encoder_overrides: config overrides for a freshly created encoder (e.g. image_size).
    """

    task_name: ClassVar[str] = ""
    # The LightningDataModule the CLI pairs with this task (set by each task module).
    datamodule_class: ClassVar[type[L.LightningDataModule] | None] = None
    # Arguments the CLI links from data to model: (source, target) at parse time, e.g.
    # ("data.class_names", "model.class_names"), or ("data", "model.x", fn) to compute
    # model.x = fn(datamodule) once the data module is instantiated.
    cli_links: ClassVar[tuple[tuple[Any, ...], ...]] = ()

    def __init__(
        self,
        encoder: str | nn.Module,
        strategy: FinetuneStrategy | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        warmup_steps: int = 0,
        encoder_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["encoder"] if isinstance(encoder, nn.Module) else None)
        self.strategy = strategy or FinetuneStrategy()
        self.encoder = apply_strategy(resolve_encoder(encoder, encoder_overrides), self.strategy)
        self.lr = lr
        self.weight_decay = weight_decay
        self.warmup_steps = warmup_steps
        self.evaluation: Evaluation | None = None
        self.collected: dict[str, torch.Tensor | list] = {}
        self._epoch_outputs: list[dict[str, torch.Tensor | list]] = []

    # ---- what a subclass implements -------------------------------------------------------
    def step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        """Loss and collected values for one batch; `stage` is "train", "val" or "test"."""
        raise NotImplementedError

    def summarize(self, collected: dict[str, torch.Tensor | list], stage: str) -> Evaluation:
        """Metrics over a whole validation/test epoch from the gathered `collect` values."""
        raise NotImplementedError

    def figures(self, collected: dict[str, torch.Tensor | list], evaluation: Evaluation) -> dict[str, Any]:
        """Matplotlib figures (name -> Figure) for `fm3d evaluate`; none by default."""
        return {}

    def checkpoint_monitor(self) -> tuple[str, str] | None:
        """The validation metric `checkpoints/best.ckpt` is kept by: the validation loss, lowest wins."""
        return ("val/loss", "min")

    # ---- shared helpers -------------------------------------------------------------------
    @property
    def hu_window(self) -> tuple[float, float]:
        """The HU window the encoder was trained with (its config's `hu_window`)."""
        return tuple(self.encoder.config.hu_window)

    @property
    def intensity_range(self) -> tuple[float, float]:
        """What the encoder's window was scaled to in training (its config's `intensity_range`)."""
        return tuple(self.encoder.config.intensity_range)

    def prepare_image(self, image: torch.Tensor) -> torch.Tensor:
        """Model input from a batch's HU image [B, 1, D, H, W]: clipped and scaled as in pretraining."""
        low, high = self.hu_window
        return scale_window(image.float().clamp(low, high) - low, self.hu_window, self.intensity_range)

    def head_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The task's own parameters (everything outside `self.encoder`), by name."""
        for name, param in self.named_parameters():
            if not name.startswith("encoder."):
                yield name, param

    def plain_encoder(self) -> nn.Module:
        """The encoder as a plain fm3d module (LoRA merged into a copy), ready for `fm3d.save_encoder`."""
        encoder = copy.deepcopy(self.encoder)
        return merge_lora(encoder) if self.strategy.name == "lora" else encoder

    # ---- Lightning plumbing ---------------------------------------------------------------
    def train(self, mode: bool = True) -> DownstreamTask:
        super().train(mode)
        if self.strategy.name == "frozen":
            # A frozen encoder stays in eval mode: dropout off, normalisation statistics fixed.
            self.encoder.eval()
        return self

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.step(batch, "train")
        self.log("train/loss", out.loss, prog_bar=True, batch_size=self._batch_size(batch))
        return out.loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, Any], stage: str) -> None:
        out = self.step(batch, stage)
        # Synchronised over ranks: val/loss picks best.ckpt, which every DDP rank must judge alike.
        self.log(f"{stage}/loss", out.loss, batch_size=self._batch_size(batch), sync_dist=True)
        self._epoch_outputs.append(
            {k: v.detach().cpu() if isinstance(v, torch.Tensor) else list(v) for k, v in out.collect.items()}
        )

    def on_validation_epoch_start(self) -> None:
        self._epoch_outputs = []

    def on_test_epoch_start(self) -> None:
        self._epoch_outputs = []

    def on_validation_epoch_end(self) -> None:
        self._end_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._end_epoch("test")

    def _end_epoch(self, stage: str) -> None:
        collected = _concatenate(self._epoch_outputs)
        self._epoch_outputs = []
        if not collected or self.trainer.sanity_checking:
            return
        evaluation = self.summarize(collected, stage)
        for name, value in evaluation.metrics.items():
            if math.isfinite(value):
                self.log(f"{stage}/{safe_name(name)}", float(value))
        if stage == "test":
            self.collected, self.evaluation = collected, evaluation

    @staticmethod
    def _batch_size(batch: dict[str, Any]) -> int:
        image = batch.get("image")
        return int(image.shape[0]) if isinstance(image, torch.Tensor) else 1

    def configure_optimizers(self) -> dict[str, Any]:
        groups = parameter_groups(
            self.encoder, self.head_parameters(), self.strategy, self.lr, self.weight_decay
        )
        optimizer = torch.optim.AdamW(groups, lr=self.lr, fused=True)  # one pass over all parameters
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = WarmupCosine(min(self.warmup_steps, total), total)  # pretraining's schedule
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_CONFIG_KEY] = self.encoder.config.to_dict()
        checkpoint[CKPT_TASK_KEY] = self.task_name
        if self.strategy.name == "lora":
            # The state_dict holds peft's names (base_layer, lora_A/B) so training can resume; the
            # merged weights under the encoder's own names are what a plain encoder loads.
            checkpoint[CKPT_MERGED_KEY] = {
                k: v.detach().cpu() for k, v in self.plain_encoder().state_dict().items()
            }


def _concatenate(outputs: list[dict[str, torch.Tensor | list]]) -> dict[str, torch.Tensor | list]:
    """Join per-batch collected values: tensors along dim 0, lists end to end."""
    if not outputs:
        return {}
    joined: dict[str, torch.Tensor | list] = {}
    for key in outputs[0]:
        values = [o[key] for o in outputs]
        if isinstance(values[0], torch.Tensor):
            joined[key] = torch.cat([v.reshape(1) if v.ndim == 0 else v for v in values])
        else:
            joined[key] = [item for v in values for item in v]
    return joined
