"""Per-class Dice against MONAI's DiceMetric and hand-computed cases, empty-label convention included."""

from __future__ import annotations

import math

import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from fm3d.metrics.segmentation import dice_per_class, mean_dice


def test_hand_case_and_empty_convention() -> None:
    # One volume of 6 voxels, classes 0..3.
    target = torch.tensor([[0, 1, 1, 2, 2, 0]])
    pred = torch.tensor([[0, 1, 2, 2, 2, 3]])
    dice = dice_per_class(pred, target, num_classes=4)
    # class 1: |P∩G| = 1, |P| = 1, |G| = 2 -> 2/3; class 2: 2, 3, 2 -> 4/5;
    # class 3: absent from the target but predicted -> 0.
    assert torch.allclose(dice[0], torch.tensor([2 / 3, 4 / 5, 0.0], dtype=torch.float64))
    both_empty = dice_per_class(torch.zeros(1, 6), torch.zeros(1, 6), num_classes=3)
    assert torch.isnan(both_empty).all()
    with_bg = dice_per_class(pred, target, num_classes=4, include_background=True)
    assert with_bg.shape == (1, 4) and math.isclose(float(with_bg[0, 0]), 2 / 3)


def test_matches_monai_dice_metric_on_random_volumes() -> None:
    torch.manual_seed(0)
    k = 4
    target = torch.randint(0, k, (3, 1, 6, 7, 8))
    pred = torch.randint(0, k, (3, 1, 6, 7, 8))
    target[2][target[2] == 3] = 0  # class 3 absent from volume 2's ground truth ...
    pred[2][pred[2] == 3] = 0  # ... and from its prediction: NaN under both conventions
    ours = dice_per_class(pred, target, num_classes=k)
    metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True)
    reference = metric(one_hot(pred, k), one_hot(target, k))
    assert torch.allclose(ours, reference.double(), equal_nan=True, atol=1e-6)
    assert torch.isnan(ours[2, 2])


def test_false_positive_on_empty_target_scores_zero_like_monai_not_ignoring_empty() -> None:
    target = torch.zeros(1, 1, 4, 4, 4, dtype=torch.long)
    target[..., :2, :, :] = 1
    pred = target.clone()
    pred[..., 3, 3, 3] = 2  # class 2 predicted, absent from the ground truth
    ours = dice_per_class(pred, target, num_classes=3)
    reference = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(
        one_hot(pred, 3), one_hot(target, 3)
    )
    assert torch.allclose(ours, reference.double())
    assert float(ours[0, 1]) == 0.0


def test_mean_dice_ignores_nan() -> None:
    per_volume = torch.tensor([[1.0, float("nan")], [0.5, float("nan")]])
    per_class, overall = mean_dice(per_volume)
    assert math.isclose(float(per_class[0]), 0.75) and torch.isnan(per_class[1])
    assert math.isclose(overall, 0.75)
