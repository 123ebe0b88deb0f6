"""Fixtures of the dataset-adapter tests: the real CT, label map and CT-RATE reports, and `fm3d prepare`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fm3d.data.prepare import main as prepare_main


@pytest.fixture
def ct_file(shared_data: Path) -> Path:
    """The real TotalSegmentator CT (122 x 101 x 30 voxels, 3 mm, RAS, int16 HU), read only."""
    return shared_data / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"


@pytest.fixture
def seg_file(shared_data: Path) -> Path:
    """TotalSegmentator's own uint8 label map of `ct_file` (values as labels_total_v2.tsv)."""
    return shared_data / "ct" / "totalsegmentator" / "example_seg.nii.gz"


@pytest.fixture
def ct_rate_reports(shared_data: Path) -> Path:
    """1,211 real CT-RATE validation reports (VolumeName, Findings_EN, Impressions_EN)."""
    return shared_data / "reports" / "ct_rate" / "validation_reports_subset.csv"


def _tiny_ct(path: Path, shape: tuple[int, int, int] = (12, 10, 6)) -> None:
    array = np.full(shape, -1000, np.int16)
    array[3:9, 3:7, 1:5] = 40
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([3.0, 3.0, 3.0, 1.0])), path)


@pytest.fixture
def tiny_ct() -> Callable[..., None]:
    """Writes a small int16 NIfTI at 3 mm (air around a soft-tissue block), for volumes whose content
    a test does not look at: `tiny_ct(path, shape=(12, 10, 6))`."""
    return _tiny_ct


@pytest.fixture
def run_prepare(capsys) -> Callable[[Path, Path], int]:
    """Runs the real `fm3d prepare` entry point on a manifest at 3 mm; returns its exit status."""

    def run(manifest: Path, cache: Path) -> int:
        status = prepare_main(
            ["--manifest", str(manifest), "--out", str(cache), "--spacing", "3", "3", "3", "--no-progress"]
        )
        capsys.readouterr()
        return status

    return run
