"""The multi-crop view over real prepared caches: batches through workers, physical extents, masks, errors."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch

from fm3d.data.augment import AugmentConfig
from fm3d.data.base import LoaderSettings
from fm3d.data.datamodule import CTDataModule
from fm3d.data.datasets import CTDataset, SampleSpec
from fm3d.data.multicrop import MultiCropView
from fm3d.data.prepare import prepare_cache
from fm3d.data.views import ViewContext, ViewError, build_views, view_names, view_serving
from fm3d.spec import InputSpec

from .conftest import write_nifti_cohort

# Tiny crops for a 4^3-patch grid: 16^3 global crops have 64 tokens.
SMALL = {
    "global_size": [16, 16, 16],
    "local_size": [8, 8, 8],
    "num_local": 3,
    "global_extent_mm": [20.0, 30.0],
    "local_extent_mm": [8.0, 16.0],
    "patch_size": 4,
}
# Every TorchIO transform on every crop, so reproducibility covers all of them.
EVERYTHING = {
    "affine_prob": 1.0,
    "bias_field_prob": 1.0,
    "gamma_prob": 1.0,
    "blur_probs": [1.0, 1.0, 1.0],
    "noise_prob": 1.0,
}
CONTEXT = ViewContext((-1000, 1000), (0.0, 1.0), None, True, (1.5, 1.5, 1.5))


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("multicrop")
    manifest = write_nifti_cohort(root / "nifti", studies=4)
    prepare_cache(manifest, root / "cache", spec=InputSpec((1.5, 1.5, 1.5)), progress=False)
    return root / "cache"


def _module(cache: Path, workers: int, **view) -> CTDataModule:
    loader = LoaderSettings(
        batch_size=2, num_workers=workers, split_fractions=(1.0, 0.0, 0.0), persistent_workers=False
    )
    data = CTDataModule(cache, views={"multicrop": {**SMALL, **view}}, loader=loader)
    data.setup("fit")
    return data


def test_the_registry_serves_the_views_and_their_keys():
    assert {"multicrop", "mae"} <= set(view_names())
    assert view_serving("global_masks") == "multicrop" and view_serving("mae_mask") == "mae"


def test_batches_through_workers_equal_the_in_process_ones(cache: Path):
    workers = _module(cache, 2, augment=EVERYTHING)
    assert workers.input_spec.image_size == (16, 16, 16)
    assert {"global_crops", "local_crops", "global_masks"} <= set(workers.batch_keys)
    batches = list(workers.train_dataloader())
    assert len(batches) == 2
    for batch in batches:
        assert (
            batch["global_crops"].shape == (2, 2, 1, 16, 16, 16)
            and batch["global_crops"].dtype == torch.float32
        )
        assert (
            batch["local_crops"].shape == (2, 3, 1, 8, 8, 8) and batch["local_crops"].dtype == torch.float32
        )
        assert batch["global_masks"].shape == (2, 2, 64) and batch["global_masks"].dtype == torch.bool
        assert torch.isfinite(batch["global_crops"]).all() and torch.isfinite(batch["local_crops"]).all()
    # Every draw, TorchIO's included, is a function of (seed, epoch, position): 0 workers agree.
    for a, b in zip(batches, _module(cache, 0, augment=EVERYTHING).train_dataloader(), strict=True):
        assert a["study_id"] == b["study_id"]
        for key in ("global_crops", "local_crops", "global_masks"):
            assert torch.equal(a[key], b[key]), key


def test_epochs_draw_new_crops_and_evaluation_draws_the_same(cache: Path):
    spec = SampleSpec(views=build_views({"multicrop": SMALL}))
    train = CTDataset(cache, None, spec, train=True)
    first, again, next_epoch = train[1], train[1], train[1 + len(train)]
    assert torch.equal(first["global_crops"], again["global_crops"])
    assert not torch.equal(first["global_crops"], next_epoch["global_crops"])
    assert not torch.equal(first["local_crops"], next_epoch["local_crops"])
    evaluation = CTDataset(cache, None, spec, train=False)
    a, b = evaluation[1], evaluation[1 + len(evaluation)]
    for key in ("global_crops", "local_crops", "global_masks"):
        assert torch.equal(a[key], b[key]), key
    # Evaluation has no augmentation but keeps masks for iBOT's validation loss.
    masks = torch.stack([evaluation[i]["global_masks"] for i in range(len(evaluation))])
    assert masks.any()


def test_no_local_crops_is_an_empty_stack(cache: Path):
    batch = next(iter(_module(cache, 2, num_local=0).train_dataloader()))
    assert batch["local_crops"].shape == (2, 0, 1, 8, 8, 8) and batch["global_crops"].shape[1] == 2


def _cube_cache(folder: Path, spacing: float) -> np.ndarray:
    """A 64 mm CT of air with a 24 mm bone cube at [20, 44) mm, prepared at `spacing`; its volume."""
    raw = folder / "cube.nii.gz"
    if not raw.exists():
        hu = np.full((64, 64, 64), -1000, dtype=np.int16)
        hu[20:44, 20:44, 20:44] = 1000
        nib.save(nib.Nifti1Image(hu, np.eye(4)), raw)  # 1 mm voxels
        pl.DataFrame([{"study_id": "cube", "patient_id": "p", "image_path": str(raw)}]).write_csv(
            folder / "m.csv"
        )
    out = folder / f"cache_{spacing}"
    prepare_cache(folder / "m.csv", out, spec=InputSpec((spacing,) * 3), progress=False)
    return out


def test_an_extent_in_mm_covers_the_same_anatomy_at_any_spacing(tmp_path: Path):
    view = {
        "global_size": [24, 24, 24],
        "global_extent_mm": [48.0, 48.0],
        "num_local": 0,
        "patch_size": 8,
        "local_size": [8, 8, 8],
        "local_extent_mm": [8.0, 8.0],
    }
    spec = SampleSpec(views=build_views({"multicrop": view}), augment=None)
    crops = {}
    for spacing in (1.0, 2.0):
        cache = _cube_cache(tmp_path, spacing)
        crops[spacing] = CTDataset(cache, None, spec, train=False)[0]["global_crops"][0, 0] > 0.5
    # A centred 48 mm crop of the 64 mm volume spans [8, 56) mm: the cube fills its middle half,
    # output voxels [6, 18) per axis at both spacings (a crop of 48 voxels at 2 mm would span
    # 96 mm and show the cube a quarter as wide).
    expected = torch.zeros(24, 24, 24, dtype=torch.bool)
    expected[6:18, 6:18, 6:18] = True
    assert torch.equal(crops[1.0], expected) and torch.equal(crops[2.0], expected)


def test_extents_are_uniform_in_volume_and_crops_read_padding_as_air():
    view = MultiCropView(**{**SMALL, "global_extent_mm": [10.0, 40.0]})
    context = ViewContext((-1000, 1000), (0.0, 1.0), None, True, (0.5, 0.5, 0.5))
    rng = np.random.default_rng(0)
    volume = np.zeros((8, 8, 8), np.int16)
    # A crop's edge = its output voxel spacing x 16 voxels. Uniform in volume, half the edges
    # lie below cbrt((10^3 + 40^3) / 2) = 31.9 mm (uniform edges would put 73 % there).
    edges = [
        16 * view._crop(volume, rng, context, (10.0, 40.0), torch.empty(16, 16, 16))[0] for _ in range(400)
    ]
    assert min(edges) >= 10.0 - 0.5 and max(edges) <= 40.0 + 0.5
    assert abs(np.mean(np.array(edges) < np.cbrt((10.0**3 + 40.0**3) / 2)) - 0.5) < 0.08
    # A 40 mm crop of a 4 mm volume of bone: the bone sits in the middle, air (0) around it.
    into = torch.empty(16, 16, 16)
    view._crop(np.full((8, 8, 8), 1000, np.int16), rng, context, (40.0, 40.0), into)
    assert into[8, 8, 8] == 1.0 and into[0, 0, 0] == 0.0 and into[15, 15, 15] == 0.0


def test_crops_keep_the_caches_voxel_proportions():
    """At 3 x 1.5 x 1.5 mm a [16, 32, 32] crop covers a cube: one zoom on every axis, voxels stay 2:1:1.

    The encoder then sees the voxel geometry it meets at inference (volumes at the input
    spec's spacing), only zoomed.
    """
    view = MultiCropView(**{**SMALL, "global_size": [16, 32, 32], "local_size": [8, 16, 16]})
    context = ViewContext((-1000, 1000), (0.0, 1.0), None, False, (3.0, 1.5, 1.5))
    volume = np.zeros((40, 80, 80), np.int16)
    rng = np.random.default_rng(0)
    for _ in range(20):
        spacing = view._crop(volume, rng, context, (48.0, 96.0), torch.empty(16, 32, 32))
        assert spacing[0] == pytest.approx(2 * spacing[1], rel=0.05) and spacing[1] == spacing[2]
        edges = [16 * spacing[0], 32 * spacing[1], 32 * spacing[2]]
        assert 48.0 - 1.5 <= max(edges) <= 96.0 + 1.5 and max(edges) == pytest.approx(min(edges), rel=0.05)


def test_global_masks_follow_the_probability_and_ratio_bounds():
    view = MultiCropView(**SMALL, mask_probability=0.5, mask_ratio=(0.2, 0.4))
    rng = np.random.default_rng(2)
    volume = np.zeros((20, 20, 20), np.int16)
    masks = torch.cat([view.fill(volume, rng, CONTEXT, {})["global_masks"] for _ in range(200)])  # [400, 64]
    counts = masks.sum(1)
    masked = counts > 0
    assert abs(masked.float().mean() - 0.5) < 0.1
    assert counts[masked].min() >= int(64 * 0.2) and counts[masked].max() <= int(64 * 0.4)
    assert view.grid == (4, 4, 4) and masks.shape[1] == math.prod(view.grid)


def test_augmentation_changes_training_crops_only(cache: Path):
    plain = SampleSpec(views=build_views({"multicrop": SMALL}), augment=None)
    augmented = SampleSpec(
        views=build_views({"multicrop": {**SMALL, "augment": EVERYTHING}}), augment=AugmentConfig()
    )
    a, b = CTDataset(cache, None, plain, train=True)[0], CTDataset(cache, None, augmented, train=True)[0]
    assert not torch.equal(a["global_crops"], b["global_crops"])
    a, b = CTDataset(cache, None, plain, train=False)[0], CTDataset(cache, None, augmented, train=False)[0]
    assert torch.equal(a["global_crops"], b["global_crops"]) and torch.equal(
        a["local_crops"], b["local_crops"]
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"global_size": [18, 16, 16]},
            r"multicrop\.global_size \(18, 16, 16\) is not divisible by patch_size",
        ),
        ({"local_size": [6, 8, 8]}, r"multicrop\.local_size .* not divisible"),
        ({"local_size": [32, 8, 8]}, r"local_size .* is larger than global_size"),
        ({"num_global": 0}, r"num_global must be >= 1"),
        ({"global_extent_mm": [0.0, 10.0]}, r"global_extent_mm must be positive"),
        ({"global_extent_mm": [30.0, 20.0]}, r"global_extent_mm must be a range \(min, max\)"),
        ({"local_extent_mm": [8.0, 40.0]}, r"local_extent_mm .* reaches beyond global_extent_mm"),
        ({"mask_probability": 1.5}, r"mask_probability must be in \[0, 1\]"),
        ({"mask_ratio": [0.2, 1.0]}, r"mask_ratio must be \(min, max\) with 0 <= min <= max < 1"),
        ({"mask_min_block": 0}, r"mask_min_block must be at least one token"),
        ({"augment": {"gamma_prob": 2.0}}, r"multicrop\.augment\.gamma_prob must be probabilities"),
        ({"augment": {"blur_probs": [1.0, 0.1]}}, r"augment\.blur_probs must be three probabilities"),
        ({"augment": {"noise_std": [0.1, 0.0]}}, r"augment\.noise_std must be a range"),
        (
            {"augment": {"gama_prob": 0.1}},
            r"data\.views\.multicrop: .*unexpected keyword argument 'gama_prob'",
        ),
    ],
)
def test_bad_settings_name_the_setting(settings: dict, message: str):
    with pytest.raises(ViewError, match=message):
        build_views({"multicrop": {**SMALL, **settings}})


def test_quarter_turns_of_non_square_crops_are_refused():
    view = MultiCropView(**{**SMALL, "global_size": [16, 16, 8], "local_size": [8, 8, 4]})
    context = ViewContext((-1000, 1000), (0.0, 1.0), AugmentConfig(rot90_prob=1.0), True, (1.5, 1.5, 1.5))
    with pytest.raises(ViewError, match=r"quarter turns need square H-W crops.*data\.rot90_prob: 0"):
        view.fill(np.zeros((20, 20, 20), np.int16), np.random.default_rng(0), context, {})
