"""Multi-label classification of findings: a linear (or MLP) head on the pooled embedding.

Loss: BCE-with-logits with per-class `pos_weight` = negatives / positives of the training split
(class-imbalance weights; "auto"), masked where a label is unknown. Metrics: AUROC per class
and macro (sklearn), and F1 at per-class thresholds tuned on validation: every validation epoch
picks, per class, the threshold that maximises F1 on the validation predictions and stores it in
the `thresholds` buffer (so it travels with the checkpoint); test F1 uses those thresholds.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import precision_recall_curve
from torch import nn

from downstream.base import DownstreamTask, Evaluation, StepOutput, TaskConfigError
from downstream.data import ClassificationDataModule
from downstream.multilabel import multilabel_evaluation, roc_figures
from downstream.registry import register_task

logger = logging.getLogger(__name__)


def tune_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising F1 on (labels, scores); 0.5 when a class has one label value."""
    if labels.min() == labels.max():
        return 0.5
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    f1 = 2 * precision * recall / np.clip(precision + recall, 1e-12, None)
    # precision/recall have one more entry than thresholds (the final point, recall 0).
    return float(thresholds[int(np.argmax(f1[:-1]))])


@register_task("classification")
class ClassificationTask(DownstreamTask):
    """Multi-label finding classification from the encoder's pooled embedding.

    Args:
        class_names: one name per label column (linked from the data module).
        hidden_dim: None for a linear head (a linear probe with the frozen strategy), else MLP width.
        dropout: dropout before the head.
        pos_weight: "auto" (training negatives / positives per class), "none", or one value per class.
        kwargs: strategy, lr, weight_decay, warmup_steps, encoder_overrides (see DownstreamTask).
    """

    datamodule_class = ClassificationDataModule
    # One class per label column the data module resolved (every boolean column for label_columns: null).
    cli_links = (("data", "model.class_names", lambda data: data.label_columns),)

    def __init__(
        self,
        encoder: str | nn.Module,
        class_names: list[str],
        hidden_dim: int | None = None,
        dropout: float = 0.0,
        pos_weight: Literal["auto", "none"] | list[float] = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, **kwargs)
        self.class_names = list(class_names)
        k, dim = len(self.class_names), self.encoder.embed_dim
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden_dim:
            layers += [nn.Linear(dim, hidden_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden_dim, k)]
        else:
            layers.append(nn.Linear(dim, k))
        self.head = nn.Sequential(*layers)
        self.pos_weight_mode = pos_weight
        initial = (
            torch.tensor(pos_weight, dtype=torch.float32) if isinstance(pos_weight, list) else torch.ones(k)
        )
        if initial.shape != (k,):
            raise TaskConfigError(
                f"model.pos_weight has {initial.numel()} values for {k} classes {self.class_names}; "
                "give one per class, or 'auto' / 'none'"
            )
        self.register_buffer("pos_weight", initial)
        self.register_buffer("thresholds", torch.full((k,), 0.5))

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if (
            stage == "fit"
            and self.pos_weight_mode == "auto"
            and isinstance(datamodule, ClassificationDataModule)
        ):
            positive = datamodule.positive_fraction("train").clamp(1e-3, 1 - 1e-3)
            self.pos_weight.copy_((1 - positive) / positive)
            logger.info(
                "pos_weight per class: %s", dict(zip(self.class_names, self.pos_weight.tolist(), strict=True))
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, K] of a normalised input [B, 1, D, H, W]."""
        return self.head(self.encoder(x).pooled)

    def step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        logits = self(self.prepare_image(batch["image"]))
        labels, mask = batch["labels"].float(), batch["label_mask"].bool()
        losses = F.binary_cross_entropy_with_logits(
            logits, labels, pos_weight=self.pos_weight, reduction="none"
        )
        loss = (losses * mask).sum() / mask.sum().clamp_min(1)
        collect = {
            "probs": torch.sigmoid(logits),
            "labels": labels,
            "mask": mask,
            "study_id": list(batch["study_id"]),
        }
        return StepOutput(loss, collect)

    def summarize(self, collected: dict[str, Any], stage: str) -> Evaluation:
        if stage == "val":
            probs, labels, mask = (collected[k].float().numpy() for k in ("probs", "labels", "mask"))
            mask = mask.astype(bool)
            tuned = [
                tune_threshold(labels[mask[:, k], k], probs[mask[:, k], k])
                for k in range(len(self.class_names))
            ]
            self.thresholds.copy_(torch.tensor(tuned))
        thresholds = self.thresholds.tolist()
        return multilabel_evaluation(
            self.task_name, collected, self.class_names, thresholds, {"threshold": thresholds}
        )

    def figures(self, collected: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
        return roc_figures(collected, self.class_names)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Probabilities and thresholded findings per study."""
        probs = torch.sigmoid(self(self.prepare_image(batch["image"])))
        return {"study_id": list(batch["study_id"]), "probs": probs, "findings": probs >= self.thresholds}
