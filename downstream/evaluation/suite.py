"""Run a suite: every protocol for every encoder on the same studies, then the paired bootstrap.

`evaluate_encoders(config, encoders)` is the library call behind `fm3d eval-encoders`. Features
are extracted once per encoder (and read back from `features_dir` on a rerun); each protocol
scores each encoder on the test split; the bootstrap then draws `resamples` sets of test
patients once and scores every encoder on the same draws, which gives each figure its interval
and each encoder's difference to the first named its paired interval.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from downstream.base import safe_name
from downstream.evaluation.bootstrap import (
    Interval,
    patient_resamples,
    percentile_interval,
    resampled_metrics,
)
from downstream.evaluation.config import SuiteConfig
from downstream.evaluation.encoders import EncoderEntry, load_entries
from downstream.evaluation.features import cached_features, input_notes
from downstream.evaluation.protocol import (
    EvalContext,
    Protocol,
    ProtocolError,
    ProtocolResult,
    build_protocol,
)
from downstream.evaluation.studies import Features, Studies
from fm3d.data.cache import PreparedCache
from fm3d.train.progress import progress

logger = logging.getLogger(__name__)

# The verdict of a paired difference whose interval holds zero.
NO_DIFFERENCE = "no difference"


@dataclass
class SuiteOutcome:
    """What a suite run found.

    table: one row per (protocol, metric, encoder): value, interval, and the paired difference
        to the reference encoder (the first named that ran the protocol) with its verdict.
    encoders: per encoder, what the table's notes say (source, identity, input spec, notes).
    results: the protocols' own results, by (protocol, encoder label).
    skipped: (protocol, encoder label) -> why the protocol did not run for that encoder.
    timings_s: seconds spent extracting features, running protocols and bootstrapping.
    """

    config: SuiteConfig
    table: pl.DataFrame
    encoders: list[dict[str, Any]]
    results: dict[tuple[str, str], ProtocolResult]
    skipped: dict[tuple[str, str], str]
    timings_s: dict[str, float] = field(default_factory=dict)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class _FeatureSource:
    """An encoder's features, extracted (or read back) on first use, with the time it took."""

    def __init__(self, entry: EncoderEntry, cache: PreparedCache, features_dir: Path, device: torch.device,
                 show_progress: bool) -> None:  # fmt: skip
        self.entry, self.cache, self.features_dir = entry, cache, features_dir
        self.device, self.show_progress = device, show_progress
        self.seconds = 0.0
        self._features: Features | None = None

    def __call__(self) -> Features:
        if self._features is None:
            start = time.perf_counter()
            self._features = cached_features(
                self.entry, self.cache, self.features_dir, self.device, self.show_progress
            )
            self.seconds += time.perf_counter() - start
        return self._features


def _run_protocols(
    config: SuiteConfig,
    entries: list[EncoderEntry],
    protocols: dict[str, Protocol],
    cache: PreparedCache,
    studies: Studies,
    work_dir: Path,
    device: torch.device,
    show_progress: bool,
) -> tuple[dict[tuple[str, str], ProtocolResult], dict[tuple[str, str], str], dict[str, float]]:
    results, skipped = {}, {}
    sources = [_FeatureSource(e, cache, config.features_dir, device, show_progress) for e in entries]
    bar = progress(
        total=len(entries) * len(protocols), desc="eval-encoders", unit="run", disable=not show_progress
    )
    start = time.perf_counter()
    for entry, features in zip(entries, sources, strict=True):
        for name, protocol in protocols.items():
            bar.set_postfix(encoder=entry.label, protocol=name)
            reason = protocol.unavailable(entry)
            if reason:
                skipped[(name, entry.label)] = reason
            else:
                context = EvalContext(
                    entry,
                    cache,
                    studies,
                    features,
                    config.seed,
                    device,
                    work_dir / name / safe_name(entry.label),
                )
                context.work_dir.mkdir(parents=True, exist_ok=True)
                results[(name, entry.label)] = protocol.run(context)
            bar.update()
    bar.close()
    extraction = sum(s.seconds for s in sources)
    return (
        results,
        skipped,
        {"features_s": extraction, "protocols_s": time.perf_counter() - start - extraction},
    )


def _aligned(
    score: Callable[[np.ndarray], dict[str, float]], order: np.ndarray
) -> Callable[[np.ndarray], dict[str, float]]:
    """`score` of a result whose rows are another encoder's in `order` (rows of the reference -> its rows)."""
    return lambda rows: score(order[rows])


