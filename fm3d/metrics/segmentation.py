"""Per-class Dice for label maps, with the empty-label convention stated.

Convention (nnU-Net's): for each class, Dice = 2|P ∩ G| / (|P| + |G|) over the voxels of one
volume. When the class is absent from both the prediction and the ground truth the score is
NaN — there is nothing to score — and NaNs are left out of every mean. When the class is
absent from the ground truth but predicted, Dice is 0 (false positives are penalised).
MONAI's `DiceMetric(ignore_empty=True)` instead returns NaN whenever the ground truth is
empty, hiding false positives; `ignore_empty=False` returns 1 for both-empty. The two agree
with this convention on every class present in the ground truth.
"""

from __future__ import annotations

import numpy as np
import torch


def dice_per_class(
    prediction: torch.Tensor | np.ndarray,
    target: torch.Tensor | np.ndarray,
    num_classes: int,
    include_background: bool = False,
) -> torch.Tensor:
    """Dice of each class for each volume of a batch of integer label maps.

    Args:
        prediction, target: integer label maps of the same shape, [B, ...] (a leading channel
            of size 1, as in [B, 1, D, H, W], is allowed). Values are class indices 0..K-1.
        num_classes: K, the number of classes including background (0).
        include_background: keep class 0 in the result.

    Returns:
        float64 [B, K] (or [B, K-1] without background): Dice per volume and class, NaN where the
        class is absent from both prediction and target.
    """
    pred = torch.as_tensor(prediction).long()
    true = torch.as_tensor(target).long()
    if pred.shape != true.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(true.shape)} differ in shape")
    pred, true = pred.reshape(pred.shape[0], -1), true.reshape(true.shape[0], -1)
    first = 0 if include_background else 1
    scores = []
    for k in range(first, num_classes):
        p, g = pred == k, true == k
        intersection = (p & g).sum(1).double()
        total = p.sum(1).double() + g.sum(1).double()
        scores.append(torch.where(total > 0, 2 * intersection / total.clamp_min(1), torch.nan))
    return torch.stack(scores, dim=1)


def mean_dice(per_volume: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-class mean over volumes (NaNs ignored) and the mean over classes scored at least once."""
    per_class = torch.nanmean(per_volume.double(), dim=0)
    scored = per_class[~torch.isnan(per_class)]
    return per_class, float(scored.mean()) if scored.numel() else float("nan")
