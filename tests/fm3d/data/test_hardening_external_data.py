"""Issue 16, class 1: a detached NRRD header may not make fm3d read a file outside its own folder.

Headers are written at test time around the real CT's voxels; the data file sits outside the
header's folder (absolute path, `../`, or a symlink leaving it), and only an explicit
argument from the caller (ReadLimits / --allow-external-data) lets the read go ahead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from fm3d.data.errors import VolumeReadError
from fm3d.data.io import read_volume, source_files
from fm3d.data.limits import ReadLimits


def _nhdr(header_dir: Path, data_file: str, shape: tuple[int, int, int]) -> Path:
    """A detached NRRD header for raw little-endian int16 voxels of `shape` (first axis fastest)."""
    header_dir.mkdir(parents=True, exist_ok=True)
    path = header_dir / "ct.nhdr"
    path.write_text(
        "NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
        f"sizes: {shape[0]} {shape[1]} {shape[2]}\n"
        "space directions: (3,0,0) (0,3,0) (0,0,3)\nspace origin: (0,0,0)\n"
        f"endian: little\nencoding: raw\ndata file: {data_file}\n\n"
    )
    return path


@pytest.fixture
def voxels(ct_file: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(ct_file).dataobj).astype("<i2")


def _write_raw(path: Path, voxels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(voxels.tobytes(order="F"))
    return path


def test_data_file_outside_the_header_folder_is_refused(tmp_path: Path, voxels: np.ndarray) -> None:
    outside = _write_raw(tmp_path / "elsewhere" / "secret.raw", voxels)
    cases = {
        "absolute": str(outside),
        "relative": "../elsewhere/secret.raw",
    }
    for name, data_file in cases.items():
        header = _nhdr(tmp_path / name, data_file, voxels.shape)
        for call in (read_volume, source_files):
            with pytest.raises(VolumeReadError) as info:
                call(header)
            message = str(info.value)
            assert message.startswith(f"{header}: names the data file"), message
            assert "secret.raw outside the header's folder" in message and "--allow-external-data" in message
    # A symlink beside the header that points out of the folder is the same escape.
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "data.raw").symlink_to(outside)
    with pytest.raises(VolumeReadError, match=r"data\.raw outside the header's folder"):
        read_volume(_nhdr(linked, "data.raw", voxels.shape))


def test_caller_may_allow_it_and_inside_data_reads(tmp_path: Path, voxels: np.ndarray) -> None:
    outside = _write_raw(tmp_path / "elsewhere" / "ct.raw", voxels)
    allowed = read_volume(
        _nhdr(tmp_path / "a", str(outside), voxels.shape), limits=ReadLimits(allow_external_data=True)
    )
    np.testing.assert_array_equal(allowed.array, voxels)
    _write_raw(tmp_path / "b" / "sub" / "ct.raw", voxels)
    inside = _nhdr(tmp_path / "b", "sub/ct.raw", voxels.shape)
    np.testing.assert_array_equal(read_volume(inside).array, voxels)
    assert source_files(inside) == [inside, tmp_path / "b" / "sub" / "ct.raw"]


def test_prepare_refuses_it_per_study_unless_the_flag_is_given(
    tmp_path: Path, voxels: np.ndarray, prepare_cli
) -> None:
    outside = _write_raw(tmp_path / "elsewhere" / "ct.raw", voxels)
    header = _nhdr(tmp_path / "raw", str(outside), voxels.shape)
    _write_raw(tmp_path / "raw" / "own.raw", voxels)
    good = _nhdr(tmp_path / "raw2", "../raw/own.raw", voxels.shape)  # leaves raw2/: refused too
    _write_raw(tmp_path / "raw3" / "own.raw", voxels)
    fine = _nhdr(tmp_path / "raw3", "own.raw", voxels.shape)
    manifest = tmp_path / "m.csv"
    pl.DataFrame(
        {"study_id": ["ext", "up", "ok"], "image_path": [str(header), str(good), str(fine)]}
    ).write_csv(manifest)
    out = tmp_path / "cache"
    refused = prepare_cli("--manifest", manifest, "--out", out)
    assert refused.returncode == 1, refused.stderr
    assert "1 prepared, 0 skipped (up to date), 2 failed" in refused.stdout
    failures = dict(pl.read_parquet(out / "failures.parquet").select("study_id", "error").iter_rows())
    assert f"{header}: names the data file {outside} outside the header's folder" in failures["ext"]
    assert "own.raw outside the header's folder" in failures["up"]
    assert sorted(p.name for p in out.rglob("*") if p.is_file() and p.suffix == ".npy") == ["ok.npy"]

    allowed = prepare_cli("--manifest", manifest, "--out", out, "--allow-external-data")
    assert allowed.returncode == 0, allowed.stderr
    assert "2 prepared, 1 skipped (up to date), 0 failed" in allowed.stdout
