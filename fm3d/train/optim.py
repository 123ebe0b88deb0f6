"""The optimizer rules pretraining and fine-tuning share: which parameters take weight decay, and
the linear-warmup + cosine learning-rate multiplier.

Weight decay pulls parameters towards zero, which is right for weight matrices and wrong for
parameters that encode a scale or an offset: norm gains and biases, position embeddings, the
cls token, CLIP's logit scale. Those take `weight_decay=0` (as in DINOv2, MAE and open_clip).
"""

from __future__ import annotations

import math

from torch import nn

from fm3d.errors import Fm3dError


class ScheduleError(Fm3dError, ValueError):
    """Warmup or total steps that no schedule can follow."""


# Parameter names (any dotted component containing one of these) that never take weight decay,
# whatever their shape: position embeddings and learned tokens are tables of values, not maps.
NO_DECAY_NAME_PARTS = (
    "pos_embed",
    "position_embedding",
    "cls_token",
    "mask_token",
    "logit_scale",
    "logit_bias",
    "relative_position_bias_table",
)


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Whether a parameter belongs to the no-weight-decay group (vectors, scalars, embeddings)."""
    return param.ndim <= 1 or any(part in name for part in NO_DECAY_NAME_PARTS)


class WarmupCosine:
    """LR multiplier for `LambdaLR`: linear warmup to 1, then a cosine down to `min_ratio`.

    A class rather than a closure so `LambdaLR.state_dict()` stores its settings in checkpoints.
    Step s (0-based) of the warmup gets (s + 1) / warmup_steps, so the first step already
    trains; after `max_steps` the multiplier stays at `min_ratio`.
    """

    def __init__(self, warmup_steps: int, max_steps: int, min_ratio: float = 0.0) -> None:
        if max_steps < 1:
            raise ScheduleError(f"max_steps must be >= 1, got {max_steps}")
        if not 0 <= warmup_steps <= max_steps:
            raise ScheduleError(f"warmup_steps must lie in [0, max_steps={max_steps}], got {warmup_steps}")
        self.warmup_steps = warmup_steps
        self.max_steps = max_steps
        self.min_ratio = min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        decay_steps = max(self.max_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
