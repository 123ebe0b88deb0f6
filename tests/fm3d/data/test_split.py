"""Patient-level split: no patient in two splits, stable under re-runs and new patients."""

from __future__ import annotations

import hashlib
import logging

import polars as pl
import pytest

from fm3d.data.split import assign_split, assign_splits, split_studies


def _table(num_patients: int, studies_per_patient: int = 2) -> pl.DataFrame:
    rows = [
        {"study_id": f"p{p}_s{s}", "patient_id": f"p{p}"}
        for p in range(num_patients)
        for s in range(studies_per_patient)
    ]
    return pl.DataFrame(rows)


def test_no_patient_in_two_splits_and_fractions_roughly_hold():
    table = split_studies(_table(2000), (0.7, 0.2, 0.1), seed=3)
    per_patient = table.group_by("patient_id").agg(pl.col("split").n_unique())
    assert per_patient["split"].max() == 1
    shares = table.group_by("split").len().with_columns(pl.col("len") / table.height)
    share = dict(zip(shares["split"], shares["len"], strict=True))
    assert share["train"] == pytest.approx(0.7, abs=0.04)
    assert share["val"] == pytest.approx(0.2, abs=0.04)
    assert share["test"] == pytest.approx(0.1, abs=0.03)


def test_stable_under_reruns_order_and_new_patients():
    small = assign_splits([f"p{i}" for i in range(200)], seed=1)
    grown = assign_splits([f"p{i}" for i in reversed(range(500))], seed=1)
    assert all(grown[p] == s for p, s in small.items())
    assert assign_splits([f"p{i}" for i in range(200)], seed=1) == small
    assert assign_splits([f"p{i}" for i in range(200)], seed=2) != small


def test_assignment_is_the_documented_hash():
    """blake2b-64 of "seed\\x1fpatient" as a fraction of 2**64, thresholded by the cumulative fractions."""
    for pid in ["a", "patient-17", "Ü"]:
        digest = hashlib.blake2b(f"5\x1f{pid}".encode(), digest_size=8).digest()
        u = int.from_bytes(digest, "big") / 2**64
        expected = "train" if u < 0.5 else "val" if u < 0.75 else "test"
        assert assign_split(pid, (0.5, 0.25, 0.25), seed=5) == expected


def test_missing_patient_id_falls_back_to_study_id_with_warning(caplog):
    table = pl.DataFrame({"study_id": ["a", "b", "c"]})
    with caplog.at_level(logging.WARNING, logger="fm3d.data.split"):
        out = split_studies(table, seed=0)
    assert "have no 'patient_id'" in caplog.text
    assert out["split"].to_list() == [assign_split(s, seed=0) for s in ["a", "b", "c"]]
    partial = pl.DataFrame({"study_id": ["a", "b"], "patient_id": ["p1", None]})
    out = split_studies(partial, seed=0)
    assert out["split"].to_list() == [assign_split("p1", seed=0), assign_split("b", seed=0)]


def test_bad_fractions_are_refused():
    with pytest.raises(ValueError, match="summing to 1"):
        assign_split("p", (0.5, 0.5, 0.5))
