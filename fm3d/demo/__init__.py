"""`fm3d demo-data`: a small synthetic cohort linking CT volumes, reports and a MEDS EHR.

Layout written under DIR (see docs/demo-cohort.md)::

    images/<study_id>.nii.gz   int16 HU, RAS, 1.5 x 1.5 x 3 mm, 96 x 96 x 48 (x, y, z)
    labels/<study_id>.nii.gz   uint8 organ label map on the same grid (`LABELS`)
    manifest.parquet           study_id, patient_id, subject_id, study_time, image_path,
                               label_path, findings, impression (input of `fm3d prepare`)
    findings.parquet           study_id + one boolean column per finding type (ground truth)
    meds/                      MEDS 0.4 dataset (data/<split>/0.parquet, metadata/...)
    phenotypes.yaml            phenotype group -> MEDS code prefixes
    labels.json                label map value -> organ name

The same seed writes the same bytes.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl

from fm3d.data.split import assign_splits
from fm3d.demo.cohort import FINDING_TYPES, Patient, sample_cohort
from fm3d.demo.meds import PHENOTYPES, phenotype_yaml, write_meds
from fm3d.demo.reports import write_report
from fm3d.demo.volumes import LABELS, SHAPE, SPACING_MM, affine_ras, synthesize
from fm3d.train.progress import progress as progress_lines

__all__ = ["LABELS", "PHENOTYPES", "SHAPE", "SPACING_MM", "generate_demo_cohort", "main"]

logger = logging.getLogger(__name__)


def _write_nifti(path: Path, array_dhw: np.ndarray) -> None:
    """Write [D, H, W] as a gzipped RAS NIfTI, byte-for-byte reproducible (gzip mtime 0), atomically."""
    image = nib.Nifti1Image(np.ascontiguousarray(array_dhw.transpose(2, 1, 0)), affine_ras())
    image.header.set_xyzt_units("mm", "sec")
    image.header.set_qform(affine_ras(), code=1)
    image.header.set_sform(affine_ras(), code=1)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))
    os.replace(tmp, path)


def generate_demo_cohort(
    out: str | Path,
    num_studies: int = 64,
    seed: int = 0,
    split_fractions: tuple[float, float, float] = (0.7, 0.15, 0.15),
    progress: bool = True,
) -> Path:
    """Write the demo cohort into `out` and return the manifest path.

    Subjects are assigned to MEDS splits with `fm3d.data.split` on patient_id with the same
    `seed`, so `CTDataModule(seed=seed, split_fractions=split_fractions)` agrees with them.
    """
    if num_studies < 1:
        raise ValueError(f"--studies must be >= 1, got {num_studies}")
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    patients: list[Patient] = sample_cohort(num_studies, rng)
    rows, finding_rows = [], []
    studies = [(p, s) for p in patients for s in p.studies]
    for patient, study in progress_lines(studies, "demo studies", unit="study", disable=not progress):
        image, labels = synthesize(patient.anatomy, study.findings, study.shift_mm, study.noise_seed)
        _write_nifti(out / "images" / f"{study.study_id}.nii.gz", image)
        _write_nifti(out / "labels" / f"{study.study_id}.nii.gz", labels)
        findings_text, impression = write_report(study.findings, rng)
        rows.append(
            dict(
                study_id=study.study_id, patient_id=patient.patient_id, subject_id=patient.subject_id,
                study_time=study.time, image_path=f"images/{study.study_id}.nii.gz",
                label_path=f"labels/{study.study_id}.nii.gz", findings=findings_text, impression=impression,
            )
        )  # fmt: skip
        names = {f.name for f in study.findings}
        finding_rows.append({"study_id": study.study_id, **{f.name: f.name in names for f in FINDING_TYPES}})
    manifest = pl.DataFrame(rows).with_columns(
        pl.col("subject_id").cast(pl.Int64), pl.col("study_time").cast(pl.Datetime("us"))
    )
    manifest.write_parquet(out / "manifest.parquet")
    pl.DataFrame(finding_rows).write_parquet(out / "findings.parquet")
    splits = assign_splits([p.patient_id for p in patients], split_fractions, seed)
    write_meds(out, patients, {p.subject_id: splits[p.patient_id] for p in patients}, rng)
    (out / "phenotypes.yaml").write_text(phenotype_yaml())
    (out / "labels.json").write_text(json.dumps({str(v): k for k, v in LABELS.items()}, indent=2) + "\n")
    logger.info("demo cohort: %d studies of %d patients in %s", len(rows), len(patients), out)
    return out / "manifest.parquet"


def main(argv: list[str] | None = None) -> int:
    """Command line: `fm3d demo-data --out DIR [--studies 64] [--seed 0]`."""
    parser = argparse.ArgumentParser(
        prog="fm3d demo-data",
        description="Write a synthetic cohort (CT volumes + organ labels, reports, MEDS EHR, manifest).",
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder (created)")
    parser.add_argument("--studies", type=int, default=64, help="number of CT studies (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same seed, same bytes")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    manifest = generate_demo_cohort(args.out, args.studies, args.seed, progress=not args.quiet)
    table = pl.read_parquet(manifest)
    print(
        f"wrote {table.height} studies of {table['patient_id'].n_unique()} patients to {args.out}\n"
        f"next: fm3d prepare --manifest {manifest} --out {args.out / 'cache'}"
    )
    return 0
