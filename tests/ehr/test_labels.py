"""Study labels on the real MIMIC-IV demo (vs an independent polars computation) and a hand case."""

from __future__ import annotations

import json
import math
from datetime import datetime

import numpy as np
import polars as pl
import pytest

from ehr.errors import StudyTableError, TaskSpecError
from ehr.labels import build_study_labels, read_label_description, write_study_labels
from ehr.meds import MEDSDataset
from ehr.studies import read_studies
from ehr.vocab import select_tasks

PHENOTYPES = {
    "hypertension": ["DIAGNOSIS//ICD//10//I10", "DIAGNOSIS//ICD//9//401"],
    "diabetes": ["DIAGNOSIS//ICD//10//E11", "DIAGNOSIS//ICD//9//250"],
    "kidney": ["DIAGNOSIS//ICD//10//N18", "DIAGNOSIS//ICD//9//585"],
}


@pytest.fixture(scope="module")
def demo(shared_data):
    return MEDSDataset(shared_data / "ehr" / "mimic_iv_demo_meds")


def reference_labels(dataset, studies, tasks, phenotypes, before, after):
    """Brute force: every (study, event) pair of the subject, then filter and aggregate."""
    events = (
        dataset.events().filter(pl.col("time").is_not_null()).select("subject_id", "time", "code").collect()
    )
    pairs = studies.join(events, on="subject_id")
    last = events.group_by("subject_id").agg(last=pl.col("time").max())
    n, k = studies.height, len(tasks)
    index = {s: i for i, s in enumerate(studies["study_id"])}
    times = np.zeros((n, k))
    flags = np.zeros((n, k), dtype=bool)
    censor = studies.join(last, on="subject_id")
    for row in censor.iter_rows(named=True):
        times[index[row["study_id"]]] = (row["last"] - row["study_time"]).total_seconds() / 86400
    firsts = (
        pairs.filter(pl.col("code").is_in(tasks) & (pl.col("time") > pl.col("study_time")))
        .group_by("study_id", "code")
        .agg(first=pl.col("time").min(), study_time=pl.col("study_time").first())
    )
    for row in firsts.iter_rows(named=True):
        i, j = index[row["study_id"]], tasks.index(row["code"])
        times[i, j] = (row["first"] - row["study_time"]).total_seconds() / 86400
        flags[i, j] = True
    multi_hot = np.zeros((n, len(phenotypes)))
    in_window = pairs.filter(
        (pl.col("time") >= pl.col("study_time") - pl.duration(days=before))
        & (pl.col("time") <= pl.col("study_time") + pl.duration(days=after))
    )
    for g, prefixes in enumerate(phenotypes.values()):
        hit = in_window.filter(pl.any_horizontal(pl.col("code").str.starts_with(p) for p in prefixes))
        for study in hit["study_id"].unique():
            multi_hot[index[study], g] = 1
    return times, flags, multi_hot


def test_admission_labels_match_independent_computation(demo, admission_studies):
    studies = admission_studies(demo.events())
    assert studies.height == 275  # hospital admissions in the demo
    tasks = [*select_tasks(demo, 12)["code"].to_list(), "MEDS_DEATH", "HOSPITAL_DISCHARGE//HOME"]
    labels = build_study_labels(demo, studies, tasks, PHENOTYPES, window_days=(365, 30))
    assert labels["study_id"].to_list() == studies["study_id"].to_list()
    assert labels["has_ehr"].all()
    times, flags, multi_hot = reference_labels(demo, studies, tasks, PHENOTYPES, 365, 30)
    got_times = np.stack(labels["tte_time"].to_numpy())
    got_flags = np.stack(labels["tte_event"].to_numpy())
    got_hot = np.stack(labels["phenotype"].to_numpy())
    assert got_times.shape == (275, len(tasks)) and got_hot.shape == (275, 3)
    np.testing.assert_array_equal(got_flags, flags)
    np.testing.assert_allclose(got_times, times, rtol=1e-6, atol=1e-4)  # float32 days
    np.testing.assert_array_equal(got_hot, multi_hot)
    # The data are not trivial: deaths, discharges, censoring and phenotypes all occur.
    death = tasks.index("MEDS_DEATH")
    assert 0 < got_flags[:, death].sum() < 275
    assert got_flags[:, tasks.index("HOSPITAL_DISCHARGE//HOME")].sum() > 50
    assert got_hot.sum(0).min() > 0 and got_hot.sum(0).max() < 275
    assert (got_times >= 0).all()


def test_written_labels_carry_their_meaning(demo, admission_studies, tmp_path):
    studies = admission_studies(demo.events()).head(40)
    tasks = ["MEDS_DEATH", "HOSPITAL_DISCHARGE//HOME"]
    labels = build_study_labels(demo, studies, tasks, PHENOTYPES)
    out = tmp_path / "labels.parquet"
    description = write_study_labels(labels, out, tasks=tasks, phenotypes=PHENOTYPES, window_days=(365, 30))
    assert (
        read_label_description(out)
        == json.loads((tmp_path / "labels.parquet.json").read_text())
        == description
    )
    assert description["tasks"] == tasks and description["phenotype_groups"] == list(PHENOTYPES)
    edges = description["suggested_bin_edges_days"]
    assert edges[0] == 0 and math.isinf(edges[-1]) and edges == sorted(edges)
    rates = {t["code"]: t["event_rate"] for t in description["summary"]["tasks"]}
    events = np.stack(labels["tte_event"].to_numpy())
    assert rates["MEDS_DEATH"] == pytest.approx(events[:, 0].mean())
    assert pl.read_parquet(out).equals(labels)


