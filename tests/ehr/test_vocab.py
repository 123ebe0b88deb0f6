"""Code counts, MOTOR task selection and phenotype code sets against plain-Python references."""

from __future__ import annotations

import math
from collections import defaultdict
from datetime import datetime
from pathlib import Path

import polars as pl
import pytest

from ehr.errors import TaskSpecError
from ehr.meds import MEDSDataset
from ehr.vocab import code_ancestors, code_counts, load_phenotypes, phenotype_codes, select_tasks

REPO = Path(__file__).resolve().parents[2]


def motor_scores(subject_codes: dict[int, set[str]], parents: dict[str, list[str]], min_fraction: float):
    """femr's criterion written out with dicts and loops (independent of the polars version)."""

    def ancestors(code):
        seen, stack = {code}, [code]
        while stack:
            for parent in parents.get(stack.pop(), []):
                if parent not in seen:
                    seen.add(parent)
                    stack.append(parent)
        return seen

    counts = defaultdict(float)
    for codes in subject_codes.values():
        for code in set().union(*(ancestors(c) for c in codes)):
            counts[code] += 1 / len(subject_codes)
    scores = {}
    for code, p in counts.items():
        baseline = min([1.0] + [counts[parent] for parent in parents.get(code, []) if parent in counts])
        w = min(1.0, p / baseline)
        if 0 < w < 1:
            score = baseline * (w * math.log(w) + (1 - w) * math.log(1 - w))
            if score <= min_fraction * math.log(min_fraction) + (1 - min_fraction) * math.log(
                1 - min_fraction
            ):
                scores[code] = score
    return sorted(scores.items(), key=lambda item: (item[1], item[0]))


def tiny_dataset(tmp_path) -> MEDSDataset:
    rng_codes = [["A", "B"], ["A"], ["A", "C"], ["B"], ["A", "B", "C"], ["D"], ["A"], ["C"]]
    rows = [(s, None, "STATIC") for s in range(len(rng_codes))]
    for subject, codes in enumerate(rng_codes):
        rows += [(subject, datetime(2020, 1, 1 + i), code) for i, code in enumerate(codes)]
    frame = pl.DataFrame(
        rows, schema={"subject_id": pl.Int64, "time": pl.Datetime("us"), "code": pl.String}, orient="row"
    )
    frame = frame.sort("subject_id", "time", nulls_last=False)
    (tmp_path / "data").mkdir()
    (tmp_path / "metadata").mkdir()
    frame.write_parquet(tmp_path / "data" / "0.parquet")
    pl.DataFrame(
        {"code": ["A", "B", "C", "P"], "parent_codes": [["P"], ["P"], ["Q"], ["R"]]},
        schema={"code": pl.String, "parent_codes": pl.List(pl.String)},
    ).write_parquet(tmp_path / "metadata" / "codes.parquet")
    return MEDSDataset(tmp_path)


def test_select_tasks_matches_reference_without_parents(tmp_path):
    dataset = tiny_dataset(tmp_path)
    subject_codes = {
        s: set(g["code"])
        for (s,), g in dataset.events().filter(pl.col("time").is_not_null()).collect().group_by("subject_id")
    }
    expected = motor_scores(subject_codes, {}, 0.01)
    got = select_tasks(dataset, 10, min_event_fraction=0.01)
    assert got["code"].to_list() == [code for code, _ in expected]
    assert got["score"].to_list() == pytest.approx([score for _, score in expected])
    assert "STATIC" not in got["code"].to_list()  # static codes cannot be time-to-event outcomes
    # A stricter minimum fraction drops rare codes (D: 1 of 8 subjects)
    assert "D" not in select_tasks(dataset, 10, min_event_fraction=0.2)["code"].to_list()
    assert select_tasks(dataset, 2, min_event_fraction=0.01).height == 2
    assert "A" not in select_tasks(dataset, 10, exclude_prefixes=("A",))["code"].to_list()


def test_select_tasks_with_parents_matches_reference(tmp_path):
    dataset = tiny_dataset(tmp_path)
    subject_codes = {
        s: set(g["code"])
        for (s,), g in dataset.events().filter(pl.col("time").is_not_null()).collect().group_by("subject_id")
    }
    parents = {"A": ["P"], "B": ["P"], "C": ["Q"], "P": ["R"]}
    expected = motor_scores(subject_codes, parents, 0.01)
    got = select_tasks(dataset, 10, min_event_fraction=0.01, expand_parents=True)
    assert got["code"].to_list() == [code for code, _ in expected]
    assert got["score"].to_list() == pytest.approx([score for _, score in expected])
    closure = set(code_ancestors(dataset).iter_rows())
    assert {("A", "A"), ("A", "P"), ("A", "R"), ("P", "R"), ("C", "Q")} <= closure


def test_mimic_demo_tasks_and_counts(shared_data):
    dataset = MEDSDataset(shared_data / "ehr" / "mimic_iv_demo_meds")
    counts = code_counts(dataset)
    assert counts["events"].sum() == 916_166 and counts.height == 7_035
    raw = pl.read_parquet(
        shared_data / "ehr" / "mimic_iv_demo_meds" / "data" / "*" / "*.parquet", columns=["code"]
    )
    top = raw.group_by("code").len().sort(["len", "code"], descending=[True, False]).head(5)
    assert counts.head(5)["code"].to_list() == top["code"].to_list()
    tasks = select_tasks(dataset, 32)
    assert tasks.height == 32
    # most informative codes first: a parentless code's score is minus its Bernoulli entropy
    p = tasks["subject_fraction"][0]
    assert tasks["score"][0] == pytest.approx(p * math.log(p) + (1 - p) * math.log(1 - p))
    assert tasks["score"].is_sorted()


def test_phenotype_mapping(tmp_path):
    mapping = load_phenotypes(REPO / "conf" / "ehr" / "phenotypes_example.yaml")
    assert "hypertension" in mapping and all(mapping.values())
    codes = pl.Series(
        ["DIAGNOSIS//ICD//10//I10", "DIAGNOSIS//ICD//9//4019", "DIAGNOSIS//ICD//10//E119", "LAB//1"]
    )
    table = phenotype_codes(codes, mapping)
    groups = list(mapping)
    got = {(code, groups[g]) for code, g in table.iter_rows()}
    assert got == {
        ("DIAGNOSIS//ICD//10//I10", "hypertension"),
        ("DIAGNOSIS//ICD//9//4019", "hypertension"),
        ("DIAGNOSIS//ICD//10//E119", "type2_diabetes"),
    }
    bad = tmp_path / "bad.json"
    bad.write_text('{"empty": []}')
    with pytest.raises(TaskSpecError, match=r"bad\.json: group 'empty' must list one or more"):
        load_phenotypes(bad)
