"""The segmentation data module on a real prepared cache: patient and fixed splits, crops, label remapping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from downstream.data import SegmentationDataModule
from fm3d.data.base import LoaderSettings
from fm3d.data.regions import AIR_HU


def test_patient_split_keeps_patients_together(demo_cohort: Path) -> None:
    module = SegmentationDataModule(
        demo_cohort / "cache",
        label_values=[1, 2],
        class_names=["liver", "spleen"],
        loader=LoaderSettings(split_fractions=(0.5, 0.25, 0.25)),
    )
    module.setup("fit")
    index = module.cache.index
    patients = {
        s: set(index.filter(pl.col("study_id").is_in(module.splits[s]))["patient_id"])
        for s in ("train", "val", "test")
    }
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert sum(len(module.splits[s]) for s in ("train", "val", "test")) == len(index)
    assert module.splits["predict"] == module.splits["test"]


def test_segmentation_crops_and_label_remap(demo_cohort: Path) -> None:
    module = SegmentationDataModule(
        demo_cohort / "cache", label_values=[2, 1], class_names=["spleen", "liver"],
        image_size=(16, 32, 32), foreground_ratio=1.0,
        loader=LoaderSettings(batch_size=2, fixed_splits={"train": ["P00000_S1"], "val": ["P00000_S1"]}),
    )  # fmt: skip
    module.setup("fit")
    raw = np.asarray(module.cache.label("P00000_S1"))
    remapped = module.class_map("P00000_S1")
    assert ((remapped == 1) == (raw == 2)).all() and ((remapped == 2) == (raw == 1)).all()
    assert set(np.unique(remapped)) == {0, 1, 2}
    batch = next(iter(module.train_dataloader()))
    assert batch["image"].shape == (2, 1, 16, 32, 32) and batch["label"].shape == (2, 1, 16, 32, 32)
    assert (
        (batch["label"] > 0).flatten(1).any(1).all()
    )  # foreground_ratio 1: every crop is centred on an organ
    # Each crop is the box of the volume its label came from: the image voxels under the label's
    # foreground are the volume's voxels of that organ.
    image = np.asarray(module.cache.image("P00000_S1"), dtype=np.float32)
    for crop, label in zip(batch["image"][:, 0].numpy(), batch["label"][:, 0].numpy(), strict=True):
        organ_hu = image[remapped == 1]
        assert np.isin(crop[label == 1], organ_hu).all()
    whole = next(iter(module.val_dataloader()))  # whole volumes, one per batch
    assert whole["image"].shape == (1, 1, *raw.shape) and whole["study_id"] == ["P00000_S1"]
    np.testing.assert_array_equal(whole["image"][0, 0].numpy(), image)
    assert float(whole["image"].min()) >= AIR_HU
