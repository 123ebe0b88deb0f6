"""Multi-label phenotype prediction from the pooled CT embedding (Merlin's EHR supervision).

Merlin (Blankemeier et al., 2024) trains its image encoder with a linear head over the
pooled features that predicts the patient's phenotype codes (PheWAS groups) with binary
cross-entropy. Studies without EHR (`has_ehr` False) and unknown labels (NaN) still go
through the head; their terms are multiplied by 0.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.base import Objective, ObjectiveError, masked_mean, require, row_mask
from pretrain.objectives.gather import gather_rows

logger = logging.getLogger(__name__)


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks of `values`, tied values sharing the mean of their ranks."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last = np.cumsum(counts)  # rank of each distinct value's last occurrence
    return (last - (counts - 1) / 2)[inverse.reshape(-1)]


def macro_auroc(scores: np.ndarray, labels: np.ndarray, observed: np.ndarray) -> tuple[float, int]:
    """Mean ROC AUC over the columns that have both classes among their observed rows.

    AUC per column is the Mann-Whitney statistic with tied scores given their average rank
    (ties count 1/2), equal to scikit-learn's `roc_auc_score`. Returns (macro AUC, number of
    columns it averages); (nan, 0) when no column has both classes.
    """
    aucs = []
    for column in range(scores.shape[1]):
        keep = observed[:, column]
        y, s = labels[keep, column] > 0.5, scores[keep, column]
        positives, negatives = int(y.sum()), int((~y).sum())
        if positives == 0 or negatives == 0:
            continue
        ranks = _average_ranks(s)
        aucs.append((ranks[y].sum() - positives * (positives + 1) / 2) / (positives * negatives))
    return (float(np.mean(aucs)), len(aucs)) if aucs else (float("nan"), 0)


class PhenotypeObjective(Objective):
    """Binary cross-entropy of a linear phenotype head on the pooled embedding (Merlin).

    Args:
        embed_dim: the encoder's pooled width.
        num_phenotypes: P, the width of `batch["phenotype"]` (the EHR label table's phenotypes).
    Loss: mean BCE over the observed (study, phenotype) entries of the batch.
    Metric: `positive_rate` (share of observed labels that are positive, a sanity check);
    validation `auroc` (macro over phenotypes with both classes observed; how many is logged).
    """

    name = "phenotype"
    views = ("image",)
    batch_keys = ("image", "phenotype")

    def __init__(self, embed_dim: int, num_phenotypes: int) -> None:
        super().__init__()
        if num_phenotypes < 1:
            raise ObjectiveError(f"num_phenotypes must be >= 1, got {num_phenotypes}")
        self.num_phenotypes = num_phenotypes
        self.head = nn.Linear(embed_dim, num_phenotypes)
        self._val: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def _logits_labels_mask(self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]):
        pooled = encoded["image"].pooled  # [B, C]
        labels = torch.as_tensor(
            require(batch, "phenotype", self.name), device=pooled.device
        ).float()  # [B, P]
        if labels.shape != (pooled.shape[0], self.num_phenotypes):
            raise ObjectiveError(
                f"batch['phenotype'] has shape {tuple(labels.shape)}, expected [B, num_phenotypes] = "
                f"{(pooled.shape[0], self.num_phenotypes)}; set num_phenotypes to the label table's width"
            )
        observed = row_mask(batch, "has_ehr", pooled.shape[0], pooled.device)[:, None] & torch.isfinite(
            labels
        )
        labels = torch.where(observed, labels, torch.zeros_like(labels))
        return self.head(pooled).float(), labels, observed

    def forward(
        self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        logits, labels, observed = self._logits_labels_mask(batch, encoded)
        loss = masked_mean(F.binary_cross_entropy_with_logits(logits, labels, reduction="none"), observed)
        positive_rate = masked_mean(labels, observed).detach()
        return loss, {"positive_rate": positive_rate}

    def reset_validation(self) -> None:
        self._val = []

    @torch.no_grad()
    def update_validation(self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]) -> None:
        self._val.append(tuple(t.detach() for t in self._logits_labels_mask(batch, encoded)))

    @torch.no_grad()
    def compute_validation(self) -> dict[str, float]:
        """Macro AUROC over everything accumulated on every rank."""
        device = self.head.weight.device
        parts = (
            list(zip(*self._val, strict=True))
            if self._val
            else [[torch.zeros(0, self.num_phenotypes, device=device)]] * 3
        )
        logits, labels, observed = (gather_rows(torch.cat(p), with_grad=False)[0] for p in parts)
        auroc, evaluated = macro_auroc(
            logits.cpu().numpy(), labels.cpu().numpy(), observed.cpu().numpy().astype(bool)
        )
        if evaluated == 0:
            logger.info("phenotype AUROC skipped: no phenotype has both classes in the validation set")
            return {}
        logger.info(
            "phenotype AUROC over the %d phenotypes with both classes in the validation set", evaluated
        )
        return {"auroc": auroc}
