"""Zero-shot finding classification with a pretrained CLIP: prompt pairs, no training.

For each finding (a label column) and each template pair of the prompt set, the image's joint-
space embedding is compared with the embeddings of "{finding} is present." and "{finding} is not
present."; a softmax over the pair (CT-CLIP) gives P(present), averaged over the templates
(Merlin-style prompt averaging). See `downstream.language.prompts` for the arithmetic and the
prompt-set files (`ct_rate`: CT-RATE's 18 abnormalities; `demo`: the demo cohort's 8 findings).

Data: `ClassificationDataModule` (a per-study table of boolean finding columns, e.g. the demo's
`findings.parquet` or CT-RATE's label CSV with a study_id column). Metrics: AUROC per finding
and macro (sklearn), F1 at P = 0.5 (the pair's own decision point). Run it with
`fm3d finetune validate|test|predict` or `fm3d evaluate`; `fit` is refused.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from downstream.base import Evaluation, StepOutput
from downstream.data import ClassificationDataModule
from downstream.language.clip_eval import ClipEvalTask
from downstream.language.prompts import encode_prompts, load_prompt_set, pair_probabilities
from downstream.multilabel import multilabel_evaluation, roc_figures
from downstream.registry import register_task
from fm3d.clip import ClipModel


@register_task("zero_shot")
class ZeroShotTask(ClipEvalTask):
    """CLIP zero-shot multi-label classification by prompt pairs.

    Args:
        encoder: the image encoder CLIP was trained with (export folder, .ckpt, module).
        clip: the CLIP folder (`<run>/export/clip`, written by `fm3d.clip.save_clip`).
        class_names: the label columns to predict (linked from the data module).
        prompt_set: a shipped set ("ct_rate", "demo") or a YAML path mapping columns to phrases;
            None reads each column name as its phrase ("lung_nodule" -> "lung nodule").
        templates: [positive, negative] template pairs replacing the prompt set's own.
        encoder_overrides: config overrides for a freshly created encoder (registry name only).
    """

    datamodule_class = ClassificationDataModule
    cli_links = (("data", "model.class_names", lambda data: data.label_columns),)

    def __init__(
        self,
        encoder: str | nn.Module,
        clip: str | ClipModel,
        class_names: list[str],
        prompt_set: str | None = None,
        templates: list[list[str]] | None = None,
        encoder_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(encoder, clip, encoder_overrides)
        self.class_names = list(class_names)
        self.prompt_set = load_prompt_set(prompt_set, templates)
        self.prompts = self.prompt_set.prompts(self.class_names)  # [K][M] (positive, negative)
        self._prompt_embeddings: torch.Tensor | None = None

    def prompt_embeddings(self) -> torch.Tensor:
        """Joint-space embeddings [K, M, 2, P] of every prompt (computed once, on the model's device)."""
        if self._prompt_embeddings is None or self._prompt_embeddings.device != self.device:
            self._prompt_embeddings = encode_prompts(self.clip, self.prompts)
        return self._prompt_embeddings

    @torch.no_grad()
    def forward(self, image: torch.Tensor) -> torch.Tensor:
        """P(present) [B, K] of every finding for a batch of HU images [B, 1, D, H, W]."""
        return pair_probabilities(self.image_embeddings(image), self.prompt_embeddings(), self.clip.scale())

    def step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        probs = self(batch["image"])
        labels, mask = batch["labels"].float(), batch["label_mask"].bool()
        # Only logged: how well calibrated the pair probabilities are (nothing trains).
        losses = F.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), labels, reduction="none")
        loss = (losses * mask).sum() / mask.sum().clamp_min(1)
        return StepOutput(
            loss, {"probs": probs, "labels": labels, "mask": mask, "study_id": list(batch["study_id"])}
        )

    def summarize(self, collected: dict[str, Any], stage: str) -> Evaluation:
        # The decision point of a prompt pair is its own: P(present) = 0.5.
        first_prompts = [pairs[0][0] for pairs in self.prompts]
        thresholds = [0.5] * len(self.class_names)
        return multilabel_evaluation(
            self.task_name, collected, self.class_names, thresholds, {"prompt": first_prompts}
        )

    def figures(self, collected: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
        return roc_figures(collected, self.class_names)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """P(present) per finding and study, and the findings called present (P >= 0.5)."""
        probs = self(batch["image"])
        return {"study_id": list(batch["study_id"]), "probs": probs, "findings": probs >= 0.5}
