"""The preprocessing an encoder's weights expect: a volume read from disk -> the encoder's input.

`preprocessing(encoder)` reads the encoder's input spec (`encoder.config.input_spec`) and
returns a `Preprocess`, so that `encoder(preprocess(fm3d.read_volume(path)))` feeds fm3d's and
every peer's weights what they were trained on. It does what `fm3d prepare` and the data
loaders' centred evaluation view do, in their order and with their functions:
  1. reorient to RAS [D, H, W], clip to `hu_window` and resample to `target_spacing_mm`
     keeping the field of view (`fm3d.data.preprocess`; clipping before interpolating, as
     prepare does), rounded to whole HU as the prepared int16 cache holds them;
  2. put the axes in `axis_order` ("xyz": MONAI's (x, y, z) array of the RAS volume);
  3. centre-crop or pad to `image_size` (in those axes) when set, padding with the window's
     low end, and scale the window linearly to `intensity_range` (`fm3d.data.datasets`);
giving a float tensor [1, 1, *spatial].

A function of the encoder rather than a `load_encoder(..., with_preprocessing=True)` flag:
`load_encoder` keeps one return type (a plain nn.Module), and an encoder from
`create_encoder`, a training checkpoint or a peer's file gets its preprocessing the same way,
as timm's `resolve_data_config(model=...)` + `create_transform` do. Pass an `InputSpec` instead
of an encoder to preprocess differently (e.g. a peer whose spacing was not published).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from fm3d.data.io import spacing_of
from fm3d.data.limits import ReadLimits, check_array_bytes
from fm3d.data.preprocess import resample, resampled_shape, to_canonical
from fm3d.data.regions import read_region, region_start, scale_window
from fm3d.data.volume import Volume
from fm3d.spec import InputSpec, InputSpecError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preprocess:
    """A read `Volume` (HU, any orientation and spacing) -> float tensor [1, 1, *spatial] per `spec`.

    limits: bounds the resampled grid before it is allocated, as `fm3d prepare` does.
    """

    spec: InputSpec
    limits: ReadLimits = field(default_factory=ReadLimits)

    def __call__(self, volume: Volume) -> torch.Tensor:
        """The encoder input for `volume` (see the module docstring for the steps)."""
        spec = self.spec
        canonical, affine, _ = to_canonical(volume.array, volume.affine)  # [D, H, W] = (z, y, x)
        shape = resampled_shape(canonical.shape, spacing_of(affine), spec.target_spacing_mm)
        check_array_bytes(
            volume.meta.get("source", "volume"),
            shape,
            4,  # the float32 interpolation output, the largest array resampling allocates
            self.limits,
            f"a resampled grid at {list(spec.target_spacing_mm)} mm",
        )
        window = (int(spec.hu_window[0]), int(spec.hu_window[1]))
        clipped = np.clip(canonical.astype(np.float32), *window)
        hu = np.rint(resample(clipped, shape, is_label=False)).astype(np.int16)
        if spec.axis_order == "xyz":
            hu = hu.transpose(2, 1, 0)
        size = spec.image_size or hu.shape
        shifted = read_region(hu, region_start(hu.shape, size, None), size, window)
        return scale_window(torch.from_numpy(shifted), window, spec.intensity_range)[None, None]


def preprocessing(encoder: nn.Module | InputSpec) -> Preprocess:
    """The preprocessing `encoder` expects (or that an `InputSpec` describes), as a callable on Volumes.

    Example: `encoder(fm3d.preprocessing(encoder)(fm3d.read_volume("ct.nii.gz")))`.
    """
    if isinstance(encoder, InputSpec):
        return Preprocess(encoder)
    config = getattr(encoder, "config", None)
    if not hasattr(config, "input_spec"):
        raise InputSpecError(
            f"a {type(encoder).__name__} has no fm3d encoder config to read an input spec from; pass an "
            "encoder from fm3d.create_encoder / fm3d.load_encoder, or an fm3d.InputSpec."
        )
    assumed = config.source.get("spec_assumed")
    if assumed:
        logger.warning(
            "%s: its weights (%s) do not state %s; preprocessing uses fm3d's defaults for them. Pass "
            "fm3d.preprocessing(encoder.config.input_spec.replace(...)) with the values the weights were "
            "trained with.",
            config.name,
            config.source.get("format", "peer"),
            ", ".join(assumed),
        )
    return Preprocess(config.input_spec)
