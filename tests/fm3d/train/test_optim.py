"""The optimizer rules both applications share: the no-decay rule and the warmup-cosine multiplier."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fm3d.train.optim import ScheduleError, WarmupCosine, is_no_decay


def test_no_decay_rule_by_role_not_by_shape_alone() -> None:
    matrix, vector = nn.Parameter(torch.ones(3, 4)), nn.Parameter(torch.ones(3))
    assert not is_no_decay("blocks.0.attn.qkv.weight", matrix)
    assert is_no_decay("blocks.0.attn.qkv.bias", vector)
    # Tables of values, whatever their shape, and wherever they sit (LoRA or CLIP wrappers).
    for name in ("encoder.pos_embed", "base_model.model.cls_token", "clip.logit_scale", "mask_token"):
        assert is_no_decay(name, matrix), name


def test_warmup_cosine_hand_values() -> None:
    schedule = WarmupCosine(warmup_steps=4, max_steps=12, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    # Half-way through the 8 decay steps the cosine sits at the mean of 1 and min_ratio.
    assert schedule(8) == pytest.approx(0.55)
    assert schedule(12) == pytest.approx(0.1)
    assert schedule(50) == pytest.approx(0.1)
    assert schedule(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8)))


@pytest.mark.parametrize(("warmup", "total"), [(5, 4), (-1, 4), (0, 0)])
def test_bad_schedule_settings_raise(warmup: int, total: int) -> None:
    with pytest.raises(ScheduleError):
        WarmupCosine(warmup, total)
