"""MEDSDataset on the real MIMIC-IV demo, a MEDS 0.4-style folder, and broken inputs."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from ehr.errors import MEDSFormatError
from ehr.meds import MEDSDataset
from ehr.validity import ValidityPolicy


def write_meds(root: Path, frames: dict[str, pl.DataFrame], version: str = "0.4.1") -> Path:
    """A MEDS folder with the given data shards (name -> frame) and minimal metadata."""
    for name, frame in frames.items():
        path = root / "data" / f"{name}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
    (root / "metadata").mkdir(exist_ok=True)
    (root / "metadata" / "dataset.json").write_text(json.dumps({"meds_version": version}))
    return root


def events(**overrides) -> pl.DataFrame:
    frame = pl.DataFrame(
        {
            "subject_id": [1, 1, 1, 2, 2],
            "time": [
                None,
                datetime(2020, 1, 1),
                datetime(2020, 1, 5),
                datetime(2021, 3, 1),
                datetime(2021, 3, 2),
            ],
            "code": ["GENDER//F", "A", "B", "A", "C"],
        },
        schema_overrides={"time": pl.Datetime("us")},
    )
    return frame.with_columns(**overrides) if overrides else frame


def test_mimic_demo_opens_and_filters(shared_data):
    dataset = MEDSDataset(shared_data / "ehr" / "mimic_iv_demo_meds")
    assert dataset.meds_version == "0.3.3"
    assert len(dataset.files) == 3
    all_events = dataset.events().collect()
    assert all_events.height == 916_166
    assert all_events.schema["numeric_value"] == pl.Float32
    assert all_events["code"].n_unique() == 7_035
    # subject and time filters agree with filtering the full table
    subject = all_events["subject_id"][0]
    start, end = datetime(2150, 1, 1), datetime(2170, 1, 1)
    got = dataset.events(subjects=[subject], start=start, end=end).collect()
    expected = all_events.filter(
        (pl.col("subject_id") == subject) & (pl.col("time") >= start) & (pl.col("time") < end)
    )
    assert got.equals(expected)
    splits = dataset.splits().collect()
    assert splits.height == 100 and set(splits["split"]) == {"train", "tuning", "held_out"}
    codes = dataset.codes().collect()
    assert {"code", "description", "parent_codes"} <= set(codes.columns)
    extra = dataset.events(columns=("subject_id", "hadm_id")).collect()
    assert extra.height == 916_166


def test_meds_04_layout_without_numeric_value(tmp_path):
    # MEDS 0.4 lets numeric_value be omitted and codes.parquet carry only `code`;
    # float64 values and millisecond timestamps are cast to MEDS's float32 / microseconds.
    shard = events().with_columns(pl.col("time").cast(pl.Datetime("ms")))
    other = events(subject_id=pl.col("subject_id") + 10, numeric_value=pl.lit(1.5, dtype=pl.Float64))
    root = write_meds(tmp_path, {"a/0": shard, "b/0": other})
    pl.DataFrame({"code": ["A", "B", "C"]}).write_parquet(root / "metadata" / "codes.parquet")
    dataset = MEDSDataset(root)
    table = dataset.events().collect()
    assert table.schema["time"] == pl.Datetime("us") and table.schema["numeric_value"] == pl.Float32
    assert table.height == 10 and table["numeric_value"].null_count() == 5
    assert table["text_value"].null_count() == 10
    codes = dataset.codes().collect()
    assert codes["parent_codes"].null_count() == 3


def test_missing_column_names_file_and_column(tmp_path):
    root = write_meds(tmp_path, {"0": events().drop("code")})
    with pytest.raises(MEDSFormatError, match=r"0\.parquet: missing required MEDS column `code`"):
        MEDSDataset(root)


def test_wrong_dtype_names_file_and_column(tmp_path):
    root = write_meds(tmp_path, {"0": events(subject_id=pl.col("subject_id").cast(pl.String))})
    with pytest.raises(
        MEDSFormatError, match=r"0\.parquet: column `subject_id` has dtype String, MEDS needs int64"
    ):
        MEDSDataset(root)
    root = write_meds(tmp_path / "b", {"0": events(numeric_value=pl.lit("x"))})
    with pytest.raises(MEDSFormatError, match="column `numeric_value` has dtype String"):
        MEDSDataset(root)


def test_unsorted_times_name_the_file(tmp_path):
    shard = events()
    unsorted = pl.concat([shard[:1], shard[2:3], shard[1:2], shard[3:]])
    root = write_meds(tmp_path, {"good": shard.with_columns(pl.col("subject_id") + 100), "bad": unsorted})
    with pytest.raises(
        MEDSFormatError, match=r"bad\.parquet: events are not sorted by time within a subject"
    ):
        MEDSDataset(root)
    static_last = pl.concat([shard[1:3], shard[:1], shard[3:]])
    root = write_meds(tmp_path / "s", {"0": static_last})
    with pytest.raises(MEDSFormatError, match="not sorted by time"):
        MEDSDataset(root)
    interleaved = pl.concat([shard[:2], shard[3:4], shard[2:3], shard[4:]])
    root = write_meds(tmp_path / "i", {"0": interleaved})
    with pytest.raises(MEDSFormatError, match="not sorted by subject"):
        MEDSDataset(root)
    assert MEDSDataset(root, check_sorted=False).events().collect().height == 5


def test_not_a_meds_folder(tmp_path):
    with pytest.raises(MEDSFormatError, match="has no data/ folder"):
        MEDSDataset(tmp_path)
    old = events().rename({"subject_id": "patient_id"})
    root = write_meds(tmp_path / "old", {"0": old})
    with pytest.raises(MEDSFormatError, match="rename patient_id to subject_id"):
        MEDSDataset(root)


def test_garbage_shard_is_named_with_the_fix(demo_meds):
    garbage = demo_meds / "data" / "train" / "1.parquet"
    garbage.write_bytes(b"this is not parquet at all" * 10)
    with pytest.raises(
        MEDSFormatError, match=r"train/1\.parquet: is not a readable parquet file .*write it again"
    ):
        MEDSDataset(demo_meds)


@pytest.mark.parametrize(
    ("content", "named"),
    [
        ('{"meds_version": "0.3.3"', r"is not valid JSON"),
        ("[1, 2]", r"holds a JSON list, not an object"),
        ('{"meds_version": 3}', r"`meds_version` is 3, not a string"),
        (b"\xff\xfe\x00garbage", r"is not valid JSON"),
    ],
)
def test_malformed_dataset_json_is_named(demo_meds, content, named):
    path = demo_meds / "metadata" / "dataset.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(MEDSFormatError, match=rf"metadata/dataset\.json: {named}"):
        MEDSDataset(demo_meds)


def test_null_codes_and_sentinel_dates_are_refused_with_counts(damaged_meds):
    with pytest.raises(
        MEDSFormatError,
        match=r"meds: 5 unusable events: 3 null code \(e\.g\. data/tuning/0\.parquet\), 2 time outside years "
        r"\(1800, 2300\) \(e\.g\. 9999-12-31 00:00:00 in data/tuning/0\.parquet\)\. .*--drop-invalid "
        r"\(drop_invalid=True\); --valid-years MIN MAX",
    ):
        MEDSDataset(damaged_meds)


def test_dropping_unusable_events_is_explicit_and_counted(damaged_meds, shared_data):
    clean = MEDSDataset(shared_data / "ehr" / "mimic_iv_demo_meds").events().collect()
    dataset = MEDSDataset(damaged_meds, policy=ValidityPolicy(drop_invalid=True))
    assert dataset.dropped == {"null code": 3, "time outside years (1800, 2300)": 2}
    kept = dataset.events().collect()
    assert kept.height == clean.height - 5
    assert kept["code"].null_count() == 0 and kept["time"].max() < datetime(9999, 1, 1)
    # A narrower range counts the real data's own early dates too (MIMIC's 2030 rows).
    with pytest.raises(MEDSFormatError, match=r"time outside years \(2100, 2300\)"):
        MEDSDataset(
            shared_data / "ehr" / "mimic_iv_demo_meds", policy=ValidityPolicy(valid_years=(2100, 2300))
        )
