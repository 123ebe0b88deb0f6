"""CT <-> report retrieval with the encoder's CLIP text side, on the suite's test studies.

Every test study with a report contributes its CT (the cached pooled features through CLIP's
image projection, as `ClipEvalTask.image_embeddings` does after the encoder) and its report
(through CLIP's text side, in batches). The cosine similarities of all test CTs and reports are
computed once. Recall@K (`fm3d.metrics.retrieval`, ties at chance) is reported both ways,
image -> report (`i2t_recall@K`) and report -> image (`t2i_recall@K`).

The gallery is always every test study: each query's hit@K against it is computed once, and a
bootstrap resample draws queries (by patient) and averages their hits. Resampling the gallery
too would shrink it to the ~63 % of distinct studies a draw holds and make every resample
easier than the test itself, so the intervals would sit above the figure they belong to.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
import torch

from downstream.evaluation.encoders import EncoderEntry
from downstream.evaluation.protocol import (
    EvalContext,
    Protocol,
    ProtocolError,
    ProtocolResult,
    register_protocol,
)
from downstream.language.clip_eval import load_task_clip
from downstream.tasks.retrieval import embed_texts
from fm3d.clip import ClipModel
from fm3d.data.cache import INDEX_FILE, PreparedCache
from fm3d.data.tables import ReportTable, TableError, read_table
from fm3d.metrics.retrieval import recall_at_k

logger = logging.getLogger(__name__)

# Why a language protocol (retrieval, zero-shot) skips an encoder without CLIP heads.
NO_TEXT_SIDE = "no text side (no CLIP heads beside the encoder)"
DIRECTIONS = ("i2t", "t2i")


def clip_image_embeddings(context: EvalContext, study_ids: list[str]) -> tuple[ClipModel, torch.Tensor]:
    """The encoder's CLIP heads and the normalised joint-space embeddings [N, P] (CPU) of `study_ids`.

    The cached pooled features through CLIP's image projection: what `ClipEvalTask.image_embeddings`
    computes after the encoder, without a second pass over the volumes.
    """
    clip = load_task_clip(context.encoder.clip, context.encoder.module).to(context.device)
    pooled = torch.from_numpy(context.features().rows(study_ids)).to(context.device)  # [N, C]
    return clip, clip.encode_image(pooled).float().cpu()


def read_reports(
    cache: PreparedCache, reports: str | Path | None, columns: Sequence[str], id_column: str
) -> ReportTable:
    """The report text of each study: `columns` of the `reports` table, or of the cache index when None."""
    if reports is None:
        source, table = cache.root / INDEX_FILE, cache.index
    else:
        source = Path(reports)
        try:
            table = read_table(source, id_column, as_strings=True)
        except TableError as exc:
            raise ProtocolError(
                f"protocols.retrieval.reports: {exc} (the id column is protocols.retrieval.id_column)"
            ) from exc
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ProtocolError(
            f"{source} has no report columns {missing} (it has {table.columns}): set "
            "protocols.retrieval.report_columns to its text columns, or protocols.retrieval.reports to a "
            "CSV/parquet table of reports"
        )
    return ReportTable(table, columns, source, id_column)


def query_hits(similarity: torch.Tensor, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """`<direction>_recall@K` -> each query's (expected) hit@K against the whole gallery.

    similarity: [N CTs, N reports], CT i and report i of one study. The mean of a metric's hits
    over all queries is `fm3d.metrics.retrieval.recall_at_k` of the matrix.
    """
    hits: dict[str, np.ndarray] = {}
    for direction, scores in zip(DIRECTIONS, (similarity, similarity.T), strict=True):
        eye = torch.eye(scores.shape[0], dtype=torch.bool)
        per_query = [recall_at_k(scores[i : i + 1], eye[i : i + 1], ks) for i in range(scores.shape[0])]
        hits.update({f"{direction}_recall@{k}": np.asarray([q[k] for q in per_query]) for k in ks})
    return hits


@register_protocol("retrieval")
class Retrieval(Protocol):
    """Image -> report and report -> image recall@K on the test split (nothing is fitted).

    Args:
        reports: a CSV/parquet table of reports; None reads `report_columns` from the cache index
            (the manifest's report columns, e.g. the demo's `findings` and `impression`).
        report_columns: text columns joined with a newline into a study's report.
        id_column: the reports table's study column (a volume file name works: CT-RATE's
            `VolumeName`, its NIfTI suffix removed).
        ks: the K of recall@K (a K beyond the gallery counts every item: recall 1).
        batch_size: reports per call of CLIP's text side.
    """

    headline = "i2t_recall@5"

    def __init__(
        self,
        reports: str | None = None,
        report_columns: Sequence[str] = ("impression",),
        id_column: str = "study_id",
        ks: Sequence[int] = (1, 5, 10),
        batch_size: int = 32,
    ) -> None:
        self.reports = reports
        self.report_columns = list(report_columns)
        self.id_column = id_column
        self.ks = [int(k) for k in ks]
        self.batch_size = int(batch_size)
        if not self.report_columns or not self.ks or min(self.ks) < 1:
            raise ProtocolError(
                f"protocols.retrieval: report_columns {self.report_columns} must name a column and ks "
                f"{self.ks} must be K >= 1"
            )

    def unavailable(self, encoder: EncoderEntry) -> str | None:
        return NO_TEXT_SIDE if encoder.clip is None else None

    @torch.no_grad()
    def run(self, context: EvalContext) -> ProtocolResult:
        reports = read_reports(context.cache, self.reports, self.report_columns, self.id_column)
        test = context.studies.ids("test")
        study_ids = [s for s in test if reports.get(s)]
        if len(study_ids) < 2:
            raise ProtocolError(
                f"protocols.retrieval: {len(study_ids)} of the {len(test)} test studies have a report in "
                f"{self.reports or context.cache.root / INDEX_FILE} ({self.report_columns}); retrieval needs "
                "two or more: check report_columns and that its ids are the cache's study_id"
            )
        if len(study_ids) < len(test):
            logger.warning(
                "retrieval: %d test studies without a report are left out", len(test) - len(study_ids)
            )
        clip, image = clip_image_embeddings(context, study_ids)  # [N, P]
        text = embed_texts(clip, [reports.get(s) for s in study_ids], self.batch_size)  # [N, P]
        similarity = (image @ text.T).double()  # [N CTs, N reports], cosines
        hits = query_hits(similarity, self.ks)

        def score(rows: np.ndarray) -> dict[str, float]:
            return {metric: float(per_query[rows].mean()) for metric, per_query in hits.items()}

        everything = score(np.arange(len(study_ids)))
        table = pl.DataFrame(
            [
                {
                    "direction": d,
                    "k": k,
                    "recall": everything[f"{d}_recall@{k}"],
                    "gallery_size": len(study_ids),
                }
                for d in DIRECTIONS
                for k in self.ks
            ]
        )
        return ProtocolResult(study_ids, score, tables={"recall_at_k": table})
