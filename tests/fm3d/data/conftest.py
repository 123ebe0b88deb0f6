"""Fixtures of the data tests: the real CT files as seeds, and a real `fm3d prepare` subprocess."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def ct_file(shared_data: Path) -> Path:
    """The real TotalSegmentator CT (122 x 101 x 30 voxels, 3 mm, int16), read only."""
    return shared_data / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"


@pytest.fixture
def dicom_series(shared_data: Path) -> Path:
    """The real 3-slice GE CT series (with its NRRD labels beside it), read only."""
    return shared_data / "ct" / "dcmqi_ct3slice"


def _run_prepare(*args: str | Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "fm3d.cli", "prepare", *map(str, args), "--no-progress"]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def prepare_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs the real `fm3d prepare` command in a child process: `prepare_cli("--manifest", m, "--out", o)`."""
    return _run_prepare


@pytest.fixture
def prepare_main(capsys) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs `fm3d prepare`'s real entry point in this process (no interpreter start-up), returning
    its exit status and printed output like `prepare_cli`."""

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        from fm3d.data.prepare import main

        capsys.readouterr()
        code = main([*map(str, args), "--no-progress"])
        printed = capsys.readouterr()
        return subprocess.CompletedProcess(list(args), code, printed.out, printed.err)

    return run


def write_nifti_cohort(folder: Path, studies: int = 4, shape: tuple[int, int, int] = (24, 20, 16)) -> Path:
    """Real tiny NIfTI CTs (int16 HU ramps plus noise, 1.5 mm voxels) and their manifest; returns it."""
    import nibabel as nib
    import numpy as np
    import polars as pl

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(studies):
        hu = np.linspace(-1200, 1500, int(np.prod(shape))).reshape(shape) + rng.normal(0, 50, shape)
        path = folder / f"ct{i}.nii.gz"
        nib.save(nib.Nifti1Image(hu.astype(np.int16), np.diag([1.5, 1.5, 1.5, 1.0])), path)
        rows.append({"study_id": f"ct{i}", "patient_id": f"p{i}", "image_path": str(path)})
    manifest = folder / "manifest.csv"
    pl.DataFrame(rows).write_csv(manifest)
    return manifest
