"""Shared base of the tasks that evaluate a pretrained CLIP (zero-shot, retrieval) without training.

Both load the image encoder (`model.encoder`) and the CLIP heads (`model.clip`, the folder
pretraining exports as `<run>/export/clip`), check that they belong together, keep both frozen,
and only validate / test / predict: `fm3d finetune fit` on them stops with an error that says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from downstream.base import DownstreamTask
from downstream.strategies import FinetuneStrategy
from fm3d.clip import ClipModel, load_clip
from fm3d.errors import Fm3dError


class LanguageTaskError(Fm3dError, ValueError):
    """A language task asked to do what it cannot (train a zero-shot task, mismatched CLIP, missing LM)."""


def load_task_clip(clip: str | Path | ClipModel, encoder: nn.Module) -> ClipModel:
    """The CLIP heads from `clip` (folder or model), checked against `encoder`'s embedding width."""
    model = clip if isinstance(clip, ClipModel) else load_clip(clip)
    if model.config.image_embed_dim != encoder.embed_dim:
        raise LanguageTaskError(
            f"the CLIP heads {'' if isinstance(clip, ClipModel) else clip} project "
            f"{model.config.image_embed_dim}-d image embeddings but the encoder gives {encoder.embed_dim}-d "
            "ones; pass the encoder exported by "
            "the same pretraining run (<run>/export/encoder with <run>/export/clip)"
        )
    return model.requires_grad_(False).eval()


class ClipEvalTask(DownstreamTask):
    """A frozen encoder + frozen CLIP heads, evaluated only (see the module docstring)."""

    def __init__(
        self,
        encoder: str | nn.Module,
        clip: str | ClipModel,
        encoder_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(encoder, FinetuneStrategy("frozen"), encoder_overrides=encoder_overrides)
        self.clip = load_task_clip(clip, self.encoder)

    def train(self, mode: bool = True) -> ClipEvalTask:
        super().train(mode)
        self.clip.eval()
        return self

    @torch.no_grad()
    def image_embeddings(self, image: torch.Tensor) -> torch.Tensor:
        """Normalised joint-space embeddings [B, P] of a batch's HU images [B, 1, D, H, W]."""
        return self.clip.encode_image(self.encoder(self.prepare_image(image)).pooled).float()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        raise LanguageTaskError(f"{self.task_name} evaluates a pretrained CLIP and does not train")

    def configure_optimizers(self) -> Any:
        raise LanguageTaskError(
            f"the {self.task_name} task does not train: run `fm3d finetune validate`, `test` or `predict` "
            "(or `fm3d evaluate`) with this config instead of `fit`"
        )
