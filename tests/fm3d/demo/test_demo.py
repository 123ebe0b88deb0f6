"""The demo cohort: deterministic bytes, truthful reports, MEDS schema, learnable outcome signal."""

from __future__ import annotations

from pathlib import Path

import meds
import nibabel as nib
import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
from sksurv.metrics import concordance_index_censored

from fm3d.demo import LABELS, generate_demo_cohort, main
from fm3d.demo.cohort import OUTCOMES, sample_cohort
from fm3d.demo.volumes import HU

FOCAL = ("lung_nodule", "liver_lesion", "kidney_cyst")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    generate_demo_cohort(out, num_studies=12, seed=0, progress=False)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes(cohort: Path, tmp_path: Path):
    assert main(["--out", str(tmp_path / "again"), "--studies", "12", "--seed", "0", "--quiet"]) == 0
    assert _files(tmp_path / "again") == _files(cohort)
    generate_demo_cohort(tmp_path / "other", num_studies=12, seed=1, progress=False)
    assert _files(tmp_path / "other")["manifest.parquet"] != _files(cohort)["manifest.parquet"]


def test_manifest_and_volumes(cohort: Path):
    manifest = pl.read_parquet(cohort / "manifest.parquet")
    assert manifest.height == 12
    assert manifest.schema["subject_id"] == pl.Int64
    assert manifest.schema["study_time"] == pl.Datetime("us")
    expected = {"study_id", "patient_id", "subject_id", "study_time", "image_path", "label_path"}
    assert set(manifest.columns) >= expected | {"findings", "impression"}
    row = manifest.row(0, named=True)
    image = nib.load(cohort / row["image_path"])
    assert image.get_data_dtype() == np.int16
    assert image.shape == (96, 96, 48)
    np.testing.assert_allclose(image.header.get_zooms(), (1.5, 1.5, 3.0))
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    hu = np.asarray(image.dataobj)
    assert -1100 < hu.min() < -900 and 600 < hu.max() < 1100  # air ... cortical bone
    labels = nib.load(cohort / row["label_path"])
    np.testing.assert_array_equal(labels.affine, image.affine)


def test_volumes_and_reports_state_the_same_findings(cohort: Path):
    manifest = pl.read_parquet(cohort / "manifest.parquet")
    truth = pl.read_parquet(cohort / "findings.parquet")
    for row, flags in zip(manifest.iter_rows(named=True), truth.iter_rows(named=True), strict=True):
        assert row["study_id"] == flags["study_id"]
        hu = np.asarray(nib.load(cohort / row["image_path"]).dataobj).astype(float)
        labels = np.asarray(nib.load(cohort / row["label_path"]).dataobj)
        assert (labels == LABELS["lesion"]).any() == any(flags[f] for f in FOCAL)
        assert (labels == LABELS["pleural_effusion"]).any() == flags["pleural_effusion"]
        liver_hu = hu[labels == LABELS["liver"]].mean()
        expected = HU["fatty_liver"] if flags["hepatic_steatosis"] else HU["liver"]
        assert abs(liver_hu - expected) < 5
        lung_hu = hu[labels == LABELS["lung_right"]].mean()
        assert (lung_hu < -880) == flags["emphysema"]
        text = (row["findings"] + "\n" + row["impression"]).lower()
        assert ("no pulmonary nodule" in text or "no suspicious pulmonary nodule" in text) != flags[
            "lung_nodule"
        ]
        assert ("nodule in the" in text or "nodule measuring" in text) == flags["lung_nodule"]
        assert ("hypodense" in text or "hypoattenuating hepatic" in text) == flags["liver_lesion"]
        assert "aneurysm" in row["impression"].lower() if flags["aortic_aneurysm"] else True
        assert ("cyst" in text) == flags["kidney_cyst"]
        assert ("pleural effusion." in row["impression"].lower()) == flags["pleural_effusion"]
        if not any(flags[f] for f in truth.columns if f != "study_id"):
            assert "1." not in row["impression"]


def test_meds_dataset(cohort: Path):
    root = cohort / "meds"
    files = sorted((root / "data").glob("*/0.parquet"))
    assert files
    for f in files:
        schema = pq.read_schema(f)
        for field in meds.DataSchema.schema():
            assert schema.field(field.name).type == field.type, field.name
    events = pl.read_parquet(files)
    assert events.sort(["subject_id", "time"], maintain_order=True)["time"].to_list() == (
        events.sort(["subject_id", "time"])["time"].to_list()
    )
    for f in files:  # each shard is sorted by subject then time
        shard = pl.read_parquet(f)
        assert shard.equals(shard.sort(["subject_id", "time"], maintain_order=True))
    manifest = pl.read_parquet(cohort / "manifest.parquet")
    imaging = events.filter(pl.col("code") == "IMAGING//CT//CHEST_ABDOMEN")
    assert sorted(imaging["text_value"].to_list()) == sorted(manifest["study_id"].to_list())
    births = events.filter(pl.col("code") == meds.birth_code)
    assert births.height == manifest["subject_id"].n_unique()
    truth = pl.read_parquet(cohort / "findings.parquet").join(manifest, on="study_id")
    nodules = truth.filter(pl.col("lung_nodule"))["subject_id"].to_list()
    coded = events.filter(pl.col("code") == "DIAGNOSIS//ICD//10//R91.1")["subject_id"].to_list()
    assert set(nodules) == set(coded)
    splits = pl.read_parquet(root / "metadata" / "subject_splits.parquet")
    assert set(splits["split"]) <= {meds.train_split, meds.tuning_split, meds.held_out_split}
    assert set(splits["subject_id"]) == set(manifest["subject_id"])
    codes = pl.read_parquet(root / "metadata" / "codes.parquet")
    assert set(events["code"]) <= set(codes["code"])
    assert "dataset_name" in (root / "metadata" / "dataset.json").read_text()
    assert "DIAGNOSIS//ICD//10//R91" in (cohort / "phenotypes.yaml").read_text()


def test_outcomes_carry_signal_from_findings():
    """Harrell's C of the finding burden for death / lung cancer is far above chance (sksurv)."""
    patients = sample_cohort(600, np.random.default_rng(7))
    assert any(len(p.studies) == 2 for p in patients)
    for code in ("MEDS_DEATH", "DIAGNOSIS//ICD//10//C34.90"):
        weights = OUTCOMES[code]
        risk, event, time = [], [], []
        for p in patients:
            start = p.studies[0].time
            names = {f.name for f in p.studies[0].findings}
            risk.append(sum(w for k, w in weights.items() if k in names))  # image-visible findings only
            end = p.outcomes.get(code, p.record_end)
            event.append(code in p.outcomes)
            time.append((end - start).days + 1e-3)
        c = concordance_index_censored(np.array(event), np.array(time), np.array(risk))[0]
        assert sum(event) > 20 and c > 0.65, (code, c, sum(event))
