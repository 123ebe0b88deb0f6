"""Canonical preprocessing against nibabel's canonical orientation, a linear-ramp geometry check,
inverse round trips, and organ HU on the real TotalSegmentator CT."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fm3d.data.errors import VolumeReadError
from fm3d.data.io import read_label, read_volume, spacing_of
from fm3d.data.preprocess import (
    PreprocessRecord,
    invert_preprocessing,
    preprocess,
    to_canonical,
)
from fm3d.data.volume import Volume
from fm3d.spec import InputSpec

LIVER, SPLEEN, AORTA = 5, 1, 52
XYZ_TO_DHW = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)


@pytest.fixture(scope="module")
def ts(shared_data: Path) -> tuple[Volume, Volume]:
    folder = shared_data / "ct" / "totalsegmentator"
    return read_volume(folder / "example_ct_sm.nii.gz"), read_label(folder / "example_seg.nii.gz")


def _reoriented(volume: Volume, codes: tuple[str, str, str]) -> Volume:
    """The same image stored in another voxel order (e.g. LPS, or axes permuted), via nibabel."""
    image = nib.Nifti1Image(volume.array, volume.affine)
    transform = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(volume.affine), nib.orientations.axcodes2ornt(codes)
    )
    out = image.as_reoriented(transform)
    return Volume(np.asarray(out.dataobj), out.affine, spacing_of(out.affine), dict(volume.meta))


@pytest.mark.parametrize("codes", [("R", "A", "S"), ("L", "P", "S"), ("P", "S", "L")])
def test_canonical_matches_nibabel(ts, codes) -> None:
    volume = _reoriented(ts[0], codes)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(volume.array, volume.affine))
    array, affine, _ = to_canonical(volume.array, volume.affine)
    np.testing.assert_array_equal(array, np.asarray(canonical.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(affine, canonical.affine @ XYZ_TO_DHW)


def test_spacing_unchanged_is_an_exact_copy_and_inverts_exactly(ts) -> None:
    image, label = (_reoriented(v, ("L", "P", "S")) for v in ts)
    prepared = preprocess(image, InputSpec((3.0, 3.0, 3.0), (-2000, 2000)), label=label)
    canonical = nib.as_closest_canonical(nib.Nifti1Image(image.array, image.affine))
    np.testing.assert_array_equal(prepared.image, np.asarray(canonical.dataobj).transpose(2, 1, 0))
    np.testing.assert_allclose(prepared.affine, canonical.affine @ XYZ_TO_DHW)
    assert prepared.image.shape == (30, 101, 122) and prepared.image.dtype == np.int16

    back_label = invert_preprocessing(prepared.label, prepared.record, is_label=True)
    assert back_label.dtype == label.array.dtype
    np.testing.assert_array_equal(back_label, label.array)  # LPS voxel order restored
    back_image = invert_preprocessing(prepared.image, prepared.record.to_dict(), is_label=False)
    assert back_image.dtype == np.float32
    np.testing.assert_array_equal(back_image, image.array)


def test_linear_ramp_lands_where_the_affine_says(ts) -> None:
    """HU = a linear function of world position; after resampling, each interior voxel must hold the
    value of the world point the prepared affine assigns to it (trilinear is exact for linear data)."""
    source = _reoriented(ts[0], ("L", "P", "S"))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in source.array.shape], indexing="ij"), axis=-1)
    world = ijk @ source.affine[:3, :3].T + source.affine[:3, 3]
    ramp = world @ np.array([1.0, -2.0, 3.0])
    ramp -= ramp.mean()
    volume = Volume(ramp.astype(np.float32), source.affine, source.spacing)
    prepared = preprocess(volume, InputSpec((2.0, 1.7, 4.1), (-30000, 30000)))

    d, h, w = prepared.image.shape
    dhw = np.stack(np.meshgrid(np.arange(d), np.arange(h), np.arange(w), indexing="ij"), axis=-1)
    world_out = dhw @ prepared.affine[:3, :3].T + prepared.affine[:3, 3]
    expected = world_out @ np.array([1.0, -2.0, 3.0]) - (world @ np.array([1.0, -2.0, 3.0])).mean()
    interior = (slice(2, -2),) * 3
    np.testing.assert_allclose(prepared.image[interior], expected[interior], atol=0.51)  # int16 rounding
    np.testing.assert_allclose(prepared.spacing, (2.0, 1.7, 4.1), rtol=0.05)
    assert prepared.record.shape == prepared.image.shape


def test_hu_window_and_dtype(ts) -> None:
    prepared = preprocess(ts[0])
    assert prepared.image.dtype == np.int16
    assert prepared.image.min() == -1000 and prepared.image.max() <= 1000
    narrow = preprocess(ts[0], InputSpec(hu_window=(-100, 100))).image
    assert (narrow.min(), narrow.max()) == (-100, 100)
    np.testing.assert_allclose(prepared.spacing, (3.0, 1.5, 1.5), atol=0.02)
    assert InputSpec().target_spacing_mm == (3.0, 1.5, 1.5)


def test_organs_stay_on_their_anatomy(ts) -> None:
    image, label = ts
    for spacing in [(3.0, 1.5, 1.5), (1.5, 1.5, 1.5), (4.0, 4.5, 4.5)]:
        prepared = preprocess(image, InputSpec(spacing), label=label)
        assert prepared.label.dtype == np.uint8 and prepared.label.shape == prepared.image.shape
        for organ in (LIVER, SPLEEN, AORTA):
            original = image.array[label.array == organ].mean()
            resampled = prepared.image[prepared.label == organ].mean()
            assert abs(original - resampled) < 5.0, (spacing, organ, original, resampled)
        # The organ's centre of mass in world mm stays put.
        for organ in (LIVER, SPLEEN):
            before = (label.affine @ np.append(np.argwhere(label.array == organ).mean(0), 1))[:3]
            after = (prepared.affine @ np.append(np.argwhere(prepared.label == organ).mean(0), 1))[:3]
            np.testing.assert_allclose(after, before, atol=1.5)


def test_downsampled_label_inverts_close_to_the_original(ts) -> None:
    image, label = ts
    prepared = preprocess(image, InputSpec((4.0, 4.5, 4.5)), label=label)
    back = invert_preprocessing(prepared.label, prepared.record, is_label=True)
    assert back.shape == label.array.shape
    liver, back_liver = label.array == LIVER, back == LIVER
    dice = 2 * (liver & back_liver).sum() / (liver.sum() + back_liver.sum())
    assert dice > 0.9, dice
    # Probability-like maps go back trilinearly as float32.
    back_image = invert_preprocessing(prepared.image, prepared.record, is_label=False)
    assert back_image.dtype == np.float32 and back_image.shape == image.array.shape


def test_record_is_json_and_checks_shape(ts) -> None:
    prepared = preprocess(ts[0])
    restored = PreprocessRecord.from_dict(json.loads(prepared.record.to_json()))
    assert restored == prepared.record
    np.testing.assert_allclose(restored.prepared_affine(), prepared.affine)
    with pytest.raises(ValueError, match=r"array has shape \(1, 2, 3\), but the prepared grid is"):
        invert_preprocessing(np.zeros((1, 2, 3)), restored, is_label=True)


def test_dicom_series_with_nrrd_label(shared_data: Path) -> None:
    folder = shared_data / "ct" / "dcmqi_ct3slice"
    image, label = read_volume(folder), read_label(folder / "liver_spine_seg.nrrd")
    prepared = preprocess(image, InputSpec((1.0, 1.5, 1.5)), label=label)
    assert prepared.image.shape == (3, 277, 277)
    liver = prepared.image[prepared.label == 1].mean()
    assert 0 < liver < 100, liver
    assert abs(liver - image.array[label.array == 1].mean()) < 5
    assert prepared.image[prepared.label == 2].mean() > 150  # spine


def test_label_on_another_grid_is_refused(ts) -> None:
    image, label = ts
    shifted = Volume(
        label.array,
        label.affine + np.array([[0, 0, 0, 5.0]] * 3 + [[0, 0, 0, 0]]),
        label.spacing,
        {"source": "seg.nii.gz"},
    )
    with pytest.raises(VolumeReadError, match=r"seg\.nii\.gz: is not on the image's grid"):
        preprocess(image, label=shifted)
