"""CTDataset over real prepared caches: crop-before-copy reads, normalisation, VoCo crops, joins."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from monai.transforms import ScaleIntensityRange

from fm3d.data.cache import PreparedCache
from fm3d.data.collate import collate_samples
from fm3d.data.datasets import CTDataset, SampleSpec
from fm3d.data.prepare import prepare_cache
from fm3d.data.tables import LabelTable, ReportTable
from fm3d.data.views import build_views
from fm3d.demo import generate_demo_cohort
from fm3d.spec import InputSpecError


def _spec(image_size=None, image_region=None, voco=None, **settings) -> SampleSpec:
    """A SampleSpec with the global view (image_size, image_region) and VoCo crops (voco) asked for."""
    views = {}
    if image_size is not None:
        views["image"] = {"size": image_size, "region": image_region}
    if voco is not None:
        views["voco"] = {"geometry": voco}
    return SampleSpec(views=build_views(views), **settings)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory) -> PreparedCache:
    root = tmp_path_factory.mktemp("demo")
    manifest = generate_demo_cohort(root, num_studies=4, seed=0, progress=False)
    prepare_cache(manifest, root / "cache", progress=False)
    return PreparedCache(root / "cache")


def test_empty_intensity_range_is_refused():
    with pytest.raises(InputSpecError, match="intensity_range"):
        SampleSpec(intensity_range=(1.0, 1.0))


def test_fractional_window_is_refused():
    with pytest.raises(InputSpecError, match="whole HU"):
        SampleSpec(hu_window=(-175.5, 250.0))


def test_global_view_is_the_normalised_centre_crop(demo_cache: PreparedCache):
    sid = demo_cache.study_ids[0]
    ds = CTDataset(demo_cache, [sid], _spec(image_size=(32, 64, 64), hu_window=(-175.0, 250.0)), train=False)
    image = ds[0]["image"]
    assert image.shape == (1, 32, 64, 64) and image.dtype == torch.float32
    volume = np.asarray(demo_cache.image(sid))  # (48, 96, 96)
    reference = ScaleIntensityRange(a_min=-175.0, a_max=250.0, b_min=0.0, b_max=1.0, clip=True)(
        volume[8:40, 16:80, 16:80].astype(np.float32)
    )
    torch.testing.assert_close(image[0], torch.as_tensor(reference), rtol=0, atol=1e-6)


def test_resized_global_view_and_padding(demo_cache: PreparedCache):
    sid = demo_cache.study_ids[0]
    ds = CTDataset(demo_cache, [sid], _spec(image_size=(16, 32, 32), image_region=(48, 96, 96)), train=False)
    assert ds[0]["image"].shape == (1, 16, 32, 32)
    padded = CTDataset(demo_cache, [sid], _spec(image_size=(64, 96, 96)), train=False)[0]["image"]
    assert (padded[0, :8] == 0).all() and (padded[0, -8:] == 0).all()  # 48 slices centred in 64
    # Padding is the window floor, so it reads the intensity range's low end.
    spec = _spec(image_size=(64, 96, 96), intensity_range=(-1.0, 1.0))
    padded = CTDataset(demo_cache, [sid], spec, train=False)[0]["image"]
    assert (padded[0, :8] == -1).all() and (padded[0, -8:] == -1).all()


def test_voco_crops_are_slices_of_one_region_with_matching_labels(demo_cache: PreparedCache):
    sid = demo_cache.study_ids[1]
    spec = _spec(image_size=None, voco="tiny", augment=None)
    ds = CTDataset(demo_cache, [sid], spec, train=True, seed=4)
    sample = ds[0]
    bases, crops, labels = sample["voco_bases"], sample["voco_crops"], sample["voco_labels"]
    assert bases.shape == (4, 1, 32, 32, 32) and crops.shape == (2, 1, 32, 32, 32) and labels.shape == (2, 4)
    torch.testing.assert_close(labels.sum(1), torch.ones(2))
    # Rebuild the region from the bases (x-major order), then find each random crop in it.
    region = torch.zeros(32, 64, 64)
    for k, (h, w) in enumerate(ds.spec.views[0].geometry.base_starts()):
        region[:, h : h + 32, w : w + 32] = bases[k, 0]
    for r in range(2):
        matches = [
            (h, w)
            for h in range(33)
            for w in range(33)
            if torch.equal(region[:, h : h + 32, w : w + 32], crops[r, 0])
        ]
        assert matches, "random crop is not a slice of the region"
        centre = np.array([[matches[0][0] + 16, matches[0][1] + 16]])
        np.testing.assert_allclose(
            labels[r].numpy(), ds.spec.views[0].geometry.overlap_labels(centre)[0], atol=1e-6
        )


def test_voco_v2_shapes_and_range_with_augmentation(demo_cache: PreparedCache):
    ds = CTDataset(demo_cache, None, _spec(image_size=(32, 96, 96), voco="v2"), train=True)
    sample = ds[0]
    assert sample["voco_bases"].shape == (9, 1, 64, 64, 64)
    assert sample["voco_crops"].shape == (2, 1, 64, 64, 64)
    assert sample["voco_labels"].shape == (2, 9)
    assert float(sample["voco_crops"].min()) >= -0.11 and float(sample["voco_crops"].max()) <= 1.11


def test_training_samples_are_reproducible_per_seed(demo_cache: PreparedCache):
    def draw(seed: int) -> list[torch.Tensor]:
        ds = CTDataset(demo_cache, None, _spec(image_size=(16, 32, 32), voco="tiny"), train=True, seed=seed)
        return [ds[i]["voco_crops"] for i in range(len(ds))]

    first, again, other = draw(0), draw(0), draw(1)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_reports_and_labels_join_with_masks(demo_cache: PreparedCache):
    ids = demo_cache.study_ids
    reports = ReportTable(
        pl.DataFrame({"study_id": ids[:2], "findings": ["F0", None], "impression": ["I0", "I1"]}),
        ("findings", "impression"),
    )
    labels = LabelTable(
        pl.DataFrame(
            {
                "study_id": [ids[0], ids[2]],
                "phenotype": [[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]],
                "tte_time": [[10.0, 20.0], [5.0, 7.5]],
                "tte_event": [[True, False], [False, True]],
            }
        ),
        ("phenotype", "tte_time", "tte_event"),
    )
    assert labels.widths == {"phenotype": 3, "tte_time": 2, "tte_event": 2}
    ds = CTDataset(demo_cache, ids[:4], _spec(image_size=(8, 16, 16)), reports, labels, train=False)
    batch = collate_samples([ds[i] for i in range(4)])
    assert batch["study_id"] == ids[:4]
    assert batch["report"] == ["F0\nI0", "I1", "", ""]
    assert batch["has_report"].tolist() == [True, True, False, False]
    assert batch["has_ehr"].tolist() == [True, False, True, False]
    assert batch["phenotype"].dtype == torch.float32 and batch["phenotype"].shape == (4, 3)
    assert batch["phenotype"][0].tolist() == [1.0, 0.0, 1.0] and batch["phenotype"][1].tolist() == [0, 0, 0]
    assert batch["tte_event"].dtype == torch.bool and batch["tte_event"][2].tolist() == [False, True]
    assert batch["tte_time"][3].tolist() == [0.0, 0.0]
    assert batch["image"].shape == (4, 1, 8, 16, 16)


def test_real_totalsegmentator_ct_gives_voco_v2_samples(shared_data: Path, tmp_path: Path):
    ct = shared_data / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
    pl.DataFrame({"study_id": ["ts"], "image_path": [str(ct)]}).write_parquet(tmp_path / "manifest.parquet")
    prepare_cache(tmp_path / "manifest.parquet", tmp_path / "cache", progress=False)
    cache = PreparedCache(tmp_path / "cache")
    for train in (False, True):
        spec = _spec(image_size=(32, 96, 96), voco="v2", augment=None)
        sample = CTDataset(cache, None, spec, train=train)[0]
        assert sample["voco_bases"].shape == (9, 1, 64, 64, 64)
        assert sample["voco_crops"].shape == (2, 1, 64, 64, 64)
        assert sample["voco_labels"].shape == (2, 9)
        torch.testing.assert_close(sample["voco_labels"].sum(1), torch.ones(2))
        for key in ("image", "voco_bases", "voco_crops"):
            assert float(sample[key].min()) >= 0.0 and float(sample[key].max()) <= 1.0
        assert float(sample["voco_bases"].max()) > 0.5  # real anatomy, not only padding


@pytest.mark.parametrize("voco", ["tiny", "v1"])
def test_batched_getitems_equals_per_sample_collate(demo_cache: PreparedCache, voco: str):
    spec = _spec(image_size=(8, 16, 16), image_region=(16, 32, 32), voco=voco)
    ds = CTDataset(demo_cache, None, spec, train=False)
    indices = [0, 2] if voco == "tiny" else [1]  # v1 is 16 x 96^3 per sample: keep it to one
    batch = collate_samples(ds.__getitems__(indices))
    reference = collate_samples([ds[i] for i in indices])
    assert batch.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(batch[key], value, rtol=0, atol=0)
        else:
            assert batch[key] == value
    if voco == "v1":
        assert batch["voco_bases"].shape == (1, 16, 1, 64, 64, 64)
