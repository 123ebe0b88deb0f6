"""A protocol's figures for one encoder, on the test rows and on every bootstrap resample, kept on disk.

The rows are the scored test studies sorted by id, and the resamples are drawn from their
patients with the suite's seed, so every encoder, and every rerun, is scored on the same draws:
the pairing of two encoders needs nothing else, and a rerun with the same encoder, data, split,
protocol settings and seed reads the figures back instead of running the protocol again (a
protocol such as segmentation trains a decoder, which dominates a suite's time).

Stored as `<features_dir>/scores/<key>/` (scores.npz, meta.json, one parquet per detail table),
the key a hash of everything the figures depend on: the encoder's weights and input spec, the
cache's index, the protocol's name and settings (with the contents of the files they name), the
split, the seed, the number of resamples and `SCORES_VERSION`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from downstream.evaluation.bootstrap import patient_resamples, resampled_metrics
from downstream.evaluation.encoders import file_digest
from downstream.evaluation.protocol import ProtocolResult
from downstream.evaluation.studies import Studies
from fm3d.atomic import atomic_folder

# Bump when scoring or a built-in protocol changes what it computes, so old figures are not reused.
SCORES_VERSION = 1


@dataclass
class Scored:
    """Figures of one (protocol, encoder): `points` on all rows, `draws` per bootstrap resample."""

    study_ids: list[str]
    points: dict[str, float]
    draws: dict[str, np.ndarray]
    selected: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)


def score(result: ProtocolResult, studies: Studies, resamples: int, seed: int) -> Scored:
    """`result`'s figures on its rows sorted by study id, and on `resamples` patient-level draws of them."""
    ids = sorted(result.study_ids)
    position = {s: i for i, s in enumerate(result.study_ids)}
    order = np.asarray([position[s] for s in ids], dtype=np.int64)

    def in_order(rows: np.ndarray) -> dict[str, float]:
        return result.score(order[rows])

    draws = patient_resamples(studies.patients(ids), resamples, seed)
    points = {metric: float(value) for metric, value in in_order(np.arange(len(ids))).items()}
    return Scored(ids, points, resampled_metrics(in_order, draws), dict(result.selected), dict(result.tables))


def _setting_digest(value: Any) -> Any:
    """A setting as it enters the key: a path to an existing file also by its contents."""
    if isinstance(value, str) and Path(value).is_file():
        return [value, file_digest(Path(value))]
    if isinstance(value, dict):
        return {k: _setting_digest(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_setting_digest(v) for v in value]
    return value


def scores_key(features_key: str, protocol: str, settings: dict[str, Any], split: dict[str, Any],
               seed: int, resamples: int) -> str:  # fmt: skip
    """The storage key of one (protocol, encoder)'s figures (see the module docstring)."""
    parts = {
        "version": SCORES_VERSION,
        "features": features_key,
        "protocol": protocol,
        "settings": _setting_digest(settings),
        "split": split,
        "seed": seed,
        "resamples": resamples,
    }
    return hashlib.blake2b(
        json.dumps(parts, sort_keys=True, default=str).encode(), digest_size=16
    ).hexdigest()


def save_scored(scored: Scored, folder: Path) -> None:
    """Write `scored` to `folder` atomically (a crash leaves the old folder or none)."""
    metrics = list(scored.points)
    with atomic_folder(folder) as temporary:
        np.savez(
            temporary / "scores.npz",
            study_ids=np.asarray(scored.study_ids),
            metrics=np.asarray(metrics),
            points=np.asarray([scored.points[m] for m in metrics], dtype=np.float64),
            draws=np.stack([scored.draws[m] for m in metrics]) if metrics else np.zeros((0, 0)),
        )
        (temporary / "meta.json").write_text(json.dumps({"selected": scored.selected}, default=str))
        for name, table in scored.tables.items():
            table.write_parquet(temporary / f"table__{name}.parquet")


def load_scored(folder: Path) -> Scored | None:
    """The figures `save_scored` wrote to `folder`, or None when there are none."""
    if not (folder / "meta.json").is_file():
        return None
    with np.load(folder / "scores.npz") as stored:
        metrics = [str(m) for m in stored["metrics"]]
        points = {m: float(v) for m, v in zip(metrics, stored["points"], strict=True)}
        draws = {m: stored["draws"][i] for i, m in enumerate(metrics)}
        ids = [str(s) for s in stored["study_ids"]]
    selected = json.loads((folder / "meta.json").read_text())["selected"]
    tables = {
        p.stem.removeprefix("table__"): pl.read_parquet(p) for p in sorted(folder.glob("table__*.parquet"))
    }
    return Scored(ids, points, draws, selected, tables)
