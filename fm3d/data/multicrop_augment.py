"""Random augmentation of multi-crop stacks: TorchIO's affine, gamma, blur and noise, a torch bias field.

The multi-crop view (`fm3d.data.multicrop`) augments each crop on its own, in this order: a
bias field, TorchIO's RandomAffine, RandomGamma, RandomBlur and RandomNoise (each only when the
crop's draw selects it), then fm3d's flips, quarter turns and intensity shift/scale
(`fm3d.data.augment`, the data module's settings). Blur keeps DINO's asymmetry as 3DINO's 3D
DINOv2 (Xu et al., `DataAugmentationDINO3d`) carries it over: the first global crop is always
blurred, the other global crops with p = 0.1, the local crops with p = 0.5; every other
transform treats all crops alike (no 3D precedent for more; DINO's solarisation means nothing
for CT).

Cost on the hot path (docs/datasets.md, "Multi-crop and MAE views"): TorchIO's RandomBiasField
evaluates its polynomial in float64 numpy, ~150 ms for one 96^3 crop with one thread, more than
the ten crops of a sample cost to cut; `bias_field` is the same field (TorchIO's `BiasField`,
tested against it) from separable per-axis powers, ~1 ms. The affine's resampling is
intrinsically the dearest remaining transform (~21 ms per 96^3 crop; `grid_sample` costs the
same), so its default probability is low.

Reproducibility: whether a transform runs, and the bias field's coefficients, are drawn from
the sample's numpy Generator; TorchIO draws its parameters from torch's global generator, so
each crop's TorchIO calls run under `torch.random.fork_rng` seeded from that Generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torchio as tio
from torch.utils.data import get_worker_info

from fm3d.data.augment import AugmentConfig, AugmentParams, apply_augmentation
from fm3d.data.views import ViewError

_SETTING = "data.views.multicrop.augment"
BIAS_FIELD_ORDER = 3  # TorchIO's default order


@dataclass(frozen=True)
class MultiCropAugment:
    """Probability and range of each random transform of a multi-crop crop.

    Intensities are in the data module's `intensity_range` units ([0, 1] by default). From YAML:
    `data.views.multicrop: {augment: {noise_prob: 0.1, blur_probs: [1.0, 0.1, 0.5]}}`.

    affine_prob, affine_scales, affine_degrees: TorchIO RandomAffine (a scale per axis drawn in
        the range, a rotation per axis in +-degrees; padding reads the crop's minimum).
    bias_field_prob, bias_field_coefficients: a smooth multiplicative field exp(polynomial of
        order 3), coefficients uniform in +-coefficients (TorchIO's RandomBiasField).
    gamma_prob, log_gamma: TorchIO RandomGamma, x ** exp(U(log_gamma)).
    blur_probs: TorchIO RandomBlur's probability for the first global crop, the other global
        crops and the local crops (DINO's 1.0 / 0.1 / 0.5); blur_std_mm: its Gaussian std in mm.
    noise_prob, noise_std: TorchIO RandomNoise, additive Gaussian with std drawn in the range.
    """

    affine_prob: float = 0.1
    affine_scales: tuple[float, float] = (0.9, 1.1)
    affine_degrees: float = 10.0
    bias_field_prob: float = 0.1
    bias_field_coefficients: float = 0.2
    gamma_prob: float = 0.3
    log_gamma: tuple[float, float] = (-0.3, 0.3)
    blur_probs: tuple[float, float, float] = (1.0, 0.1, 0.5)
    blur_std_mm: tuple[float, float] = (0.1, 2.0)
    noise_prob: float = 0.2
    noise_std: tuple[float, float] = (0.0, 0.03)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # YAML gives lists
            value = getattr(self, f.name)
            if isinstance(value, Sequence):
                object.__setattr__(self, f.name, tuple(float(v) for v in value))
        if len(self.blur_probs) != 3:
            raise ViewError(
                f"{_SETTING}.blur_probs must be three probabilities (first global crop, other global "
                f"crops, local crops), got {self.blur_probs}"
            )
        for name in ("affine_prob", "bias_field_prob", "gamma_prob", "noise_prob", "blur_probs"):
            value = getattr(self, name)
            if not all(0.0 <= p <= 1.0 for p in (value if isinstance(value, tuple) else (value,))):
                raise ViewError(f"{_SETTING}.{name} must be probabilities in [0, 1], got {value}")
        _range(self.log_gamma, "log_gamma")
        for name in ("affine_scales", "blur_std_mm", "noise_std"):
            low, _ = _range(getattr(self, name), name)
            if low < 0 or (name == "affine_scales" and low == 0):
                raise ViewError(
                    f"{_SETTING}.{name} must be a range of positive values, got {getattr(self, name)}"
                )
        if self.affine_degrees < 0 or self.bias_field_coefficients < 0:
            raise ViewError(
                f"{_SETTING}.affine_degrees and bias_field_coefficients must be >= 0, got "
                f"{self.affine_degrees} and {self.bias_field_coefficients}"
            )

    @classmethod
    def of(cls, value: MultiCropAugment | Mapping[str, Any] | None) -> MultiCropAugment:
        """The settings from a config mapping (None: the defaults)."""
        if isinstance(value, MultiCropAugment):
            return value
        return cls(**dict(value or {}))


def bias_field(
    shape: Sequence[int], coefficients: Sequence[float], order: int = BIAS_FIELD_ORDER
) -> torch.Tensor:
    """TorchIO's `BiasField` as a float32 tensor of `shape` (D, H, W): exp of a polynomial in the axes.

    Each axis runs over voxel centres scaled to [-1, 1]; `coefficients` are in TorchIO's order
    (powers of axis 0, then 1, then 2, total degree <= order). Built from per-axis powers, so
    it costs one pass over the volume instead of one per term.
    """
    powers = []
    for n in shape:
        centres = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        axis = centres / max(float(centres.max()), 1.0) if n > 1 else centres
        powers.append(torch.stack([axis**p for p in range(order + 1)]))  # [order + 1, n]
    table = torch.zeros((order + 1,) * 3, dtype=torch.float64)
    terms = [
        (a, b, c) for a in range(order + 1) for b in range(order + 1 - a) for c in range(order + 1 - a - b)
    ]
    if len(coefficients) != len(terms):
        raise ViewError(
            f"a bias field of order {order} has {len(terms)} coefficients, got {len(coefficients)}"
        )
    for (a, b, c), coefficient in zip(terms, coefficients, strict=True):
        table[a, b, c] = coefficient
    field = torch.einsum("abc,ai,bj,ck->ijk", table, *powers)  # [D, H, W]
    return field.exp_().float()


class CropAugmenter:
    """Augments a stack of crops in place (see the module docstring); built once per view."""

    def __init__(self, settings: MultiCropAugment) -> None:
        self.settings = s = settings
        # p=1: whether a transform runs is drawn from the sample's generator, its parameters
        # from torch's generator seeded from it. copy=False: each crop is already its own tensor.
        self._chain = (
            tio.RandomAffine(scales=s.affine_scales, degrees=s.affine_degrees, copy=False),
            tio.RandomGamma(log_gamma=s.log_gamma, copy=False),
            tio.RandomBlur(std=s.blur_std_mm, copy=False),
            tio.RandomNoise(std=s.noise_std, copy=False),
        )
        self._num_terms = (BIAS_FIELD_ORDER + 1) * (BIAS_FIELD_ORDER + 2) * (BIAS_FIELD_ORDER + 3) // 6

    def __call__(
        self,
        stack: torch.Tensor,
        spacings: Sequence[tuple[float, float, float]],
        blur_probs: Sequence[float],
        rng: np.random.Generator,
        base: AugmentConfig,
    ) -> torch.Tensor:
        """Augment `stack` [N, 1, D, H, W] in place; crop c has voxel spacing spacings[c] (mm).

        blur_probs: RandomBlur's probability per crop. base: fm3d's flips, turns and intensity
        shift/scale. Returns `stack`.
        """
        s, n = self.settings, stack.shape[0]
        params = AugmentParams.draw(n, rng, base)
        if params.rot90_k.any() and stack.shape[-1] != stack.shape[-2]:
            raise ViewError(
                f"data.views.multicrop: quarter turns need square H-W crops, these are "
                f"{tuple(stack.shape[-3:])}; set data.rot90_prob: 0 or give crops with H == W"
            )
        probs = np.tile([s.bias_field_prob, s.affine_prob, s.gamma_prob, 0.0, s.noise_prob], (n, 1))
        probs[:, 3] = blur_probs
        chosen = rng.random((n, 5)) < probs  # [N, 5]: bias field, then the TorchIO chain
        coefficients = rng.uniform(
            -s.bias_field_coefficients, s.bias_field_coefficients, (n, self._num_terms)
        )
        seeds = rng.integers(0, 2**62, size=n)
        for c in range(n):
            crop = stack[c]  # [1, D, H, W]
            if chosen[c, 0]:
                crop.mul_(bias_field(crop.shape[1:], coefficients[c]))
            chain = [t for t, on in zip(self._chain, chosen[c, 1:], strict=True) if on]
            if chain:
                if get_worker_info() is not None:
                    # TorchIO resamples with SimpleITK, which runs a thread per core by default;
                    # a DataLoader worker gets torch's one thread, so N workers do not start N x cores.
                    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(torch.get_num_threads())
                image = tio.ScalarImage(tensor=crop, affine=np.diag([*spacings[c], 1.0]))
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(int(seeds[c]))
                    for transform in chain:
                        image = transform(image)
                crop.copy_(image.data)
        return apply_augmentation(stack, params)


def _range(values: tuple[float, ...], name: str) -> tuple[float, float]:
    if len(values) != 2 or values[0] > values[1]:
        raise ViewError(f"{_SETTING}.{name} must be a range (min, max) with min <= max, got {values}")
    return values[0], values[1]
