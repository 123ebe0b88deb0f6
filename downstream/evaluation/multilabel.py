"""Multi-label findings shared by the linear probe and kNN: the label table and the scoring of a resample.

A label table is a parquet or CSV file with `study_id` and one boolean column per finding (CSV
0/1 columns count too). A null cell means the finding is unknown for that study: the study is
left out of that label's training and metrics, not counted as a negative. A study the table does
not list is unknown for every label.

`MultiLabelScores` scores precomputed probabilities on any resample of the test rows (repeats
allowed): per label AUROC, balanced accuracy and F1 at probability 0.5 (positive above 0.5, as
sklearn's `predict`), and their macro means over the labels the resample defines. The bootstrap
calls it 1,000 times per encoder, so it is a handful of vectorised numpy operations over all
labels at once, with AUROC computed from precomputed tie-aware ranks (Mann-Whitney U).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from downstream.evaluation.protocol import ProtocolError
from fm3d.data.tables import TableError, read_table

METRICS: tuple[str, ...] = ("auroc", "balanced_accuracy", "f1")
THRESHOLD = 0.5


@dataclass(frozen=True)
class LabelMatrix:
    """Labels of some studies, in their order: `positive[i, k]` is valid where `known[i, k]`."""

    names: list[str]
    positive: np.ndarray  # [N, K] bool
    known: np.ndarray  # [N, K] bool

    def class_counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(positives, negatives) per label among the studies where it is known."""
        positives = (self.positive & self.known).sum(axis=0)
        return positives, self.known.sum(axis=0) - positives


class MultiLabelTable:
    """A multi-label table read once; `matrix(study_ids)` aligns it to the suite's studies.

    setting: where the table was named (e.g. "protocols.linear_probe"), for error messages.
    """

    def __init__(self, path: str | Path, label_columns: list[str] | str | None, setting: str) -> None:
        self.path, self.setting = Path(path), setting
        try:
            # CSV cells as strings: an id like "0012" must stay "0012"; labels are parsed below.
            table = read_table(self.path, as_strings=True)
        except TableError as exc:
            raise ProtocolError(f"{setting}.labels: {exc}") from exc
        duplicated = table.filter(pl.col("study_id").is_duplicated())["study_id"].unique().to_list()
        if duplicated:
            raise ProtocolError(
                f"{self.path}: study ids {sorted(duplicated)[:5]} appear more than once; "
                "write one row of labels per study"
            )
        binary = {c: b for c in table.columns if c != "study_id" and (b := _as_boolean(table[c])) is not None}
        candidates = list(binary)
        if label_columns is None:
            label_columns = candidates
        elif isinstance(label_columns, str):  # `label_columns: emphysema` in the YAML
            label_columns = [label_columns]
        if not label_columns:
            raise ProtocolError(
                f"{self.path}: no label columns to score (its boolean columns: {candidates}); write one "
                f"true/false column per finding and name them in {setting}.label_columns (or null)"
            )
        missing = [c for c in label_columns if c not in table.columns]
        if missing:
            raise ProtocolError(
                f"{self.path}: has no label column(s) {missing}; its boolean columns are {candidates}: "
                f"fix {setting}.label_columns (null takes every boolean column)"
            )
        not_binary = [c for c in label_columns if c not in candidates]
        if not_binary:
            raise ProtocolError(
                f"{self.path}: label column(s) {not_binary} are not boolean (or 0/1); "
                f"write true/false per study or drop them from {setting}.label_columns"
            )
        self.names = list(label_columns)
        values = pl.DataFrame([binary[c] for c in self.names])
        self._row = {sid: i for i, sid in enumerate(table["study_id"].to_list())}
        self._known = values.select(pl.all().is_not_null()).to_numpy().astype(bool)  # [T, K]
        self._positive = values.select(pl.all().fill_null(False)).to_numpy().astype(bool) & self._known

    def matrix(self, study_ids: list[str]) -> LabelMatrix:
        """The labels of `study_ids`, in that order (unknown for a study the table does not list)."""
        rows = np.asarray([self._row.get(s, -1) for s in study_ids], dtype=np.int64)
        listed = rows >= 0
        positive = np.zeros((len(rows), len(self.names)), dtype=bool)
        known = np.zeros_like(positive)
        positive[listed], known[listed] = self._positive[rows[listed]], self._known[rows[listed]]
        return LabelMatrix(self.names, positive, known)

    def require_both_classes(self, labels: LabelMatrix, split: str) -> None:
        """Refuse labels with no positive or no negative study in `split` (nothing to learn from)."""
        positives, negatives = labels.class_counts()
        one_class = [
            f"{name} ({p} positive, {n} negative)"
            for name, p, n in zip(labels.names, positives, negatives, strict=True)
            if p == 0 or n == 0
        ]
        if one_class:
            raise ProtocolError(
                f"{self.path}: in the {split} split, {', '.join(one_class)} lack one class; leave them "
                f"out of {self.setting}.label_columns or give the suite more studies"
            )


