"""Evaluation figures: Dice per class, ROC curves, Kaplan-Meier curves by risk group, recall@K.

Each function returns a matplotlib Figure (Agg backend, no display needed); `fm3d evaluate`
saves it as PNG and logs it to MLflow. Tasks pick their figures in `DownstreamTask.figures`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: figures are only saved, never shown
import matplotlib.pyplot as plt
import numpy as np
import polars as pl
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score, roc_curve


def dice_per_class_figure(table: pl.DataFrame) -> Figure:
    """Bar chart of mean Dice per class (`class`, `dice` columns; NaN classes drawn empty)."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.6 * table.height + 2), 3.5))
    ax.bar(table["class"].to_list(), np.nan_to_num(table["dice"].to_numpy(), nan=0.0), color="tab:blue")
    ax.set_ylim(0, 1)
    ax.set_ylabel("Dice")
    ax.set_title("Dice per class")
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    return fig


def roc_curves_figure(
    labels: np.ndarray, scores: np.ndarray, class_names: Sequence[str], mask: np.ndarray | None = None
) -> Figure:
    """One ROC curve per class from [N, K] binary labels and scores (only where `mask` is True).

    Classes with a single label value among the known ones have no curve and are skipped.
    """
    fig, ax = plt.subplots(figsize=(5, 5))
    known = np.ones_like(labels, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    for k, name in enumerate(class_names):
        y, s = labels[known[:, k], k], scores[known[:, k], k]
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, s)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(y, s):.2f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC curves")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier estimate: the distinct times and S(t) just after each (product-limit)."""
    time, event = np.asarray(time, dtype=np.float64), np.asarray(event, dtype=bool)
    times = np.unique(time)
    at_risk = np.array([(time >= t).sum() for t in times], dtype=np.float64)
    deaths = np.array([(event & (time == t)).sum() for t in times], dtype=np.float64)
    return times, np.cumprod(1.0 - deaths / at_risk)


def kaplan_meier_figure(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, groups: int = 2, title: str = ""
) -> Figure:
    """Kaplan-Meier curves of the studies split into `groups` quantile groups of predicted risk."""
    fig, ax = plt.subplots(figsize=(5, 4))
    order = np.argsort(risk, kind="stable")
    for g, members in enumerate(np.array_split(order, groups)):
        if len(members) == 0:
            continue
        t, s = kaplan_meier(time[members], event[members])
        label = "low risk" if g == 0 else "high risk" if g == groups - 1 else f"risk group {g + 1}"
        ax.step(
            np.concatenate([[0.0], t]),
            np.concatenate([[1.0], s]),
            where="post",
            label=f"{label} (n={len(members)})",
        )
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("days")
    ax.set_ylabel("survival probability")
    ax.set_title(title or "Kaplan-Meier by predicted risk")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def recall_at_k_figure(recalls: Mapping[str, Mapping[int, float]]) -> Figure:
    """Recall@K curves, one per direction (e.g. {"image->report": {1: 0.1, 5: 0.3, ...}})."""
    fig, ax = plt.subplots(figsize=(5, 4))
    for name, curve in recalls.items():
        ks = sorted(curve)
        ax.plot(ks, [curve[k] for k in ks], marker="o", label=name)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("K")
    ax.set_ylabel("recall@K")
    ax.set_title("Retrieval recall@K")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
