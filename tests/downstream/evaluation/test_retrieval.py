"""Retrieval protocol: recall@K against a hand computation (argsort of the similarity matrix), on all
test rows and on a resample with repeats, and one run through a real EvalContext with a CLIP export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from downstream.evaluation.encoders import load_entry
from downstream.evaluation.protocol import EvalContext, ProtocolError, build_protocol
from downstream.evaluation.protocols.retrieval import NO_TEXT_SIDE, Retrieval, recall_of_rows
from fm3d.clip import load_clip

# conftest.protocol_context: (encoder folder, work dir[, fractions, label]) -> EvalContext.
ContextFactory = Callable[..., EvalContext]
KS = (1, 3, 5)


def hand_recall(similarity: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Share of queries whose first correct item (any copy of its study) is in the top k of the argsort."""
    scores = similarity[np.ix_(rows, rows)]
    hits = []
    for query, row in enumerate(scores):
        order = np.argsort(-row, kind="stable")
        first_correct = np.flatnonzero(rows[order] == rows[query])[0]
        hits.append(first_correct < k)
    return float(np.mean(hits))


def test_recall_equals_the_argsort_on_all_rows_and_on_a_resample_with_repeats() -> None:
    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(15, 15))  # [CTs, reports]
    resample = np.array([0, 0, 3, 7, 7, 7, 2, 9, 11, 11, 14, 5, 5])
    for rows in (np.arange(15), resample):
        got = recall_of_rows(torch.from_numpy(similarity), rows, KS)
        for k in KS:
            assert got[f"i2t_recall@{k}"] == pytest.approx(hand_recall(similarity, rows, k), abs=1e-12)
            assert got[f"t2i_recall@{k}"] == pytest.approx(hand_recall(similarity.T, rows, k), abs=1e-12)
    # The rule by hand: study 0 drawn twice. Both copies of a query's own study are correct; the
    # two copies of another study are two items ranked above it.
    similarity = torch.tensor([[0.5, 0.9], [0.1, 0.8]], dtype=torch.float64)
    got = recall_of_rows(similarity, np.array([0, 0, 1]), [1, 2, 3])
    # CT 0 (twice) ranks report 1 above its own two copies; CT 1 ranks its report first.
    assert [got[f"i2t_recall@{k}"] for k in (1, 2, 3)] == pytest.approx([1 / 3, 1, 1])
    # Report 0 (twice) finds a copy of CT 0 first; report 1 ranks both copies of CT 0 above CT 1.
    assert [got[f"t2i_recall@{k}"] for k in (1, 2, 3)] == pytest.approx([2 / 3, 2 / 3, 1])


def test_retrieval_through_a_real_context(
    protocol_context: ContextFactory, eval_cohort: Path, clip_export: Path, tmp_path: Path
) -> None:
    context = protocol_context(clip_export, tmp_path, (0.25, 0.25, 0.5), "clip")
    assert context.encoder.clip == clip_export.parent / "clip"
    protocol = build_protocol("retrieval", {"report_columns": ["findings", "impression"], "ks": list(KS)})
    result = protocol.run(context)
    test = context.studies.ids("test")
    assert result.study_ids == test and len(test) >= 8

    # Independently: CLIP's image side on the cached features, its text side on the manifest's
    # reports (one call, no batches), cosines, then the argsort. Demo impressions repeat ("No
    # significant abnormality."), findings do not: distinct reports leave no ties to break.
    clip = load_clip(clip_export.parent / "clip").eval()
    manifest = pl.read_parquet(eval_cohort / "manifest.parquet")
    report = {
        s: f"{f.strip()}\n{i.strip()}"
        for s, f, i in zip(manifest["study_id"], manifest["findings"], manifest["impression"], strict=True)
    }
    assert len({report[s] for s in test}) == len(test)
    with torch.no_grad():
        image = clip.encode_image(torch.from_numpy(context.features().rows(test)))
        text = clip.encode_text([report[s] for s in test])
    similarity = (image @ text.T).double().numpy()
    rows = np.arange(len(test))
    got = result.score(rows)
    assert set(got) == {f"{d}_recall@{k}" for d in ("i2t", "t2i") for k in KS}
    for k in KS:
        assert got[f"i2t_recall@{k}"] == pytest.approx(hand_recall(similarity, rows, k), abs=1e-9)
        assert got[f"t2i_recall@{k}"] == pytest.approx(hand_recall(similarity.T, rows, k), abs=1e-9)
    assert result.tables["recall_at_k"]["gallery_size"].unique().to_list() == [len(test)]


def test_reports_from_a_table_keyed_by_volume_name(
    protocol_context: ContextFactory, eval_cohort: Path, clip_export: Path, tmp_path: Path
) -> None:
    context = protocol_context(clip_export, tmp_path, (0.25, 0.25, 0.5), "clip")
    test = context.studies.ids("test")
    with_report = test[::2]
    table = tmp_path / "reports.csv"
    pl.DataFrame(
        {"VolumeName": [f"{s}.nii.gz" for s in with_report], "Impressions_EN": ["Report."] * len(with_report)}
    ).write_csv(table)
    protocol = Retrieval(reports=str(table), report_columns=["Impressions_EN"], id_column="VolumeName")
    # Studies without a report are left out of the gallery.
    assert protocol.run(context).study_ids == with_report


def test_retrieval_needs_a_text_side_and_report_columns(
    protocol_context: ContextFactory,
    eval_cohort: Path,
    tiny_encoder_dir: Path,
    clip_export: Path,
    tmp_path: Path,
) -> None:
    assert Retrieval().unavailable(load_entry(str(tiny_encoder_dir), seed=0)) == NO_TEXT_SIDE
    assert Retrieval().unavailable(load_entry(f"random:{clip_export}", seed=0)) == NO_TEXT_SIDE
    assert Retrieval().unavailable(load_entry(str(clip_export), seed=0)) is None
    context = protocol_context(clip_export, tmp_path, (0.25, 0.25, 0.5), "clip")
    with pytest.raises(
        ProtocolError, match=r"index.parquet has no report columns \['summary'\].*report_columns"
    ):
        Retrieval(report_columns=["summary"]).run(context)
