"""MAE's view over a real prepared cache: the image as the global view cuts it, exact mask counts, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fm3d.data.base import LoaderSettings
from fm3d.data.datamodule import CTDataModule
from fm3d.data.datasets import CTDataset, SampleSpec
from fm3d.data.masked_view import MaskedImageView
from fm3d.data.prepare import prepare_cache
from fm3d.data.views import ViewContext, ViewError, build_views
from fm3d.spec import InputSpec

from .conftest import write_nifti_cohort


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mae")
    manifest = write_nifti_cohort(root / "nifti", studies=4)
    prepare_cache(manifest, root / "cache", spec=InputSpec((1.5, 1.5, 1.5)), progress=False)
    return root / "cache"


@pytest.mark.parametrize("masking", ["random", "block"])
def test_batches_through_workers_mask_exactly_the_ratio(cache: Path, masking: str):
    views = {"mae": {"size": [16, 16, 16], "region": [20, 18, 14], "patch_size": 4, "masking": masking}}
    loader = LoaderSettings(
        batch_size=2, num_workers=2, split_fractions=(1.0, 0.0, 0.0), persistent_workers=False
    )
    data = CTDataModule(cache, views=views, loader=loader)
    data.setup("fit")
    assert data.input_spec.image_size == (16, 16, 16) and {"mae_image", "mae_mask"} <= set(data.batch_keys)
    batches = list(data.train_dataloader())
    for batch in batches:
        assert batch["mae_image"].shape == (2, 1, 16, 16, 16) and batch["mae_image"].dtype == torch.float32
        assert batch["mae_mask"].shape == (2, 64) and batch["mae_mask"].dtype == torch.bool
        assert batch["mae_mask"].sum(1).tolist() == [48, 48]  # round(0.75 * 64)
    in_process = CTDataModule(cache, views=views, loader=LoaderSettings(**{**vars(loader), "num_workers": 0}))
    in_process.setup("fit")
    for a, b in zip(batches, in_process.train_dataloader(), strict=True):
        assert torch.equal(a["mae_image"], b["mae_image"]) and torch.equal(a["mae_mask"], b["mae_mask"])


def test_the_image_is_the_global_views_cut(cache: Path):
    # Same size and region, same generator: MAE's image is what the global view `image` makes.
    settings = {"size": [16, 16, 16], "region": [20, 18, 14]}
    mae = SampleSpec(views=build_views({"mae": {**settings, "patch_size": 8}}))
    image = SampleSpec(views=build_views({"image": settings}))
    for train in (True, False):
        a = CTDataset(cache, None, mae, train=train)[2]["mae_image"]
        b = CTDataset(cache, None, image, train=train)[2]["image"]
        assert torch.equal(a, b)


def test_evaluation_masks_are_the_same_every_epoch_and_training_ones_are_not(cache: Path):
    spec = SampleSpec(views=build_views({"mae": {"size": [16, 16, 16], "patch_size": 4, "masking": "block"}}))
    evaluation = CTDataset(cache, None, spec, train=False)
    assert torch.equal(evaluation[0]["mae_mask"], evaluation[len(evaluation)]["mae_mask"])
    train = CTDataset(cache, None, spec, train=True)
    assert not torch.equal(train[0]["mae_mask"], train[len(train)]["mae_mask"])


def test_block_masking_keeps_blocks():
    # Block masks are boxes (few masked neighbours missing); random ones scatter.
    context = ViewContext((-1000, 1000), (0.0, 1.0), None, False, (1.5, 1.5, 1.5))
    volume = np.zeros((32, 32, 32), np.int16)

    def neighbours(masking: str) -> float:
        view = MaskedImageView(size=(32, 32, 32), patch_size=4, mask_ratio=0.5, masking=masking)
        rng = np.random.default_rng(0)
        total = 0.0
        for _ in range(10):
            m = view.fill(volume, rng, context, {})["mae_mask"].reshape(8, 8, 8)
            total += (
                sum((m.narrow(a, 1, 7) & m.narrow(a, 0, 7)).sum().item() for a in range(3)) / m.sum().item()
            )
        return total / 10

    assert neighbours("block") > 1.5 * neighbours("random")


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"size": [18, 16, 16]}, r"data\.views\.mae\.size \(18, 16, 16\) is not divisible by patch_size"),
        ({"mask_ratio": 0.0}, r"mae\.mask_ratio must be between 0 and 1"),
        ({"mask_ratio": 1.0}, r"mae\.mask_ratio must be between 0 and 1"),
        ({"mask_ratio": 0.01}, r"mask_ratio 0\.01 of 8 tokens masks 0; MAE needs some tokens masked"),
        ({"masking": "grid"}, r"mae\.masking must be 'random' or 'block'"),
        ({"region": [8, 8]}, r"data\.views\.mae\.region must be three positive voxel counts"),
        ({"mask_min_block": 0}, r"mae\.mask_min_block must be at least one token"),
    ],
)
def test_bad_settings_name_the_setting(settings: dict, message: str):
    with pytest.raises(ViewError, match=message):
        build_views({"mae": {"size": [16, 16, 16], "patch_size": 8, **settings}})
