"""Task data modules: patient splits, fixed splits, crops and label remapping on a real prepared cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from downstream.data import (
    ClassificationDataModule,
    SegmentationDataModule,
    SurvivalDataModule,
    TaskDataError,
)
from downstream.data.study_crops import AIR_HU, crop_or_pad


def test_crop_or_pad_hand_case() -> None:
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    out = crop_or_pad(array, (-1, 1, 2), (3, 2, 3), fill=-7)
    assert out.shape == (3, 2, 3)
    assert (out[0] == -7).all()  # before the first slice
    np.testing.assert_array_equal(out[1, :, :2], array[0, 1:3, 2:4])
    assert (out[1:, :, 2] == -7).all()  # past the last column


def test_patient_split_keeps_patients_together(demo_cohort: Path) -> None:
    module = SegmentationDataModule(
        str(demo_cohort / "cache"),
        label_values=[1, 2],
        class_names=["liver", "spleen"],
        split_fractions=(0.5, 0.25, 0.25),
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
        str(demo_cohort / "cache"), label_values=[2, 1], class_names=["spleen", "liver"],
        image_size=(16, 32, 32), foreground_ratio=1.0, batch_size=2,
        fixed_splits={"train": ["P00000_S1"], "val": ["P00000_S1"]},
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
    whole = next(iter(module.val_dataloader()))
    assert whole["image"].shape[2:] == raw.shape and whole["study_id"] == ["P00000_S1"]
    assert float(whole["image"].min()) >= AIR_HU


def test_label_tables_and_their_errors(demo_cohort: Path, tmp_path: Path) -> None:
    cache = str(demo_cohort / "cache")
    classification = ClassificationDataModule(
        cache, str(demo_cohort / "findings.parquet"), image_size=(16, 32, 32)
    )
    classification.setup("fit")
    sample = classification.train_dataloader().dataset[0]
    assert sample["labels"].shape == (len(classification.label_columns),) and sample["label_mask"].all()
    survival = SurvivalDataModule(cache, str(demo_cohort / "tte.parquet"), image_size=(16, 32, 32))
    assert survival.task_names == ["MEDS_DEATH", "HOSPITAL_ADMISSION//EMERGENCY"]

    with pytest.raises(TaskDataError, match="lacks the label columns"):
        ClassificationDataModule(cache, str(demo_cohort / "findings.parquet"), label_columns=["nope"])
    with pytest.raises(TaskDataError, match="tte_time"):
        SurvivalDataModule(cache, str(demo_cohort / "findings.parquet"))
    empty = ClassificationDataModule(
        cache, str(demo_cohort / "findings.parquet"), split_fractions=(1.0, 0.0, 0.0)
    )
    empty.setup("fit")
    with pytest.raises(TaskDataError, match=r"'val' split .* is empty"):
        empty.val_dataloader()
