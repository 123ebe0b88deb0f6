"""`fm3d.preprocessing(encoder)`: what `fm3d prepare` + the loaders give, and MONAI's chain for VoCo."""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch
from monai.networks.nets import SwinUNETR
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    LoadImage,
    Orientation,
    ResizeWithPadOrCrop,
    ScaleIntensityRange,
    Spacing,
)

import fm3d
from fm3d.data.datasets import CTDataset, SampleSpec
from fm3d.data.prepare import main as prepare_main
from fm3d.data.views import build_views
from fm3d.spec import InputSpec, InputSpecError

VOCO_WINDOW = (-175.0, 250.0)


def _write_ct(path: Path, spacing_mm: tuple[float, float, float], hu: np.ndarray) -> Path:
    """A NIfTI in a non-RAS voxel order: axis 0 runs P (-y), axis 1 L (-x), axis 2 S (+z)."""
    affine = np.array(
        [
            [0, -spacing_mm[1], 0, 10.0],
            [-spacing_mm[0], 0, 0, 20.0],
            [0, 0, spacing_mm[2], -30.0],
            [0, 0, 0, 1],
        ]
    )
    nib.save(nib.Nifti1Image(hu, affine), path)
    return path


def _wavy_hu(shape: tuple[int, int, int]) -> np.ndarray:
    """Whole HU from -1200 to 1400: beyond every window tested, so clipping matters."""
    grid = np.stack(np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij"))
    hu = -1200 + 2600 * (0.5 + 0.5 * np.sin(3 * grid[0]) * np.cos(2 * grid[1]) + 0.3 * grid[2] - 0.15)
    return np.rint(np.clip(hu, -1200, 1400)).astype(np.int16)


@pytest.mark.parametrize(
    ("spacing_mm", "hu_window", "intensity_range", "image_size"),
    [
        ((3.0, 1.5, 1.5), (-1000.0, 1000.0), (0.0, 1.0), (8, 16, 16)),  # crop D, pad H and W
        ((2.0, 2.0, 2.0), (-500.0, 800.0), (-1.0, 1.0), (16, 8, 8)),
    ],
)
def test_fm3d_encoder_input_equals_prepare_and_the_evaluation_view(
    tmp_path, spacing_mm, hu_window, intensity_range, image_size
):
    ct = _write_ct(tmp_path / "ct.nii.gz", (0.9, 0.9, 2.5), _wavy_hu((20, 24, 14)))
    pl.DataFrame({"study_id": ["s1"], "image_path": [ct.name]}).write_csv(tmp_path / "manifest.csv")
    cache = tmp_path / "cache"
    argv = ["--manifest", str(tmp_path / "manifest.csv"), "--out", str(cache), "--no-progress"]
    argv += ["--spacing", *map(str, spacing_mm), "--hu-window", *map(str, hu_window)]
    assert prepare_main(argv) == 0
    views = build_views({"image": {"size": image_size}})
    sample_spec = SampleSpec(views=views, hu_window=hu_window, intensity_range=intensity_range, augment=None)
    view = CTDataset(cache, spec=sample_spec, train=False)[0]["image"]  # [1, D, H, W], centred

    encoder = fm3d.create_encoder(
        "vit3d_tiny", depth=1, patch_size=8, image_size=image_size, target_spacing_mm=spacing_mm,
        hu_window=hu_window, intensity_range=intensity_range,
    )  # fmt: skip
    x = fm3d.preprocessing(encoder)(fm3d.read_volume(ct))

    assert x.shape == (1, 1, *image_size) and x.dtype == torch.float32
    torch.testing.assert_close(x[0], view, rtol=0, atol=0)
    assert encoder(x).tokens.shape == (1, np.prod([s // 8 for s in image_size]), 192)


def _voco_checkpoint(path: Path) -> SwinUNETR:
    """A small SwinUNETR-v2 saved as VoCo's training script does (under "state_dict", DDP prefix)."""
    torch.manual_seed(0)
    net = SwinUNETR(
        in_channels=1,
        out_channels=2,
        feature_size=12,
        depths=(1, 1, 1, 1),
        num_heads=(1, 2, 2, 4),
        window_size=4,
    ).eval()
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    return net


def _monai_voco(image_size=None) -> Compose:
    """VoCo's own preprocessing with MONAI (its Spacingd 1.5 mm, ScaleIntensityRanged -175..250 -> 0..1)."""
    chain = [
        LoadImage(image_only=True),
        EnsureChannelFirst(),
        Orientation("RAS"),
        Spacing((1.5, 1.5, 1.5), mode="bilinear"),
        ScaleIntensityRange(*VOCO_WINDOW, 0.0, 1.0, clip=True),
    ]
    return Compose(chain + ([ResizeWithPadOrCrop(image_size)] if image_size else []))


def test_voco_encoder_input_equals_monai_chain_and_feeds_the_same_features(tmp_path):
    # At VoCo's spacing already, nothing is interpolated: orientation, axis order, window, scaling
    # and the centre pad/crop must agree to float rounding. (Crop and pad offsets agree with
    # MONAI's when size - target is even per axis, as here; for odd, MONAI's crop sits one voxel later.)
    ct = _write_ct(tmp_path / "ct.nii.gz", (1.5, 1.5, 1.5), _wavy_hu((40, 36, 18)))
    net = _voco_checkpoint(tmp_path / "voco.pt")
    encoder = fm3d.load_encoder(tmp_path / "voco.pt").eval()
    assert encoder.config.input_spec == InputSpec(
        (1.5, 1.5, 1.5), VOCO_WINDOW, (0.0, 1.0), "xyz", (96, 96, 96)
    )

    x = fm3d.preprocessing(encoder)(fm3d.read_volume(ct))
    reference = torch.as_tensor(np.asarray(_monai_voco((96, 96, 96))(str(ct))))[None]  # [1, 1, x, y, z]

    assert x.shape == (1, 1, 96, 96, 96)
    torch.testing.assert_close(x, reference.float(), rtol=0, atol=1e-6)
    with torch.no_grad():
        bottleneck = net.encoder10(net.swinViT(reference.float(), net.normalize)[4])
        tokens = encoder(x).tokens
    torch.testing.assert_close(tokens, bottleneck.flatten(2).transpose(1, 2), rtol=0, atol=1e-4)


def test_voco_resampling_differs_from_monai_only_by_where_the_grid_sits(tmp_path):
    """Resampled, both interpolate the same image; the grids differ by design (stated in docs/encoders.md).

    fm3d keeps the field of view (round(n * s / t) voxels, centres half-voxel aligned, as
    nnU-Net and `fm3d prepare`); MONAI's Spacing keeps the first voxel's centre ((n - 1) * s / t + 1
    voxels). On an in-window linear ramp, trilinear interpolation is exact, so each output must
    equal the ramp at its own grid's points: MONAI's from its output affine, fm3d's by hand.
    """
    spacing, shape = (0.75, 0.75, 3.0), (40, 36, 12)  # file axes: -y, -x, +z
    index = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij"))
    world = {
        "x": 10.0 - spacing[1] * index[1],
        "y": 20.0 - spacing[0] * index[0],
        "z": -30.0 + 3.0 * index[2],
    }
    slope = {"x": 2.0, "y": -1.5, "z": 3.0}  # HU per mm; the ramp stays inside VoCo's window

    def ramp(x, y, z):
        return 40.0 + slope["x"] * (x - 5) + slope["y"] * (y - 0) + slope["z"] * (z + 15)

    hu = ramp(world["x"], world["y"], world["z"])
    assert VOCO_WINDOW[0] < hu.min() and hu.max() < VOCO_WINDOW[1]
    ct = _write_ct(tmp_path / "ct.nii.gz", spacing, hu.astype(np.float32))

    def scaled(hu_values):
        return (hu_values - VOCO_WINDOW[0]) / (VOCO_WINDOW[1] - VOCO_WINDOW[0])

    reference = _monai_voco()(str(ct))  # MetaTensor [1, x, y, z] with its affine
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in reference.shape[1:]], indexing="ij"), -1)
    points = ijk @ np.asarray(reference.affine)[:3, :3].T + np.asarray(reference.affine)[:3, 3]
    np.testing.assert_allclose(np.asarray(reference[0]), scaled(ramp(*np.moveaxis(points, -1, 0))), atol=1e-5)

    spec = InputSpec((1.5, 1.5, 1.5), VOCO_WINDOW, (0.0, 1.0), "xyz", None)
    x = fm3d.preprocessing(spec)(fm3d.read_volume(ct))[0, 0].numpy()  # [x, y, z], RAS
    # RAS extents of the file: x runs over 36 voxels of 0.75 mm (lowest centre 10 - 0.75 * 35), y
    # over 40 (lowest 20 - 0.75 * 39), z over 12 of 3 mm (lowest -30). Each keeps its field of view.
    axes = []
    for n, s, low_centre in ((36, 0.75, 10.0 - 0.75 * 35), (40, 0.75, 20.0 - 0.75 * 39), (12, 3.0, -30.0)):
        m = round(n * s / 1.5)
        source_index = (np.arange(m) + 0.5) * n / m - 0.5
        axes.append(low_centre + s * source_index)
    assert x.shape == tuple(len(a) for a in axes) == (18, 20, 24)
    assert tuple(reference.shape[1:]) == (18, 20, 23)  # MONAI: one voxel fewer along the upsampled z
    px, py, pz = np.meshgrid(*axes, indexing="ij")
    inner = (slice(1, -1),) * 3  # border voxels of an upsampled axis clamp (align_corners=False)
    # fm3d rounds to whole HU, as its int16 cache holds them: 0.5 HU is 0.5 / 425 in VoCo's scale.
    np.testing.assert_allclose(x[inner], scaled(ramp(px, py, pz))[inner], atol=0.5 / 425 + 1e-6)


def test_an_input_spec_preprocesses_too_and_anything_else_is_refused():
    volume = fm3d.read_volume  # not an encoder
    with pytest.raises(InputSpecError, match="has no fm3d encoder config"):
        fm3d.preprocessing(volume)
    spec = InputSpec(image_size=(4, 4, 4))
    assert fm3d.preprocessing(spec).spec is spec


def test_unpublished_peer_fields_are_named_when_preprocessing(caplog):
    encoder = fm3d.create_encoder(
        "vit3d_tiny", depth=1, source={"format": "monai_vit", "spec_assumed": ["hu_window"]}
    )
    with caplog.at_level(logging.WARNING, logger="fm3d.encoder_input"):
        fm3d.preprocessing(encoder)
    assert "do not state hu_window" in caplog.text and "input_spec.replace" in caplog.text
