"""Issue 16, class 3: what a file declares is bounded before fm3d allocates or reads it.

Headers that claim terabytes over a tiny body, a gzip bomb under a small NRRD header, a DICOM
slice claiming 65535 x 65535 pixels and a spacing that would resample into a 14 GiB grid are
each read in a child process that reports its own peak memory (VmHWM of /proc/self/status:
the peak of the child's own address space since exec; ru_maxrss would also count the pytest
process it was forked from), which must stay far below what the header asked for. FIFOs and
devices are refused without blocking, and a folder's format is checked before anything in it
is hashed (a 1 TiB sparse file would take minutes to hash).
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
import polars as pl
import pydicom
import pytest

from fm3d.data.errors import VolumeReadError
from fm3d.data.io import read_volume

# What a child that imports fm3d's readers (and, for prepare, torch) may peak at.
READER_PEAK_MIB = 400
PREPARE_PEAK_MIB = 1500

_PEAK_MIB = "int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')).split()[1]) / 1024"
_CHILD = f"""
import json, sys
from fm3d.data.errors import VolumeReadError
from fm3d.data.io import read_volume
messages = []
for path in sys.argv[1:]:
    try:
        read_volume(path)
        messages.append(None)
    except VolumeReadError as exc:
        messages.append(str(exc))
print(json.dumps({{"messages": messages, "peak_mib": {_PEAK_MIB}}}))
"""


def _read_in_child(paths: list[Path]) -> tuple[list[str | None], float]:
    """read_volume of each path in one fresh process: (error messages or None, its peak RSS in MiB)."""
    run = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, paths)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result["messages"], result["peak_mib"]


def _nifti_header(shape: tuple[int, int, int], dtype=np.int16) -> bytes:
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header.set_sform(np.diag([1.0, 1.0, 1.0, 1.0]), code=1)
    header.set_data_offset(352)
    return header.binaryblock + b"\0" * 4


def _gzip_of_zeros(n_bytes: int) -> bytes:
    """A gzip stream of n_bytes zeros, built in 1 MiB steps so this process never holds them."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    zeros = bytes(1 << 20)
    return b"".join(packer.compress(zeros) for _ in range(n_bytes >> 20)) + packer.flush()


def test_headers_claiming_more_than_budget_or_file(tmp_path: Path, shared_data: Path) -> None:
    claims = tmp_path / "claims"
    claims.mkdir()
    huge = (32767, 32767, 32767)  # 64 TiB of int16
    (claims / "tera.nii.gz").write_bytes(gzip.compress(_nifti_header(huge) + b"\0" * 1024))
    (claims / "tera.nii").write_bytes(_nifti_header(huge) + b"\0" * 1024)
    (claims / "short.nii").write_bytes(_nifti_header((512, 512, 200)) + b"\0" * 1024)  # 100 MiB claimed
    (claims / "tera.nrrd").write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 65535 65535 65535\n"
        b"space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: raw\n\n" + b"\0" * 1024
    )
    bomb = _gzip_of_zeros(1 << 28)  # 256 MiB of zeros in about 256 KiB
    (claims / "bomb.nrrd").write_bytes(
        b"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: 10 10 10\n"
        b"space directions: (1,0,0) (0,1,0) (0,0,1)\nendian: little\nencoding: gzip\n\n" + bomb
    )
    slice_ = pydicom.dcmread(shared_data / "ct" / "dcmqi_ct3slice" / "01.dcm")
    slice_.Rows = slice_.Columns = 65535  # 8 GiB of int16 declared; the pixel data stays 512 KiB
    slice_.save_as(claims / "wide.dcm")

    expected = {
        "tera.nii.gz": "declares a volume of shape (32767, 32767, 32767) needing 64.0 TiB, over the memory "
        "budget of 8.0 GiB",
        "tera.nii": "needing 64.0 TiB, over the memory budget",
        "short.nii": "is truncated or corrupt: its header declares 100.0 MiB of voxel data but the file "
        "holds only 1.0 KiB",
        "tera.nrrd": "needing 512.0 TiB, over the memory budget",
        "bomb.nrrd": "is truncated or corrupt: it holds more than 2000 bytes of gzip voxel data where its "
        "header declares 2000",
        "wide.dcm": "declares a volume of shape (1, 65535, 65535) needing 24.0 GiB, over the memory budget",
    }
    messages, peak_mib = _read_in_child([claims / name for name in expected])
    for (name, text), message in zip(expected.items(), messages, strict=True):
        assert message is not None and message.startswith(f"{claims / name}: "), (name, message)
        assert text in message, (name, message)
    assert peak_mib < READER_PEAK_MIB, f"the child peaked at {peak_mib:.0f} MiB"


