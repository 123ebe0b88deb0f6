"""slurm/prepare.sbatch on the local SLURM cluster: 2 array tasks and a dependent merge equal one run."""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest

pytestmark = pytest.mark.slow


def test_an_array_of_two_shards_and_a_merge_job_equal_one_prepare(
    slurm, shared_data: Path, tmp_path: Path, prepare_main
) -> None:
    ts = shared_data / "ct" / "totalsegmentator"
    shutil.copy(ts / "example_ct_sm.nii.gz", tmp_path / "ct.nii.gz")
    shutil.copy(ts / "example_seg.nii.gz", tmp_path / "seg.nii.gz")
    shutil.copytree(shared_data / "ct" / "dcmqi_ct3slice", tmp_path / "dicom")
    pl.DataFrame(
        {
            "study_id": ["ts", "ts_nolabel", "ge", "ts_again"],
            "image_path": ["ct.nii.gz", "ct.nii.gz", "dicom", "ct.nii.gz"],
            "label_path": ["seg.nii.gz", None, "dicom/liver_spine_seg.nrrd", "seg.nii.gz"],
        }
    ).write_csv(tmp_path / "manifest.csv")
    args = ["--manifest", "manifest.csv", "--out", "cache", "--spacing", "3", "2", "2"]

    array = slurm.submit("prepare.sbatch", ["--array=0-1"], tmp_path, *args)
    merge = slurm.submit("prepare.sbatch", [f"--dependency=afterok:{array}"], tmp_path, *args, "--merge")

    def logs() -> str:
        return "".join(p.read_text() for p in tmp_path.glob("job-*.out"))

    for task in range(2):
        assert slurm.wait_finished(f"{array}_{task}", 300, tmp_path / "job-x.out") == "COMPLETED", logs()
    assert slurm.wait_finished(merge, 300, tmp_path / f"job-{merge}.out") == "COMPLETED", logs()
    assert "shard 0/2" in logs() and "shard 1/2" in logs() and "merged 2 shards" in logs()

    single = tmp_path / "single"
    assert prepare_main("--manifest", tmp_path / "manifest.csv", "--out", single, *args[4:]).returncode == 0
    merged = tmp_path / "cache"
    assert not (merged / "shards").exists()
    files = sorted(p.relative_to(single) for p in single.rglob("*.npy"))
    assert len(files) == 7 and files == sorted(p.relative_to(merged) for p in merged.rglob("*.npy"))
    assert all((merged / f).read_bytes() == (single / f).read_bytes() for f in files)
    a, b = (pl.read_parquet(cache / "index.parquet").drop("output_stat") for cache in (single, merged))
    assert a.equals(b)
