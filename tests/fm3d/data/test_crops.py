"""VoCo crop geometry against hand-computed overlaps and VoCo's own label loop."""

from __future__ import annotations

import numpy as np
import pytest

from fm3d.data.crops import VOCO_V1, VOCO_V2, VoCoGeometry, voco_geometry


def _voco_position_label(center_x: int, center_y: int, roi: int, num_crops: int) -> np.ndarray:
    """VoCo's `get_position_label` loop (Large-Scale-Medical voco_trans.py), with the centre given."""
    half = roi // 2
    x_min, x_max = center_x - half, center_x + half
    y_min, y_max = center_y - half, center_y + half
    labels = []
    for i in range(num_crops):
        for j in range(num_crops):
            dx = min((i + 1) * roi, x_max) - max(i * roi, x_min)
            dy = min((j + 1) * roi, y_max) - max(j * roi, y_min)
            labels.append(0 if dx <= 0 or dy <= 0 else dx * dy / (roi * roi))
    return np.asarray(labels)


def test_presets_match_voco_regions():
    assert VOCO_V2.region_size == (64, 192, 192)
    assert VOCO_V2.num_bases == 9 and VOCO_V2.crop_shape == (64, 64, 64)
    assert VOCO_V1.region_size == (96, 384, 384)
    assert VOCO_V1.num_bases == 16 and VOCO_V1.crop_shape == (64, 64, 64)
    assert VOCO_V1.num_random_crops == VOCO_V2.num_random_crops == 2
    assert voco_geometry("v2") is VOCO_V2
    with pytest.raises(ValueError, match="unknown VoCo geometry"):
        voco_geometry("v3")


def test_base_starts_are_x_major():
    starts = VOCO_V2.base_starts()  # (h0, w0)
    assert starts.shape == (9, 2)
    # k = i * 3 + j, i along x (W), j along y (H)
    assert starts[1].tolist() == [64, 0]
    assert starts[3].tolist() == [0, 64]
    assert starts[8].tolist() == [128, 128]


def test_hand_computed_overlaps_v2():
    centres = np.array([[32, 32], [64, 96], [50, 100]])  # (h, w)
    labels = VOCO_V2.overlap_labels(centres)
    expected = np.zeros((3, 9))
    expected[0, 0] = 1.0  # exactly on base (x 0, y 0)
    expected[1, 3] = expected[1, 4] = 0.5  # w in [64, 128) -> i=1; h in [32, 96) splits j=0/1
    # h in [18, 82): 46 voxels on j=0, 18 on j=1; w in [68, 132): 60 on i=1, 4 on i=2
    expected[2, 3] = 46 * 60 / 4096
    expected[2, 4] = 18 * 60 / 4096
    expected[2, 6] = 46 * 4 / 4096
    expected[2, 7] = 18 * 4 / 4096
    np.testing.assert_allclose(labels, expected)


@pytest.mark.parametrize("geometry", [VOCO_V1, VOCO_V2])
def test_random_crops_match_voco_loop_and_sum_to_one(geometry: VoCoGeometry):
    rng = np.random.default_rng(3)
    half, side = geometry.base_size // 2, geometry.grid * geometry.base_size
    for _ in range(50):
        centres = geometry.draw_random_centres(rng)
        assert centres.shape == (geometry.num_random_crops, 2)
        assert (centres >= half).all() and (centres < side - half).all()
        labels = geometry.overlap_labels(centres)
        assert labels.shape == (geometry.num_random_crops, geometry.num_bases)
        np.testing.assert_allclose(labels.sum(axis=1), 1.0)
        for (h, w), row in zip(centres, labels, strict=True):
            reference = _voco_position_label(int(w), int(h), geometry.base_size, geometry.grid)
            np.testing.assert_allclose(row, reference)
        starts = geometry.random_starts(centres)
        assert (starts >= 0).all() and (starts + geometry.base_size <= side).all()


def test_invalid_geometry_is_refused():
    with pytest.raises(ValueError, match=">= 1"):
        VoCoGeometry(name="bad", grid=0, base_size=32, output_size=32)
