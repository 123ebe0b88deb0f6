"""`fm3d ehr labels --shard i/n` then `--merge` on the real MIMIC-IV demo: byte for byte one run."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from ehr.cli import main
from ehr.label_shards import shard_file
from fm3d.sharding import Shard

EXAMPLE_PHENOTYPES = Path(__file__).resolve().parents[2] / "conf" / "ehr" / "phenotypes_example.yaml"


@pytest.fixture
def labels_args(shared_data: Path, admission_studies, tmp_path: Path) -> list[str]:
    """`fm3d ehr labels` arguments over the real admissions, plus a study of an unknown subject."""
    meds = shared_data / "ehr" / "mimic_iv_demo_meds"
    studies = admission_studies(pl.scan_parquet(meds / "data" / "*" / "*.parquet"))
    studies = pl.concat(
        [studies, studies.head(1).with_columns(subject_id=pl.lit(1, pl.Int64), study_id=pl.lit("ghost"))]
    )
    studies.write_parquet(tmp_path / "studies.parquet")
    return ["labels", "--meds", str(meds), "--studies", str(tmp_path / "studies.parquet"),
            "--tasks-k", "8", "--phenotypes", str(EXAMPLE_PHENOTYPES)]  # fmt: skip


def test_three_subject_shards_merged_equal_one_run_byte_for_byte(
    labels_args: list[str], tmp_path: Path, capsys
) -> None:
    single, sharded = tmp_path / "single.parquet", tmp_path / "sharded" / "labels.parquet"
    assert main([*labels_args, "--out", str(single)]) == 0
    studies = pl.read_parquet(tmp_path / "studies.parquet")
    for i in range(3):
        assert main([*labels_args, "--out", str(sharded), "--shard", f"{i}/3"]) == 0
        part = pl.read_parquet(shard_file(sharded, Shard(i, 3)))
        owned = studies.filter(pl.col("subject_id").map_elements(lambda s, i=i: Shard(i, 3).owns(str(s))))
        assert part["study_id"].to_list() == owned["study_id"].to_list() and part.height > 0
    assert not sharded.exists()
    capsys.readouterr()
    assert main([*labels_args, "--out", str(sharded), "--merge"]) == 0
    assert f"wrote {sharded}" in capsys.readouterr().out
    assert sharded.read_bytes() == single.read_bytes()
    assert Path(f"{sharded}.json").read_bytes() == Path(f"{single}.json").read_bytes()
    assert not sharded.with_name("labels.parquet.shards").exists()


def test_merge_refuses_a_missing_shard_and_shards_of_other_settings(
    labels_args: list[str], tmp_path: Path, capsys
) -> None:
    out = str(tmp_path / "labels.parquet")
    assert main([*labels_args, "--out", out, "--shard", "0/2"]) == 0
    capsys.readouterr()
    assert main([*labels_args, "--out", out, "--merge"]) == 2
    assert "lacks shard(s) 1/2" in capsys.readouterr().err

    assert main([*labels_args, "--out", out, "--shard", "1/2", "--window-days", "30", "0"]) == 0
    capsys.readouterr()
    assert main([*labels_args, "--out", out, "--merge"]) == 2
    error = capsys.readouterr().err
    assert "0001-of-0002.parquet: was built with other window_days than shard 0/2" in error

    assert main([*labels_args, "--out", out, "--shard", "1/2"]) == 0
    fewer = tmp_path / "fewer.parquet"
    pl.read_parquet(tmp_path / "studies.parquet").head(10).write_parquet(fewer)
    merge_fewer = [*labels_args[:3], "--studies", str(fewer), *labels_args[5:]]
    capsys.readouterr()
    assert main([*merge_fewer, "--out", out, "--merge"]) == 2
    error = capsys.readouterr().err
    assert "does not hold the studies of --studies" in error and "studies not in the table (e.g." in error
