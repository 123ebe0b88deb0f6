"""Classification and survival data modules: label tables joined to a real prepared cache; their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from downstream.data import ClassificationDataModule, SurvivalDataModule, TaskDataError
from fm3d.data.base import LoaderSettings
from fm3d.data.errors import DataError
from fm3d.errors import Fm3dError


def test_classification_targets_and_masks(demo_cohort: Path, tmp_path: Path) -> None:
    findings = pl.read_parquet(demo_cohort / "findings.parquet")
    column = next(c for c, t in findings.schema.items() if t == pl.Boolean)
    first = findings["study_id"][0]
    # One unknown cell: its mask is False and its target 0.
    table = findings.with_columns(
        pl.when(pl.col("study_id") == first).then(None).otherwise(pl.col(column)).alias(column)
    )
    table.write_parquet(tmp_path / "findings.parquet")
    module = ClassificationDataModule(
        demo_cohort / "cache", tmp_path / "findings.parquet", image_size=(16, 32, 32),
        loader=LoaderSettings(fixed_splits={"test": findings["study_id"].to_list()}),
    )  # fmt: skip
    module.setup("test")
    assert module.label_columns == [c for c, t in findings.schema.items() if t == pl.Boolean]
    dataset = module.dataset("test")
    k = module.label_columns.index(column)
    for i, study_id in enumerate(dataset.study_ids):
        sample = dataset[i]
        row = findings.row(by_predicate=pl.col("study_id") == study_id, named=True)
        expected = [float(row[c]) for c in module.label_columns]
        mask = torch.ones(len(expected), dtype=torch.bool)
        if study_id == first:
            expected[k], mask[k] = 0.0, False
        assert sample["labels"].tolist() == expected and torch.equal(sample["label_mask"], mask)
        assert sample["image"].shape == (1, 16, 32, 32)


def test_survival_targets_are_the_tables_arrays(demo_cohort: Path) -> None:
    survival = SurvivalDataModule(
        demo_cohort / "cache", demo_cohort / "tte.parquet", image_size=(16, 32, 32),
        loader=LoaderSettings(batch_size=8, split_fractions=(1.0, 0.0, 0.0)),
    )  # fmt: skip
    assert survival.task_names == ["MEDS_DEATH", "HOSPITAL_ADMISSION//EMERGENCY"] and survival.num_tasks == 2
    survival.setup("fit")
    batch = next(iter(survival.loader("train")))
    table = pl.read_parquet(demo_cohort / "tte.parquet")
    rows = {r["study_id"]: r for r in table.iter_rows(named=True)}
    assert batch["tte_time"].dtype == torch.float32 and batch["tte_event"].dtype == torch.bool
    assert batch["has_ehr"].dtype == torch.bool and batch["has_ehr"].shape == (len(batch["study_id"]),)
    for i, study_id in enumerate(batch["study_id"]):
        row = rows[study_id]
        np.testing.assert_allclose(batch["tte_time"][i].numpy(), np.asarray(row["tte_time"], np.float32))
        assert batch["tte_event"][i].tolist() == list(row["tte_event"])
        assert bool(batch["has_ehr"][i]) == bool(row.get("has_ehr", True))


def test_label_table_errors_name_the_file_and_the_fix(demo_cohort: Path, tmp_path: Path) -> None:
    cache, findings = demo_cohort / "cache", demo_cohort / "findings.parquet"
    with pytest.raises(
        TaskDataError, match=rf"{findings}: lacks the label columns \['nope'\].*data.label_columns"
    ):
        ClassificationDataModule(cache, findings, label_columns=["nope"])
    with pytest.raises(
        TaskDataError, match=r"lacks the columns \['tte_time', 'tte_event'\]. Write it with `fm3d ehr"
    ):
        SurvivalDataModule(cache, findings)
    strangers = tmp_path / "strangers.csv"
    pl.DataFrame({"study_id": ["X1", "X2"], "finding": [True, False]}).write_csv(strangers)
    module = ClassificationDataModule(cache, strangers)
    with pytest.raises(TaskDataError, match=rf"{strangers}: names no study of .*index.parquet"):
        module.setup("fit")
    assert issubclass(TaskDataError, DataError) and issubclass(TaskDataError, Fm3dError)


def test_an_empty_split_says_how_to_fix_it(demo_cohort: Path) -> None:
    module = ClassificationDataModule(
        demo_cohort / "cache", demo_cohort / "findings.parquet",
        loader=LoaderSettings(split_fractions=(1.0, 0.0, 0.0)),
    )  # fmt: skip
    module.setup("fit")
    with pytest.raises(DataError, match=r"the 'val' split is empty .*split_fractions"):
        module.val_dataloader()
