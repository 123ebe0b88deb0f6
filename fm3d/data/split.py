"""Patient-level train/val/test split that is stable under re-runs and new patients.

Each patient lands in a split by a hash of (seed, patient_id) alone, so the assignment
never depends on which other patients are present or in what order: adding patients to a
cohort never moves an existing one, and all studies of a patient share one split (a
file-level split leaks a patient's anatomy from train into test, as M3D's users found).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable

import polars as pl

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "val", "test")


def _unit_interval(key: str, seed: int) -> float:
    """A uniform number in [0, 1) determined by `key` and `seed` (blake2b, platform-independent)."""
    digest = hashlib.blake2b(f"{seed}\x1f{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def _check_fractions(fractions: tuple[float, float, float]) -> None:
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(
            f"split fractions (train, val, test) must be 3 non-negative numbers summing to 1, got {fractions}"
        )


def assign_split(
    patient_id: str, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> str:
    """The split ("train", "val" or "test") of one patient."""
    _check_fractions(fractions)
    u = _unit_interval(str(patient_id), seed)
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def assign_splits(
    patient_ids: Iterable[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> dict[str, str]:
    """patient_id -> split for each distinct patient."""
    return {pid: assign_split(pid, fractions, seed) for pid in dict.fromkeys(str(p) for p in patient_ids)}


def split_studies(
    table: pl.DataFrame,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    patient_column: str = "patient_id",
    study_column: str = "study_id",
) -> pl.DataFrame:
    """`table` with a "split" column; studies without a patient id are split by study id (with a warning)."""
    _check_fractions(fractions)
    if patient_column in table.columns:
        keys = table[patient_column].cast(pl.String)
        missing = int(keys.is_null().sum())
    else:
        keys, missing = pl.Series([None] * table.height, dtype=pl.String), table.height
    if missing:
        logger.warning(
            "%d of %d studies have no %r; they are split by %r, so two studies of one patient may "
            "land in different splits. Add patient ids to the manifest to prevent leakage.",
            missing, table.height, patient_column, study_column,
        )  # fmt: skip
        keys = keys.fill_null(table[study_column].cast(pl.String))
    splits = [assign_split(k, fractions, seed) for k in keys.to_list()]
    return table.with_columns(pl.Series("split", splits, dtype=pl.String))