def _tiny_dataset(tmp_path) -> MEDSDataset:
    rows = [
        (1, None, "GENDER//F"),
        (1, datetime(2020, 1, 1), "DIAGNOSIS//X1"),
        (1, datetime(2020, 1, 10), "T"),  # exactly at the second study: not "after" it
        (1, datetime(2020, 1, 20), "T"),
        (1, datetime(2020, 2, 9), "DIAGNOSIS//X2"),  # exactly 30 days after study 1
        (1, datetime(2020, 3, 1), "END"),
        (2, datetime(2020, 1, 1), "OTHER"),
        (2, datetime(2020, 1, 2), "OTHER"),
    ]
    frame = pl.DataFrame(
        rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String}, orient="row"
    )
    (tmp_path / "data").mkdir()
    frame.write_parquet(tmp_path / "data" / "0.parquet")
    return MEDSDataset(tmp_path)


def test_hand_computed_labels(tmp_path):
    dataset = _tiny_dataset(tmp_path)
    studies = pl.DataFrame(
        {
            "study_id": ["s1", "s2", "s3", "s4", "s5"],
            "subject_id": [1, 1, 2, 3, 2],
            "study_time": [
                datetime(2020, 1, 10),
                datetime(2020, 1, 10, 12),
                datetime(2020, 1, 1, 12),
                datetime(2020, 1, 1),  # subject 3 has no events
                datetime(2020, 1, 2),  # at subject 2's last event: no follow-up
            ],
        }
    )
    groups = {"x1": ["DIAGNOSIS//X1"], "x2": ["DIAGNOSIS//X2"]}
    labels = build_study_labels(dataset, studies, ["T", "END"], groups, window_days=(9, 30))
    rows = {r["study_id"]: r for r in labels.iter_rows(named=True)}
    # s1 at Jan 10: T at Jan 10 is not strictly after -> next T Jan 20 (10 d); END Mar 1 (51 d).
    assert rows["s1"]["tte_time"] == [10.0, 51.0] and rows["s1"]["tte_event"] == [True, True]
    # window [Jan 1, Feb 9] includes both edges.
    assert rows["s1"]["phenotype"] == [1.0, 1.0]
    # s2 half a day later: X1 is 9.5 days before (outside), X2 29.5 days after (inside).
    assert rows["s2"]["phenotype"] == [0.0, 1.0]
    assert rows["s2"]["tte_time"] == pytest.approx([9.5, 50.5])
    # s3: subject 2 never has T or END -> censored at its last event (half a day later).
    assert rows["s3"]["tte_time"] == [0.5, 0.5] and rows["s3"]["tte_event"] == [False, False]
    assert rows["s3"]["has_ehr"] and rows["s3"]["followup_days"] == 0.5
    assert rows["s4"]["ehr_status"] == "unknown_subject" and not rows["s4"]["has_ehr"]
    assert rows["s5"]["ehr_status"] == "no_followup" and not rows["s5"]["has_ehr"]
    for study in ("s4", "s5"):
        assert rows[study]["tte_time"] == [0.0, 0.0] and rows[study]["phenotype"] == [0.0, 0.0]
    assert labels["study_id"].to_list() == ["s1", "s2", "s3", "s4", "s5"]


def test_bad_studies_and_tasks(tmp_path):
    dataset = _tiny_dataset(tmp_path)
    csv = tmp_path / "studies.csv"
    pl.DataFrame({"study_id": ["a"], "patient": [1], "study_time": ["2020-01-05 10:00:00"]}).write_csv(csv)
    with pytest.raises(StudyTableError, match=r"studies\.csv: missing column\(s\) subject_id"):
        read_studies(csv)
    studies = read_studies(csv, subject_column="patient")
    assert studies.schema["study_time"] == pl.Datetime("us") and studies["subject_id"].to_list() == [1]
    dup = pl.DataFrame(
        {"study_id": ["a", "a"], "subject_id": [1, 1], "study_time": [datetime(2020, 1, 1)] * 2}
    )
    with pytest.raises(StudyTableError, match="study_id values repeat"):
        build_study_labels(dataset, dup, ["T"])
    with pytest.raises(TaskSpecError, match="non-empty list of distinct codes"):
        build_study_labels(dataset, studies, [])


def test_expand_parents_counts_child_codes_for_ancestor_tasks(tmp_path):
    dataset = _tiny_dataset(tmp_path)
    (tmp_path / "metadata").mkdir()
    pl.DataFrame(
        {"code": ["DIAGNOSIS//X2", "GROUP"], "parent_codes": [["GROUP"], ["TOP"]]},
        schema={"code": pl.String, "parent_codes": pl.List(pl.String)},
    ).write_parquet(tmp_path / "metadata" / "codes.parquet")
    dataset = MEDSDataset(tmp_path)
    studies = pl.DataFrame({"study_id": ["s"], "subject_id": [1], "study_time": [datetime(2020, 1, 10)]})
    labels = build_study_labels(dataset, studies, ["TOP", "GROUP", "T"], expand_parents=True)
    # DIAGNOSIS//X2 on Feb 9 (30 days later) counts for its parent GROUP and grandparent TOP.
    assert labels["tte_time"][0].to_list() == [30.0, 30.0, 10.0]
    assert labels["tte_event"][0].to_list() == [True, True, True]
    plain = build_study_labels(dataset, studies, ["TOP", "GROUP", "T"])
    assert plain["tte_event"][0].to_list() == [False, False, True]