def compare(
    protocol: str,
    results: dict[str, ProtocolResult],
    studies: Studies,
    resamples: int,
    confidence: float,
    seed: int,
) -> list[dict[str, Any]]:
    """Rows of one protocol: figures with intervals, and paired differences to the first encoder.

    The first encoder of `results` is the reference.
    """
    labels = list(results)
    reference = results[labels[0]]
    position = {s: i for i, s in enumerate(reference.study_ids)}
    scores = {}
    for label, result in results.items():
        if sorted(result.study_ids) != sorted(reference.study_ids):
            raise ProtocolError(
                f"protocol {protocol!r} scored different test studies for {label!r} and {labels[0]!r}; "
                "a protocol must score every encoder on the suite's test split"
            )
        order = np.empty(len(result.study_ids), dtype=np.int64)
        order[[position[s] for s in result.study_ids]] = np.arange(len(result.study_ids))
        scores[label] = _aligned(result.score, order)
    draws = patient_resamples(studies.patients(reference.study_ids), resamples, seed)
    everything = np.arange(len(reference.study_ids))
    points = {label: score(everything) for label, score in scores.items()}
    resampled = {label: resampled_metrics(score, draws) for label, score in scores.items()}
    rows = []
    for label in labels:
        for metric, value in points[label].items():
            own = percentile_interval(value, resampled[label][metric], confidence)
            row = {"protocol": protocol, "metric": metric, "encoder": label, "value": own.value,
                   "ci_low": own.low, "ci_high": own.high, "resamples": own.resamples,
                   "n_test": len(everything), "diff": None, "diff_low": None, "diff_high": None,
                   "verdict": "reference" if label == labels[0] else None}  # fmt: skip
            if label != labels[0] and metric in points[labels[0]]:
                diff = _difference(value, points[labels[0]][metric], resampled[label][metric],
                                   resampled[labels[0]][metric], confidence)  # fmt: skip
                row.update(diff=diff.value, diff_low=diff.low, diff_high=diff.high, verdict=_verdict(diff))
            rows.append(row)
    return rows


def _difference(value: float, reference: float, draws: np.ndarray, reference_draws: np.ndarray,
                confidence: float) -> Interval:  # fmt: skip
    return percentile_interval(value - reference, draws - reference_draws, confidence)


def _verdict(diff: Interval) -> str:
    if diff.resamples == 0:
        return "undefined"
    if not diff.excludes_zero():
        return NO_DIFFERENCE
    return "higher" if diff.low > 0 else "lower"


TABLE_SCHEMA = {
    "protocol": pl.String, "metric": pl.String, "encoder": pl.String, "value": pl.Float64,
    "ci_low": pl.Float64, "ci_high": pl.Float64, "resamples": pl.Int64, "n_test": pl.Int64,
    "diff": pl.Float64, "diff_low": pl.Float64, "diff_high": pl.Float64, "verdict": pl.String,
}  # fmt: skip


def evaluate_encoders(
    config: SuiteConfig,
    encoders: list[str],
    work_dir: str | Path,
    *,
    protocols: list[str] | None = None,
    device: str = "auto",
    show_progress: bool = True,
) -> SuiteOutcome:
    """Run `config`'s protocols (or the named subset) for `encoders` (see `encoders.load_entry`)."""
    if not encoders:
        raise ProtocolError("name at least one encoder (the first is the one the others are compared with)")
    chosen = protocols or list(config.protocols)
    unknown = sorted(set(chosen) - set(config.protocols))
    if unknown:
        raise ProtocolError(
            f"protocols {unknown} are not in the suite config (it has {list(config.protocols)})"
        )
    built = {name: build_protocol(name, config.protocols[name]) for name in chosen}
    cache = PreparedCache(config.data.cache_dir)
    studies = Studies.from_cache(cache, config.data.split_fractions, config.data.split_seed)
    entries = load_entries(encoders, config.seed)
    torch_device = _device(device)
    results, skipped, timings = _run_protocols(
        config, entries, built, cache, studies, Path(work_dir), torch_device, show_progress
    )
    start = time.perf_counter()
    rows = []
    for name in chosen:
        ran = {e.label: results[(name, e.label)] for e in entries if (name, e.label) in results}
        if ran:
            rows += compare(
                name, ran, studies, config.bootstrap.resamples, config.bootstrap.confidence, config.seed
            )
    timings["bootstrap_s"] = time.perf_counter() - start
    described = [
        {
            "label": e.label, "source": e.source, "identity": e.identity, "random_init": e.random_init,
            "text_side": str(e.clip) if e.clip else None, "input_spec": e.spec.to_dict(),
            "input_notes": input_notes(e.spec, cache),
        }
        for e in entries
    ]  # fmt: skip
    return SuiteOutcome(config, pl.DataFrame(rows, schema=TABLE_SCHEMA), described, results, skipped, timings)
