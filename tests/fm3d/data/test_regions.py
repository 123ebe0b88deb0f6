"""Regions of a volume: starts (random, centred, jittered), windowed reads and padded crops, by hand."""

from __future__ import annotations

import numpy as np
import torch
from monai.transforms import ScaleIntensityRange, SpatialPad

from fm3d.data.regions import (
    AIR_HU,
    crop_or_pad,
    jitter_start,
    read_region,
    region_start,
    scale_window,
    study_crop,
)


class _RecordingVolume:
    """Stands for a memmap: records which slabs are read (the dataset must never read more)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array, self.shape, self.reads = array, array.shape, []

    def __getitem__(self, index):
        self.reads.append(index)
        return self.array[index]


def test_read_region_touches_only_the_slab_and_pads_with_the_floor():
    volume = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) * 20 - 1000  # -1000 .. 2580 HU
    recorder = _RecordingVolume(volume)
    out = read_region(recorder, (1, -2, 3), (2, 4, 5), hu_window=(-500, 1000))
    assert recorder.reads == [(slice(1, 3), slice(0, 2), slice(3, 6))]
    expected = np.zeros((2, 4, 5), np.int16)  # outside the volume: the window floor, shifted to 0
    expected[:, 2:4, 0:3] = np.clip(volume[1:3, 0:2, 3:6], -500, 1000) + 500
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.int16
    unit = scale_window(torch.from_numpy(out), (-500, 1000))
    torch.testing.assert_close(unit, torch.from_numpy(expected / 1500.0).float())


def test_scale_window_to_minus_one_one_matches_monai():
    hu = np.linspace(-1200, 400, 97, dtype=np.float32).reshape(1, 97)
    shifted = read_region(np.rint(hu).astype(np.int16), (0, 0), (1, 97), hu_window=(-175, 250))
    scaled = scale_window(torch.from_numpy(shifted), (-175, 250), (-1.0, 1.0))
    reference = ScaleIntensityRange(a_min=-175.0, a_max=250.0, b_min=-1.0, b_max=1.0, clip=True)(np.rint(hu))
    torch.testing.assert_close(scaled, torch.as_tensor(reference).float(), rtol=0, atol=1e-6)


def test_centred_start_crops_and_pads():
    volume = np.arange(5 * 8 * 3, dtype=np.int16).reshape(5, 8, 3)
    size = (4, 5, 6)  # crop D and H (5 -> 4, 8 -> 5), pad W (3 -> 6)
    start = region_start(volume.shape, size, None)
    assert start == [0, 1, -1]  # (5 - 4) // 2, (8 - 5) // 2, -((6 - 3) // 2)
    ours = crop_or_pad(volume, start, size, fill=-7)
    expected = np.full(size, -7, np.int16)
    expected[:, :, 1:4] = volume[0:4, 1:6, :]  # hand-computed slice
    np.testing.assert_array_equal(ours, expected)
    # Padding as MONAI's SpatialPad (symmetric, the odd voxel after).
    padded = SpatialPad((5, 8, 6), value=-7)(volume[None])[0]
    np.testing.assert_array_equal(
        crop_or_pad(volume, region_start(volume.shape, (5, 8, 6), None), (5, 8, 6), -7), padded
    )


def test_random_start_stays_inside_and_is_drawn_from_the_generator():
    shape, size = (10, 20, 6), (4, 5, 8)
    starts = [region_start(shape, size, np.random.default_rng(seed)) for seed in range(50)]
    assert all(0 <= d <= 6 and 0 <= h <= 15 and w == -1 for d, h, w in starts)
    rng = np.random.default_rng(3)
    expected = [int(rng.integers(0, 7)), int(rng.integers(0, 16)), -1]  # one draw per larger axis, in order
    assert region_start(shape, size, np.random.default_rng(3)) == expected


def test_jitter_is_bounded_and_follows_torch_seed():
    torch.manual_seed(0)
    shifts = [jitter_start((10, 10, 10), (8, 16, 3), 0.25) for _ in range(200)]
    offsets = np.array(shifts) - 10
    assert offsets[:, 0].min() == -2 and offsets[:, 0].max() == 2  # int(8 * 0.25)
    assert offsets[:, 1].min() == -4 and offsets[:, 1].max() == 4
    assert (offsets[:, 2] == 0).all()  # int(3 * 0.25) == 0
    torch.manual_seed(0)
    assert jitter_start((10, 10, 10), (8, 16, 3), 0.25) == shifts[0]


def test_crop_outside_the_volume_is_all_fill():
    volume = np.ones((3, 3, 3), np.float32)
    np.testing.assert_array_equal(crop_or_pad(volume, (5, 0, 0), (2, 2, 2), 9.0), np.full((2, 2, 2), 9.0))
    assert not read_region(volume.astype(np.int16), (0, -4, 0), (2, 2, 2), (-10, 10)).any()


def test_study_crop_is_the_centred_float_hu_crop_padded_with_air():
    image = np.arange(6 * 4 * 4, dtype=np.int16).reshape(6, 4, 4)
    crop = study_crop(image, (4, 6, 4), None)
    assert crop.shape == (1, 4, 6, 4) and crop.dtype == torch.float32
    expected = np.full((4, 6, 4), AIR_HU, np.float32)
    expected[:, 1:5, :] = image[1:5]
    np.testing.assert_array_equal(crop[0].numpy(), expected)
