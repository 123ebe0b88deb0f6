"""`fm3d prepare --shard i/n` then `--merge`: the merged cache equals one unsharded run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import polars as pl
import pytest

from fm3d.data.prepare_shards import SHARDS_DIR
from fm3d.sharding import Shard

IDS = ["ts", "ts_nolabel", "ge", "broken", "gone"]


@pytest.fixture
def manifest(shared_data: Path, tmp_path: Path) -> Path:
    """Real studies (a labelled NIfTI CT, a DICOM series) and two that fail, with a label-name map."""
    root = tmp_path / "raw"
    root.mkdir()
    ts = shared_data / "ct" / "totalsegmentator"
    shutil.copy(ts / "example_ct_sm.nii.gz", root / "ct.nii.gz")
    shutil.copy(ts / "example_seg.nii.gz", root / "seg.nii.gz")
    shutil.copytree(shared_data / "ct" / "dcmqi_ct3slice", root / "dicom")
    data = (ts / "example_ct_sm.nii.gz").read_bytes()
    (root / "broken.nii.gz").write_bytes(data[: len(data) // 3])
    (root / "labels.json").write_text(json.dumps({"1": "spleen", "2": "kidney_right"}))
    path = root / "manifest.csv"
    pl.DataFrame(
        {
            "study_id": IDS,
            "patient_id": ["p1", "p1", "p2", "p3", "p4"],
            "image_path": ["ct.nii.gz", "ct.nii.gz", "dicom", "broken.nii.gz", "missing.nii.gz"],
            "label_path": ["seg.nii.gz", None, "dicom/liver_spine_seg.nrrd", None, None],
            "report": ["Liver normal.", None, "Three slices.", "x", "y"],
        }
    ).write_csv(path)
    return path


def _arrays(cache: Path) -> dict[str, bytes]:
    return {
        str(path.relative_to(cache)): path.read_bytes()
        for folder in ("studies", "labels")
        for path in sorted((cache / folder).glob("*.npy"))
    }


def test_two_shards_merged_equal_one_run(manifest: Path, tmp_path: Path, prepare_main) -> None:
    owners = [[sid for sid in IDS if Shard(i, 2).owns(sid)] for i in range(2)]
    assert all(owners) and sorted(owners[0] + owners[1]) == sorted(IDS)  # both shards have work
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    assert prepare_main("--manifest", manifest, "--out", single).returncode == 1  # two studies fail

    for i in range(2):
        ran = prepare_main("--manifest", manifest, "--out", sharded, "--shard", f"{i}/2")
        assert f"shard {i}/2: " in ran.stdout and f"{SHARDS_DIR}/000{i}-of-0002" in ran.stdout
        index = pl.read_parquet(sharded / SHARDS_DIR / f"000{i}-of-0002" / "index.parquet")
        assert index["study_id"].to_list() == owners[i]
    assert not (sharded / "index.parquet").exists()
    merged = prepare_main("--manifest", manifest, "--out", sharded, "--merge")
    assert merged.returncode == 1, merged.stderr
    assert "merged 2 shards" in merged.stdout and "3 studies ready, 2 failed" in merged.stdout
    assert f"see {sharded / 'failures.parquet'}" in merged.stderr
    assert not (sharded / SHARDS_DIR).exists()

    assert _arrays(sharded) == _arrays(single) and len(_arrays(single)) == 5  # 3 images, 2 label maps
    # The index equals the single run's but for the arrays' mtimes, which each run records of its own.
    a, b = (pl.read_parquet(cache / "index.parquet").drop("output_stat") for cache in (single, sharded))
    assert a.equals(b) and a["study_id"].to_list() == IDS
    for name in ("failures.parquet", "labels.json"):
        assert (sharded / name).read_bytes() == (single / name).read_bytes()
    rerun = prepare_main("--manifest", manifest, "--out", sharded)  # the moved arrays are up to date
    assert "0 prepared, 3 skipped (up to date), 2 failed" in rerun.stdout


def test_rerunning_one_failed_task_redoes_only_its_shard(
    manifest: Path, tmp_path: Path, prepare_main
) -> None:
    out = tmp_path / "cache"
    shard = next(Shard(i, 2) for i in range(2) if Shard(i, 2).owns("gone"))
    owned = [sid for sid in IDS if shard.owns(sid)]
    first = prepare_main("--manifest", manifest, "--out", out, "--shard", str(shard))
    assert first.returncode == 1 and "failed" in first.stdout
    shutil.copy(manifest.parent / "ct.nii.gz", manifest.parent / "missing.nii.gz")  # the missing file arrives
    again = prepare_main("--manifest", manifest, "--out", out, "--shard", str(shard))
    failed = int("broken" in owned)
    assert f"1 prepared, {len(owned) - 1 - failed} skipped (up to date), {failed} failed" in again.stdout


def test_merge_refuses_missing_unfinished_or_mismatched_shards(
    manifest: Path, tmp_path: Path, prepare_main
) -> None:
    out = tmp_path / "cache"
    nothing = prepare_main("--manifest", manifest, "--out", out, "--merge")
    assert nothing.returncode == 2 and "holds no shards" in nothing.stderr

    prepare_main("--manifest", manifest, "--out", out, "--shard", "0/2")
    lacking = prepare_main("--manifest", manifest, "--out", out, "--merge")
    assert lacking.returncode == 2 and "lacks shard(s) 1/2" in lacking.stderr

    prepare_main("--manifest", manifest, "--out", out, "--shard", "1/2", "--spacing", "2", "2", "2")
    mismatched = prepare_main("--manifest", manifest, "--out", out, "--merge")
    assert mismatched.returncode == 2 and "prepared with other settings" in mismatched.stderr
    assert "same --spacing and --hu-window" in mismatched.stderr

    shutil.rmtree(out / SHARDS_DIR / "0001-of-0002")
    prepare_main("--manifest", manifest, "--out", out, "--shard", "1/2")
    grown = pl.read_csv(manifest)
    new_id = next(f"new{i}" for i in range(100) if Shard(0, 2).owns(f"new{i}"))
    grown = pl.concat([grown, grown.head(1).with_columns(study_id=pl.lit(new_id))])
    grown.write_csv(manifest)
    unfinished = prepare_main("--manifest", manifest, "--out", out, "--merge")
    assert unfinished.returncode == 2
    assert "has no result for 1 of its" in unfinished.stderr and f"e.g. {new_id}" in unfinished.stderr
    assert "Run `fm3d prepare --shard 0/2` again" in unfinished.stderr
    assert (out / SHARDS_DIR).is_dir() and not (out / "index.parquet").exists()  # nothing half-merged

    prepare_main("--manifest", manifest, "--out", out, "--shard", "0/3")
    mixed = prepare_main("--manifest", manifest, "--out", out, "--merge")
    assert mixed.returncode == 2 and "splits into 2 and 3 parts" in mixed.stderr


@pytest.mark.parametrize(
    ("flag", "message"),
    [("2/2", "shard 2/2 does not exist"), ("one/2", "expected I/N (e.g. 0/4), got 'one/2'")],
)
def test_a_bad_shard_flag_is_refused(
    flag: str, message: str, manifest: Path, tmp_path: Path, prepare_cli
) -> None:
    ran = prepare_cli("--manifest", manifest, "--out", tmp_path / "cache", "--shard", flag)
    assert ran.returncode == 2 and message in ran.stderr
    both = prepare_cli("--manifest", manifest, "--out", tmp_path / "cache", "--shard", "0/2", "--merge")
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
