"""The downstream image input: HU clipped to the encoder's window and scaled to its intensity range."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import ScaleIntensityRange

from downstream.tasks.classification import ClassificationTask

TINY = {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8, "image_size": (16, 32, 32)}


def test_prepare_image_follows_the_encoder_config() -> None:
    hu = torch.linspace(-1500, 1500, 16 * 32 * 32).reshape(1, 1, 16, 32, 32)
    for window, intensity_range in (((-1000.0, 1000.0), (0.0, 1.0)), ((-175.0, 250.0), (-1.0, 1.0))):
        overrides = {**TINY, "hu_window": window, "intensity_range": intensity_range}
        task = ClassificationTask("vit3d_tiny", ["a"], encoder_overrides=overrides)
        reference = ScaleIntensityRange(
            a_min=window[0], a_max=window[1], b_min=intensity_range[0], b_max=intensity_range[1], clip=True
        )(hu.numpy())
        torch.testing.assert_close(
            task.prepare_image(hu), torch.as_tensor(np.asarray(reference)), atol=1e-6, rtol=0
        )