def test_resampled_grid_is_checked_before_it_is_allocated(tmp_path: Path, ct_file: Path) -> None:
    """A 40 mm spacing (plausible, but coarse) resampled to 1.5 mm would be a 14 GiB float32 grid."""
    image = nib.load(ct_file)
    nib.save(
        nib.Nifti1Image(np.asarray(image.dataobj), np.diag([40.0, 40.0, 40.0, 1.0])),
        tmp_path / "coarse.nii.gz",
    )
    pl.DataFrame({"study_id": ["coarse"], "image_path": ["coarse.nii.gz"]}).write_csv(tmp_path / "m.csv")
    out = tmp_path / "cache"
    script = (
        "import json\nfrom fm3d.cli import main\n"
        f"code = main(['prepare', '--manifest', {str(tmp_path / 'm.csv')!r}, '--out', {str(out)!r}, "
        "'--no-progress'])\n"
        f"peak_mib = {_PEAK_MIB}\n"
        "print(json.dumps({'code': code, 'peak_mib': peak_mib}))"
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["code"] == 1, run.stderr
    assert result["peak_mib"] < PREPARE_PEAK_MIB, result
    error = pl.read_parquet(out / "failures.parquet")["error"][0]
    assert f"{tmp_path / 'coarse.nii.gz'}: declares a resampled grid at [3.0, 1.5, 1.5] mm of shape" in error
    assert "over the memory budget of 8.0 GiB" in error and "--max-gib" in error


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_fifos_and_devices_are_refused_without_blocking(
    tmp_path: Path, ct_file: Path, prepare_cli, kind: str
) -> None:
    if kind == "fifo":
        special = tmp_path / "image.nii.gz"
        os.mkfifo(special)  # opening it for reading would wait for a writer for ever
    else:
        special = Path("/dev/zero")  # reading it never ends
    with pytest.raises(
        VolumeReadError, match=f"{special}: is a {'FIFO' if kind == 'fifo' else 'device'}, not a regular"
    ):
        read_volume(special)
    manifest = tmp_path / "m.csv"
    pl.DataFrame(
        {"study_id": ["special", "label", "fine"], "image_path": [str(special), str(ct_file), str(ct_file)],
         "label_path": [None, str(special), None]}
    ).write_csv(manifest)  # fmt: skip
    run = prepare_cli("--manifest", manifest, "--out", tmp_path / "cache", timeout=120)
    assert run.returncode == 1, run.stderr
    assert "1 prepared, 0 skipped (up to date), 2 failed" in run.stdout
    errors = pl.read_parquet(tmp_path / "cache" / "failures.parquet")["error"].to_list()
    assert all(f"{special}: is a" in e for e in errors), errors


def test_format_is_checked_before_a_folder_is_hashed(tmp_path: Path, dicom_series: Path, prepare_cli) -> None:
    """Folders holding a 1 TiB sparse file: hashing it takes many minutes, checking its format does not."""
    junk = tmp_path / "not_dicom"
    junk.mkdir()
    with (junk / "disk.img").open("wb") as f:
        f.truncate(1 << 40)
    series = tmp_path / "series"
    series.mkdir()
    for file in dicom_series.glob("*.dcm"):
        (series / file.name).write_bytes(file.read_bytes())
    with (series / "disk.img").open("wb") as f:
        f.truncate(1 << 40)
    manifest = tmp_path / "m.csv"
    pl.DataFrame({"study_id": ["junk", "series"], "image_path": [str(junk), str(series)]}).write_csv(manifest)
    run = prepare_cli("--manifest", manifest, "--out", tmp_path / "cache", timeout=120)
    assert run.returncode == 1, run.stderr
    assert "1 prepared, 0 skipped (up to date), 1 failed" in run.stdout
    failures = pl.read_parquet(tmp_path / "cache" / "failures.parquet")
    assert failures["study_id"].to_list() == ["junk"]
    assert f"{junk}: holds no DICOM files" in failures["error"][0]