def _as_boolean(column: pl.Series) -> pl.Series | None:
    """The column as booleans (nulls kept) when it holds true/false or 0/1 values, else None."""
    if column.dtype == pl.Boolean:
        return column
    if column.dtype == pl.String:
        words = column.str.strip_chars().str.to_lowercase().replace("", None)
        if set(words.drop_nulls().unique().to_list()) <= {"true", "false", "1", "0"}:
            return words.is_in(["true", "1"])  # a null stays null: unknown
        return None
    if column.dtype.is_integer() and set(column.drop_nulls().unique().to_list()) <= {0, 1}:
        return column.cast(pl.Boolean)
    return None


class MultiLabelScores:
    """The score function of precomputed probabilities [N, K] of `labels` (see the module docstring).

    `scores(rows)` -> {"auroc/<label>", "balanced_accuracy/<label>", "f1/<label>", and
    "<metric>_macro"}; a label is defined on a resample when it has both classes among its
    known rows there, and is NaN otherwise; a macro is NaN when no label is defined.
    """

    def __init__(self, probabilities: np.ndarray, labels: LabelMatrix) -> None:
        self.labels, self.probabilities = labels, probabilities
        n, k = probabilities.shape
        # Each label's probabilities as tie-aware levels (equal values share one), offset per
        # label so that one bincount counts every label's levels at once.
        levels = np.empty((n, k), dtype=np.int64)
        for j in range(k):
            levels[:, j] = np.unique(probabilities[:, j], return_inverse=True)[1].reshape(-1) + j * n
        self._levels, self._bins = levels, n * k
        self._predicted = probabilities > THRESHOLD
        self._keys = {metric: [f"{metric}/{name}" for name in labels.names] for metric in METRICS}

    def per_label(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """metric -> its value for every label on the resample `rows` (NaN where undefined)."""
        known = self.labels.known[rows]
        positive = self.labels.positive[rows] & known
        negative = known & ~positive
        n_pos, n_neg = positive.sum(axis=0), negative.sum(axis=0)
        defined = (n_pos > 0) & (n_neg > 0)
        levels = self._levels[rows]
        k = len(self.labels.names)
        pos_at = np.bincount(levels[positive], minlength=self._bins).reshape(k, -1)  # [K, N]
        neg_at = np.bincount(levels[negative], minlength=self._bins).reshape(k, -1)
        neg_below = np.cumsum(neg_at, axis=1) - neg_at
        # Mann-Whitney U: pairs ranked right, plus half of the tied pairs.
        wins = (pos_at * (neg_below + 0.5 * neg_at)).sum(axis=1)
        predicted = self._predicted[rows]
        tp = (predicted & positive).sum(axis=0)
        fp = (predicted & negative).sum(axis=0)
        tn = n_neg - fp
        with np.errstate(divide="ignore", invalid="ignore"):
            auroc = wins / (n_pos * n_neg)
            balanced = (tp / n_pos + tn / n_neg) / 2
            f1 = 2 * tp / (2 * tp + fp + (n_pos - tp))
        return {
            metric: np.where(defined, values, np.nan)
            for metric, values in zip(METRICS, (auroc, balanced, f1), strict=True)
        }

    def __call__(self, rows: np.ndarray) -> dict[str, float]:
        values = self.per_label(rows)
        scores: dict[str, float] = {}
        for metric, per_label in values.items():
            scores.update(zip(self._keys[metric], per_label.tolist(), strict=True))
            defined = per_label[~np.isnan(per_label)]
            scores[f"{metric}_macro"] = float(defined.mean()) if defined.size else float("nan")
        return scores

    def table(self) -> pl.DataFrame:
        """Per label figures on all rows: label, auroc, balanced_accuracy, f1, positives, n."""
        values = self.per_label(np.arange(len(self.probabilities)))
        positives, negatives = self.labels.class_counts()
        return pl.DataFrame(
            {
                "label": self.labels.names,
                **{metric: values[metric] for metric in METRICS},
                "positives": positives,
                "n": positives + negatives,
            }
        )


def selection_criterion(scores: dict[str, np.ndarray]) -> float:
    """Mean over the defined labels of (balanced accuracy + AUROC) / 2: how a protocol picks on val."""
    criterion = (scores["balanced_accuracy"] + scores["auroc"]) / 2
    defined = criterion[~np.isnan(criterion)]
    return float(defined.mean()) if defined.size else float("nan")
