"""Issue 16, class 7: user errors of `fm3d prepare` are one line naming the file and the fix.

Each case runs the real command: an `--out` that is a file or lies under one, a manifest that
is a folder, an empty image path, a malformed labels.json beside the manifest. Each exits 2
with one line on stderr (no traceback) and writes nothing. Per-study problems (NaN in an
affine, an unreadable file) name the file in failures.parquet and the run goes on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest


def _one_line(run) -> str:
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert run.stderr.startswith("fm3d prepare: ") and run.stderr.count("\n") == 1, run.stderr
    assert "Traceback" not in run.stderr
    return run.stderr.strip()


@pytest.fixture
def manifest(tmp_path: Path, ct_file: Path) -> Path:
    path = tmp_path / "raw" / "m.csv"
    path.parent.mkdir()
    pl.DataFrame({"study_id": ["a"], "image_path": [str(ct_file)]}).write_csv(path)
    return path


def test_out_that_is_a_file_or_under_one(tmp_path: Path, manifest: Path, prepare_cli) -> None:
    file = tmp_path / "taken.txt"
    file.write_text("not a folder")
    line = _one_line(prepare_cli("--manifest", manifest, "--out", file))
    assert line == (
        f"fm3d prepare: {file}: is a file, so it cannot be a cache folder. Pass a folder path to --out"
    )
    line = _one_line(prepare_cli("--manifest", manifest, "--out", file / "sub" / "cache"))
    assert line == (
        f"fm3d prepare: {file / 'sub' / 'cache'}: lies under {file}, which is a file, so it cannot be a "
        "cache folder. Pass a folder path to --out"
    )
    assert file.read_text() == "not a folder"


def test_manifest_that_is_a_folder(tmp_path: Path, prepare_cli) -> None:
    line = _one_line(prepare_cli("--manifest", tmp_path, "--out", tmp_path / "cache"))
    assert (
        line
        == f"fm3d prepare: {tmp_path}: is a folder, not a manifest file. Pass the CSV or parquet file itself"
    )
    assert not (tmp_path / "cache").exists()


def test_empty_image_path(tmp_path: Path, ct_file: Path, prepare_cli) -> None:
    manifest = tmp_path / "m.parquet"
    pl.DataFrame({"study_id": ["a", "b", "c"], "image_path": [str(ct_file), "", "  "]}).write_parquet(
        manifest
    )
    line = _one_line(prepare_cli("--manifest", manifest, "--out", tmp_path / "cache"))
    assert line == (
        f"fm3d prepare: {manifest}: has an empty image_path in data rows [2, 3]. "
        "Fill image_path for every study"
    )


@pytest.mark.parametrize(
    ("text", "message"), [("{1: liver", "cannot be read as JSON"), ('["liver"]', "a JSON list")]
)
def test_malformed_labels_json(tmp_path: Path, manifest: Path, prepare_cli, text: str, message: str) -> None:
    labels = manifest.parent / "labels.json"
    labels.write_text(text)
    line = _one_line(prepare_cli("--manifest", manifest, "--out", tmp_path / "cache"))
    assert line.startswith(f"fm3d prepare: {labels}: ") and message in line, line
    assert not (tmp_path / "cache").exists(), "checked before any study is prepared"


def test_per_study_errors_name_the_file_and_the_run_goes_on(
    tmp_path: Path, ct_file: Path, prepare_cli
) -> None:
    import nibabel as nib

    voxels = np.asarray(nib.load(ct_file).dataobj)
    image = nib.Nifti1Image(voxels, np.diag([3.0, 3.0, 3.0, 1.0]))
    image.header.set_sform(np.diag([3.0, np.nan, 3.0, 1.0]), code=1)
    image.header.set_qform(None, code=0)
    nan_file = tmp_path / "nan_affine.nii"
    nan_file.write_bytes(image.header.binaryblock + b"\0" * 4 + voxels.tobytes(order="F"))
    manifest = tmp_path / "m.csv"
    pl.DataFrame({"study_id": ["nan", "ok"], "image_path": [str(nan_file), str(ct_file)]}).write_csv(manifest)
    run = prepare_cli("--manifest", manifest, "--out", tmp_path / "cache")
    assert run.returncode == 1 and "1 prepared, 0 skipped (up to date), 1 failed" in run.stdout
    assert "Traceback" not in run.stderr
    error = pl.read_parquet(tmp_path / "cache" / "failures.parquet")["error"][0]
    assert f"{nan_file}: has NaN or infinite values in its voxel-to-world affine" in error
