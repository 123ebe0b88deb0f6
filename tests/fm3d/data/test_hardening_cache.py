"""Issue 16, class 5: a prepared cache is always repaired by re-running `fm3d prepare`.

The up-to-date check covers every file a study reads (a detached NRRD's data file, each DICOM
file of a series, but not unrelated files beside them) and the written arrays themselves
(header, size, mtime), so a changed source or a truncated, corrupted or stale `.npy` is redone,
and a damaged index or journal entry is rebuilt instead of stopping the run.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pydicom
import pytest

from fm3d.data.cache import PreparedCache
from fm3d.data.prepare import main


@pytest.fixture
def studies(tmp_path: Path, ct_file: Path, dicom_series: Path) -> Path:
    """Raw studies built from the real files: a NIfTI, a detached NRRD (.nhdr + .raw), a DICOM series."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(ct_file, raw / "ct.nii.gz")
    voxels = np.asarray(nib.load(ct_file).dataobj).astype("<i2")
    (raw / "ct.raw").write_bytes(voxels.tobytes(order="F"))
    (raw / "ct.nhdr").write_text(
        "NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\n"
        f"sizes: {voxels.shape[0]} {voxels.shape[1]} {voxels.shape[2]}\n"
        "space directions: (3,0,0) (0,3,0) (0,0,3)\nendian: little\nencoding: raw\ndata file: ct.raw\n\n"
    )
    shutil.copytree(dicom_series, raw / "dicom")
    pl.DataFrame(
        {"study_id": ["nii", "nhdr", "dicom"], "image_path": ["ct.nii.gz", "ct.nhdr", "dicom"]}
    ).write_csv(raw / "m.csv")
    return raw


def _run(studies: Path, out: Path, capsys) -> str:
    assert main(["--manifest", str(studies / "m.csv"), "--out", str(out), "--no-progress"]) == 0
    return capsys.readouterr().out


def _later(path: Path) -> None:
    """Move a file's mtime on, as a real edit a second later would."""
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_every_source_file_a_study_reads_is_watched(studies: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    assert "3 prepared" in _run(studies, out, capsys)
    before = {sid: np.array(PreparedCache(out).image(sid)) for sid in ("nhdr", "dicom")}

    # The .nhdr's data file changes; the header does not.
    data = np.fromfile(studies / "ct.raw", dtype="<i2")
    (studies / "ct.raw").write_bytes((data // 2).astype("<i2").tobytes())
    _later(studies / "ct.raw")
    assert "1 prepared, 2 skipped (up to date)" in _run(studies, out, capsys)
    assert not np.array_equal(PreparedCache(out).image("nhdr"), before["nhdr"])

    # One DICOM file of the series changes.
    ds = pydicom.dcmread(studies / "dicom" / "02.dcm")
    ds.RescaleIntercept = float(ds.RescaleIntercept) + 100
    ds.save_as(studies / "dicom" / "02.dcm")
    assert "1 prepared, 2 skipped (up to date)" in _run(studies, out, capsys)
    assert not np.array_equal(PreparedCache(out).image("dicom"), before["dicom"])

    # A file beside the series that is no part of it is looked at, hashed out, and nothing is redone.
    (studies / "dicom" / "README.txt").write_text("notes")
    assert "0 prepared, 3 skipped (up to date)" in _run(studies, out, capsys)


@pytest.mark.parametrize("damage", ["truncated", "header", "stale", "missing"])
def test_damaged_outputs_are_redone(studies: Path, tmp_path: Path, capsys, damage: str) -> None:
    out = tmp_path / "cache"
    _run(studies, out, capsys)
    target = out / "studies" / "nii.npy"
    original = target.read_bytes()
    if damage == "truncated":
        target.write_bytes(original[: len(original) // 2])
    elif damage == "header":
        target.write_bytes(b"\x93NUMPY garbage" + original[14:])
    elif damage == "stale":  # a valid array of the right shape, from another run, copied over it
        np.save(target, np.zeros(PreparedCache(out).shape("nii"), np.int16))
    else:
        target.unlink()
    assert "1 prepared, 2 skipped (up to date)" in _run(studies, out, capsys)
    assert target.read_bytes() == original


def test_damaged_index_and_journal_are_rebuilt(studies: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "cache"
    _run(studies, out, capsys)
    (out / "index.parquet").write_bytes(b"PAR1 not really")
    (out / ".journal" / "nii.json").write_text("{half an entry")
    (out / ".journal" / "nhdr.json").write_text('{"study_id": "someone else"}')
    assert "3 prepared, 0 skipped (up to date), 0 failed" in _run(studies, out, capsys)
    assert PreparedCache(out).study_ids == ["nii", "nhdr", "dicom"]
    assert not list((out / ".journal").iterdir())


def test_a_cache_from_before_output_checks_is_hashed_not_reprepared(
    studies: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cache"
    _run(studies, out, capsys)
    index = pl.read_parquet(out / "index.parquet")
    index.drop("output_stat").write_parquet(out / "index.parquet")  # as an older fm3d wrote it
    mtime = (out / "studies" / "nii.npy").stat().st_mtime_ns
    assert "0 prepared, 3 skipped (up to date)" in _run(studies, out, capsys)
    assert (out / "studies" / "nii.npy").stat().st_mtime_ns == mtime
    assert pl.read_parquet(out / "index.parquet")["output_stat"].null_count() == 0
    np.save(out / "studies" / "nii.npy", np.zeros(PreparedCache(out).shape("nii"), np.int16))
    assert "1 prepared, 2 skipped (up to date)" in _run(studies, out, capsys)
