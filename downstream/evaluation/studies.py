"""The suite's studies (ids, patients, splits) and an encoder's features of them.

Every encoder is scored on the same studies: the prepared cache's, split by patient with
`fm3d.data.split` (the fractions and seed of the suite's `data` block), so a patient's studies
stay together and the bootstrap can resample patients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

from fm3d.data.cache import PreparedCache
from fm3d.data.split import SPLITS, split_studies
from fm3d.errors import Fm3dError


class StudiesError(Fm3dError, ValueError):
    """A split that leaves the suite without studies to fit, select or test on."""


@dataclass(frozen=True)
class Studies:
    """study_id, patient_id and split ("train", "val", "test") of every study, in cache order."""

    table: pl.DataFrame

    @classmethod
    def from_cache(cls, cache: PreparedCache, fractions: tuple[float, float, float], seed: int) -> Studies:
        """The cache's studies split by patient; refuses a split with an empty train or test part."""
        index = cache.index.select("study_id", "patient_id")
        table = split_studies(index, tuple(float(f) for f in fractions), seed)
        counts = {s: int((table["split"] == s).sum()) for s in SPLITS}
        if counts["train"] == 0 or counts["test"] == 0:
            raise StudiesError(
                f"the split {list(fractions)} (seed {seed}) of {cache.root} gives {counts} studies; "
                "the suite needs train and test studies: change data.split_fractions"
            )
        return cls(table)

    def ids(self, split: str) -> list[str]:
        """The study ids of one split, in cache order."""
        return self.table.filter(pl.col("split") == split)["study_id"].to_list()

    def patients(self, study_ids: list[str]) -> list[str]:
        """The patient of each study (for the patient-level bootstrap)."""
        by_study = dict(zip(self.table["study_id"], self.table["patient_id"], strict=True))
        return [str(by_study[s]) if by_study[s] is not None else s for s in study_ids]


@dataclass(frozen=True)
class Features:
    """One embedding per study: `values[i]` belongs to `study_ids[i]`."""

    study_ids: list[str]
    values: np.ndarray

    def rows(self, study_ids: list[str]) -> np.ndarray:
        """The embeddings of `study_ids`, in that order."""
        position = {s: i for i, s in enumerate(self.study_ids)}
        return self.values[[position[s] for s in study_ids]]
