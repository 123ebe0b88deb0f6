"""The demo cohort's EHR as a MEDS 0.4 dataset, and the phenotype mapping for its codes.

Per subject: MEDS_BIRTH; background history (hypertension, smoking) before the first CT;
at each CT an `IMAGING//CT//CHEST_ABDOMEN` event (text_value = study_id), labs the day
before (ALT raised with liver disease) and the diagnosis codes of the study's findings the
day after; then outcome events drawn from finding-dependent hazards (lung cancer,
emergency admission, MEDS_DEATH) and a last outpatient visit at the end of the record,
which is where a subject without an event is censored.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from fm3d.demo.cohort import FINDING_TYPES, Patient

IMAGING_CODE = "IMAGING//CT//CHEST_ABDOMEN"
RECORD_END_CODE = "VISIT//OUTPATIENT"
MEDS_SPLITS = {"train": "train", "val": "tuning", "test": "held_out"}

DATA_SCHEMA = {
    "subject_id": pl.Int64,
    "time": pl.Datetime("us"),
    "code": pl.String,
    "numeric_value": pl.Float32,
    "text_value": pl.String,
}

_EXTRA_CODES = {
    "MEDS_BIRTH": "Birth",
    "MEDS_DEATH": "Death",
    IMAGING_CODE: "CT of the chest and abdomen with contrast (text_value: study_id)",
    RECORD_END_CODE: "Outpatient visit",
    "DIAGNOSIS//ICD//10//I10": "Essential (primary) hypertension",
    "DIAGNOSIS//ICD//10//C34.90": "Malignant neoplasm of unspecified part of bronchus or lung",
    "HOSPITAL_ADMISSION//EMERGENCY": "Emergency hospital admission",
    "SOCIAL//TOBACCO//CURRENT": "Current tobacco smoker",
    "LAB//ALT//U/L": "Alanine aminotransferase (U/L)",
    "LAB//CREATININE//mg/dL": "Creatinine (mg/dL)",
}

# Phenotype groups: one per finding type plus the outcome diagnoses (group -> code prefixes).
PHENOTYPES: dict[str, list[str]] = {
    **{f.name: [f"DIAGNOSIS//ICD//10//{f.icd10}"] for f in FINDING_TYPES},
    "lung_cancer": ["DIAGNOSIS//ICD//10//C34"],
    "hypertension": ["DIAGNOSIS//ICD//10//I10"],
}


# MEDS 0.4 arrow types (`meds.DataSchema` etc.); polars alone would write large_string.
_ARROW_SCHEMAS = {
    "data": pa.schema([("subject_id", pa.int64()), ("time", pa.timestamp("us")), ("code", pa.string()),
                       ("numeric_value", pa.float32()), ("text_value", pa.large_string())]),
    "codes": pa.schema([("code", pa.string()), ("description", pa.string()),
                        ("parent_codes", pa.list_(pa.string()))]),
    "splits": pa.schema([("subject_id", pa.int64()), ("split", pa.string())]),
}  # fmt: skip


def _write(table: pl.DataFrame, path: Path, schema: str) -> None:
    pq.write_table(table.to_arrow().cast(_ARROW_SCHEMAS[schema]), path)


def diagnosis_code(icd10: str) -> str:
    return f"DIAGNOSIS//ICD//10//{icd10}"


def patient_events(patient: Patient, rng: np.random.Generator) -> list[tuple]:
    """(subject_id, time, code, numeric_value, text_value) rows of one patient, time-sorted."""
    sid = patient.subject_id
    first = patient.studies[0].time
    rows: list[tuple] = [(sid, patient.birth, "MEDS_BIRTH", None, None)]
    if patient.hypertension:
        rows.append(
            (
                sid,
                first - timedelta(days=float(rng.uniform(100, 2000))),
                "DIAGNOSIS//ICD//10//I10",
                None,
                None,
            )
        )
    if patient.smoker:
        rows.append(
            (sid, first - timedelta(days=float(rng.uniform(30, 900))), "SOCIAL//TOBACCO//CURRENT", None, None)
        )
    for study in patient.studies:
        names = {f.name for f in study.findings}
        liver_disease = bool(names & {"liver_lesion", "hepatic_steatosis"})
        lab_time = study.time - timedelta(days=1)
        alt = rng.normal(70 if liver_disease else 25, 8)
        rows.append((sid, lab_time, "LAB//ALT//U/L", float(max(alt, 5.0)), None))
        rows.append((sid, lab_time, "LAB//CREATININE//mg/dL", float(max(rng.normal(0.95, 0.2), 0.3)), None))
        rows.append((sid, study.time, IMAGING_CODE, None, study.study_id))
        coded = study.time + timedelta(days=1)
        for finding in study.findings:
            icd = next(f.icd10 for f in FINDING_TYPES if f.name == finding.name)
            rows.append((sid, coded, diagnosis_code(icd), None, None))
    for code, when in patient.outcomes.items():
        rows.append((sid, when, code, None, None))
    if "MEDS_DEATH" not in patient.outcomes:
        rows.append((sid, patient.record_end, RECORD_END_CODE, None, None))
    return sorted(rows, key=lambda r: r[1])


def write_meds(out: Path, patients: list[Patient], splits: dict[int, str], rng: np.random.Generator) -> Path:
    """Write DIR/meds (data/<split>/0.parquet, metadata/*) and return its path."""
    root = out / "meds"
    events = [row for p in patients for row in patient_events(p, rng)]
    table = pl.DataFrame(events, schema=DATA_SCHEMA, orient="row").sort(
        ["subject_id", "time"], maintain_order=True
    )
    split_table = pl.DataFrame(
        {"subject_id": list(splits), "split": [MEDS_SPLITS[s] for s in splits.values()]},
        schema={"subject_id": pl.Int64, "split": pl.String},
    )
    for split in MEDS_SPLITS.values():
        ids = split_table.filter(pl.col("split") == split)["subject_id"]
        part = table.filter(pl.col("subject_id").is_in(ids.implode()))
        if part.height:
            (root / "data" / split).mkdir(parents=True, exist_ok=True)
            _write(part, root / "data" / split / "0.parquet", "data")
    (root / "metadata").mkdir(parents=True, exist_ok=True)
    _write(split_table.sort("subject_id"), root / "metadata" / "subject_splits.parquet", "splits")
    descriptions = {**_EXTRA_CODES, **{diagnosis_code(f.icd10): f.description for f in FINDING_TYPES}}
    codes = sorted(set(table["code"].to_list()))
    code_table = pl.DataFrame(
        {
            "code": codes,
            "description": [descriptions.get(c, "") for c in codes],
            "parent_codes": [[] for _ in codes],
        },
        schema={"code": pl.String, "description": pl.String, "parent_codes": pl.List(pl.String)},
    )
    _write(code_table, root / "metadata" / "codes.parquet", "codes")
    last_time = max(p.record_end for p in patients)
    metadata = {
        "dataset_name": "fm3d-demo-cohort",
        "dataset_version": "1",
        "etl_name": "fm3d.demo",
        "etl_version": "1",
        "meds_version": "0.4.1",
        # deterministic: the synthetic cohort's last record date, not the wall clock
        "created_at": datetime(last_time.year + 1, 1, 1).isoformat(),
        "license": "CC0-1.0 (synthetic data)",
    }
    (root / "metadata" / "dataset.json").write_text(json.dumps(metadata, indent=2) + "\n")
    return root


def phenotype_yaml() -> str:
    """YAML text of the phenotype mapping (group -> list of code prefixes)."""
    lines = ["# Phenotype groups of the fm3d demo cohort: group -> MEDS code prefixes."]
    for group, prefixes in PHENOTYPES.items():
        lines.append(f"{group}:")
        lines.extend(f'  - "{p}"' for p in prefixes)
    return "\n".join(lines) + "\n"
