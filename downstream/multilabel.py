"""Multi-label scoring shared by the tasks that call findings per study (classification, zero-shot).

Both collect `probs`, `labels` and `mask` [N, K] over an epoch and report, per class, AUROC
(sklearn; NaN when the class has one label value) and F1 at the class's decision threshold,
over the studies whose label is known, then the macro means; both draw the ROC curves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl
from sklearn.metrics import f1_score, roc_auc_score

from downstream.base import Evaluation, finite_mean


def multilabel_evaluation(
    task: str,
    collected: dict[str, Any],
    class_names: Sequence[str],
    thresholds: Sequence[float],
    details: dict[str, Sequence[Any]] | None = None,
) -> Evaluation:
    """Per-class rows (class, `details` columns, auroc, f1, positives, n), macro means and AUROCs.

    `thresholds` are the per-class decision points for F1; `details` are extra per-class columns
    (e.g. the threshold, or the prompt a zero-shot class was read with).
    """
    probs, labels, mask = (collected[k].float().numpy() for k in ("probs", "labels", "mask"))
    mask = mask.astype(bool)
    rows = []
    for k, name in enumerate(class_names):
        y, p = labels[mask[:, k], k], probs[mask[:, k], k]
        rows.append(
            {
                "class": name,
                **{column: values[k] for column, values in (details or {}).items()},
                "auroc": float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan"),
                "f1": float(f1_score(y, p >= thresholds[k], zero_division=0.0)) if len(y) else float("nan"),
                "positives": int(y.sum()),
                "n": len(y),
            }
        )
    table = pl.DataFrame(rows)
    metrics = {
        "auroc_macro": finite_mean(table["auroc"].to_numpy()),
        "f1_macro": finite_mean(table["f1"].to_numpy()),
        **{f"auroc_{row['class']}": row["auroc"] for row in rows},
    }
    return Evaluation(task, metrics, {"per_class": table})


def roc_figures(collected: dict[str, Any], class_names: Sequence[str]) -> dict[str, Any]:
    """The ROC curves of every class, over the studies whose label is known."""
    from downstream.plots import roc_curves_figure  # matplotlib only when figures are drawn

    labels, probs, mask = (collected[k].numpy() for k in ("labels", "probs", "mask"))
    return {"roc_curves": roc_curves_figure(labels, probs, list(class_names), mask)}
