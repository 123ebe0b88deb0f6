"""Retrieval protocol: recall@K against a hand computation (argsort of the similarity matrix), on all
test rows and on a resample of queries, and one run through a real EvalContext with a CLIP export."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from downstream.evaluation.encoders import load_entry
from downstream.evaluation.protocol import EvalContext, ProtocolError, build_protocol
from downstream.evaluation.protocols.retrieval import NO_TEXT_SIDE, Retrieval, query_hits
from fm3d.clip import load_clip
from fm3d.metrics.retrieval import recall_at_k

# conftest.protocol_context: (encoder folder, work dir[, fractions, label]) -> EvalContext.
ContextFactory = Callable[..., EvalContext]
KS = (1, 3, 5)


def hand_recall(similarity: np.ndarray, rows: np.ndarray, k: int) -> float:
    """Share of the queries `rows` (repeats count) whose own item is in the top k of the whole gallery."""
    hits = []
    for query in rows:
        order = np.argsort(-similarity[query], kind="stable")
        hits.append(np.flatnonzero(order == query)[0] < k)
    return float(np.mean(hits))


def test_recall_equals_the_argsort_on_all_queries_and_on_a_resample_of_them() -> None:
    rng = np.random.default_rng(0)
    similarity = rng.normal(size=(15, 15))  # [CTs, reports]
    hits = query_hits(torch.from_numpy(similarity), KS)
    resample = np.array([0, 0, 3, 7, 7, 7, 2, 9, 11, 11, 14, 5, 5])
    for rows in (np.arange(15), resample):
        for k in KS:
            assert hits[f"i2t_recall@{k}"][rows].mean() == pytest.approx(hand_recall(similarity, rows, k))
            assert hits[f"t2i_recall@{k}"][rows].mean() == pytest.approx(hand_recall(similarity.T, rows, k))
    # On all queries the mean hit is fm3d.metrics.retrieval's recall@K of the matrix (ties at chance).
    tied = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9], [0.3, 0.3, 0.3]], dtype=torch.float64)
    tied_hits = query_hits(tied, [1, 2])
    expected = recall_at_k(tied, ks=(1, 2))
    assert [tied_hits[f"i2t_recall@{k}"].mean() for k in (1, 2)] == pytest.approx([expected[1], expected[2]])
    assert tied_hits["i2t_recall@1"].tolist() == pytest.approx([0.5, 0.5, 1 / 3])


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
