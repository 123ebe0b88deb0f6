"""slurm/ehr-labels.sbatch on the local SLURM cluster: 2 array tasks and a merge job equal one run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ehr.cli import main

pytestmark = pytest.mark.slow


def test_an_array_of_two_shards_and_a_merge_job_write_one_runs_bytes(
    slurm, shared_data: Path, admission_studies, tmp_path: Path
) -> None:
    meds = shared_data / "ehr" / "mimic_iv_demo_meds"
    admission_studies(pl.scan_parquet(meds / "data" / "*" / "*.parquet")).write_parquet(
        tmp_path / "studies.parquet"
    )
    (tmp_path / "tasks.txt").write_text("MEDS_DEATH\nHOSPITAL_DISCHARGE//HOME\n")
    args = ["--meds", str(meds), "--studies", "studies.parquet", "--tasks-file", "tasks.txt",
            "--out", "labels.parquet"]  # fmt: skip

    array = slurm.submit("ehr-labels.sbatch", ["--array=0-1"], tmp_path, *args)
    merge = slurm.submit("ehr-labels.sbatch", [f"--dependency=afterok:{array}"], tmp_path, *args, "--merge")

    def logs() -> str:
        return "".join(p.read_text() for p in tmp_path.glob("job-*.out"))

    for task in range(2):
        assert slurm.wait_finished(f"{array}_{task}", 300, tmp_path / "job-x.out") == "COMPLETED", logs()
    assert slurm.wait_finished(merge, 300, tmp_path / f"job-{merge}.out") == "COMPLETED", logs()
    assert "shard 0/2" in logs() and "shard 1/2" in logs()

    single = tmp_path / "single.parquet"
    in_tmp = [str(tmp_path / a) if a in ("studies.parquet", "tasks.txt") else a for a in args[:-1]]
    assert main(["labels", *in_tmp, str(single)]) == 0
    assert (tmp_path / "labels.parquet").read_bytes() == single.read_bytes()
    assert not (tmp_path / "labels.parquet.shards").exists()
