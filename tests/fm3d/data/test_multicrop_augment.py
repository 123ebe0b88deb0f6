"""Multi-crop augmentation: the bias field against TorchIO's, reproducible draws, blur per crop and in mm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchio as tio

from fm3d.data.augment import AugmentConfig
from fm3d.data.multicrop_augment import CropAugmenter, MultiCropAugment, bias_field

NOTHING = AugmentConfig(flip_prob=0.0, rot90_prob=0.0, shift_prob=0.0, scale_prob=0.0)
OFF = {
    "affine_prob": 0.0,
    "bias_field_prob": 0.0,
    "gamma_prob": 0.0,
    "blur_probs": (0.0, 0.0, 0.0),
    "noise_prob": 0.0,
}


@pytest.mark.parametrize("shape", [(6, 5, 7), (4, 4, 4), (1, 3, 8)])
def test_bias_field_is_torchios(shape):
    rng = np.random.default_rng(0)
    for _ in range(3):
        coefficients = rng.uniform(-0.5, 0.5, 20).tolist()
        ones = tio.ScalarImage(tensor=torch.ones(1, *shape), affine=np.eye(4))
        reference = tio.BiasField(coefficients=coefficients, order=3)(ones).data[0]
        torch.testing.assert_close(bias_field(shape, coefficients), reference, rtol=1e-5, atol=1e-6)


def _stack(seed: int = 0, n: int = 3, size: int = 12) -> torch.Tensor:
    return torch.rand(n, 1, size, size, size, generator=torch.Generator().manual_seed(seed))


def test_draws_come_from_the_samples_generator_only():
    everything = MultiCropAugment(
        affine_prob=1.0, bias_field_prob=1.0, gamma_prob=1.0, blur_probs=(1.0, 1.0, 1.0), noise_prob=1.0
    )
    augment = CropAugmenter(everything)
    spacings = [(1.5, 1.5, 1.5)] * 3
    results = []
    for torch_seed in (1, 2):
        torch.manual_seed(torch_seed)
        state = torch.get_rng_state()
        results.append(augment(_stack(), spacings, [1.0] * 3, np.random.default_rng(5), AugmentConfig()))
        # TorchIO ran under a forked generator: the global stream is where it was.
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(results[0], results[1])
    other = augment(_stack(), spacings, [1.0] * 3, np.random.default_rng(6), AugmentConfig())
    assert not torch.equal(results[0], other)
    assert not torch.equal(results[0], _stack())


def test_blur_probability_is_per_crop():
    augment = CropAugmenter(MultiCropAugment(**OFF))
    out = augment(_stack(), [(1.0, 1.0, 1.0)] * 3, [1.0, 0.0, 0.0], np.random.default_rng(0), NOTHING)
    original = _stack()
    assert not torch.allclose(out[0], original[0]) and out[0].std() < original[0].std()
    assert torch.equal(out[1:], original[1:])


def test_blur_std_is_in_mm():
    # A 2 mm Gaussian spreads an impulse over 2 voxels of 1 mm but 1 voxel of 2 mm (std).
    augment = CropAugmenter(MultiCropAugment(**{**OFF, "blur_std_mm": (2.0, 2.0)}))
    for spacing, std_voxels in ((1.0, 2.0), (2.0, 1.0)):
        impulse = torch.zeros(1, 1, 21, 21, 21)
        impulse[0, 0, 10, 10, 10] = 1.0
        out = augment(impulse, [(spacing,) * 3], [1.0], np.random.default_rng(0), NOTHING)[0, 0]
        profile = out.sum(dim=(1, 2))
        variance = (profile * (torch.arange(21) - 10.0) ** 2).sum() / profile.sum()
        assert variance.sqrt().item() == pytest.approx(std_voxels, rel=0.05)


def test_settings_from_yaml_become_tuples():
    settings = MultiCropAugment.of({"blur_probs": [1, 0.2, 0.4], "noise_std": [0, 0.05]})
    assert settings.blur_probs == (1.0, 0.2, 0.4) and settings.noise_std == (0.0, 0.05)
    assert MultiCropAugment.of(None) == MultiCropAugment() and MultiCropAugment.of(settings) is settings
