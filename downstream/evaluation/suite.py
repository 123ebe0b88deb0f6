"""Run a suite: every protocol for every encoder on the same studies, then the paired bootstrap.

`evaluate_encoders(config, encoders)` is the library call behind `fm3d eval-encoders`. Features
are extracted once per encoder; each protocol scores each encoder on the test split, and its
figures are computed on every bootstrap draw of the test patients (`scores.score`: the same
draws for every encoder), which gives each figure its interval and each encoder's difference to
the first named its paired interval. Features and figures are kept under `features_dir`, so a
rerun only extracts or fits what changed (`reuse=False` recomputes everything).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch

from downstream.base import safe_name
from downstream.evaluation.bootstrap import Interval, percentile_interval
from downstream.evaluation.config import SuiteConfig
from downstream.evaluation.encoders import EncoderEntry, load_entries
from downstream.evaluation.features import cached_features, features_key, input_notes
from downstream.evaluation.protocol import EvalContext, Protocol, ProtocolError, build_protocol
from downstream.evaluation.scores import Scored, load_scored, save_scored, score, scores_key
from downstream.evaluation.studies import Features, Studies
from fm3d.data.cache import PreparedCache
from fm3d.train.progress import progress

logger = logging.getLogger(__name__)

# The verdict of a paired difference whose interval holds zero.
NO_DIFFERENCE = "no difference"
# Where each (protocol, encoder)'s figures are kept, under the suite's features_dir.
SCORES_FOLDER = "scores"


@dataclass
class SuiteOutcome:
    """What a suite run found.

    table: one row per (protocol, metric, encoder): value, interval, and the paired difference
        to the reference encoder (the first named that ran the protocol) with its verdict.
    encoders: per encoder, what the table's notes say (source, identity, input spec, notes).
    results: each (protocol, encoder label)'s figures, choices and detail tables.
    skipped: (protocol, encoder label) -> why the protocol did not run for that encoder.
    timings_s: seconds spent extracting features, running protocols and bootstrapping (what
        was read back from an earlier run costs none of them).
    """

    config: SuiteConfig
    table: pl.DataFrame
    encoders: list[dict[str, Any]]
    results: dict[tuple[str, str], Scored]
    skipped: dict[tuple[str, str], str]
    timings_s: dict[str, float] = field(default_factory=dict)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@dataclass(frozen=True)
class _RunOptions:
    show_progress: bool
    reuse: bool


class _FeatureSource:
    """An encoder's features, extracted (or read back) on first use, with the time it took."""

    def __init__(self, entry: EncoderEntry, cache: PreparedCache, features_dir: Path, device: torch.device,
                 options: _RunOptions) -> None:  # fmt: skip
        self.entry, self.cache, self.features_dir = entry, cache, features_dir
        self.device, self.options = device, options
        self.seconds = 0.0
        self._features: Features | None = None

    def __call__(self) -> Features:
        if self._features is None:
            start = time.perf_counter()
            self._features = cached_features(
                self.entry, self.cache, self.features_dir, self.device, self.options.show_progress,
                reuse=self.options.reuse,
            )  # fmt: skip
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
    options: _RunOptions,
) -> tuple[dict[tuple[str, str], Scored], dict[tuple[str, str], str], dict[str, float]]:
    """Every (protocol, encoder) scored, or read back; what was skipped and why; the time of each part."""
    scored, skipped = {}, {}
    sources = [_FeatureSource(e, cache, config.features_dir, device, options) for e in entries]
    split = {"fractions": list(config.data.split_fractions), "seed": config.data.split_seed}
    bar = progress(
        total=len(entries) * len(protocols),
        desc="eval-encoders",
        unit="run",
        disable=not options.show_progress,
    )
    timings = {"protocols_s": 0.0, "bootstrap_s": 0.0}
    for entry, features in zip(entries, sources, strict=True):
        for name, protocol in protocols.items():
            bar.set_postfix(encoder=entry.label, protocol=name)
            reason = protocol.unavailable(entry)
            if reason:
                skipped[(name, entry.label)] = reason
                bar.update()
                continue
            key = scores_key(
                features_key(entry, cache), name, config.protocols[name], split, config.seed,
                config.bootstrap.resamples,
            )  # fmt: skip
            folder = config.features_dir / SCORES_FOLDER / key
            found = load_scored(folder) if options.reuse else None
            if found is None:
                folder_of_run = work_dir / name / safe_name(entry.label)
                context = EvalContext(entry, cache, studies, features, config.seed, device, folder_of_run)
                found = _run_and_score(protocol, context, features, config.bootstrap.resamples, timings)
                save_scored(found, folder)
            scored[(name, entry.label)] = found
            bar.update()
    bar.close()
    timings["features_s"] = sum(s.seconds for s in sources)
    return scored, skipped, timings


def _run_and_score(
    protocol: Protocol,
    context: EvalContext,
    features: _FeatureSource,
    resamples: int,
    timings: dict[str, float],
) -> Scored:
    """Run `protocol` for one encoder and score it on the draws, adding the time of each to `timings`.

    The protocol's time leaves out the feature extraction its first call to `features` does.
    """
    context.work_dir.mkdir(parents=True, exist_ok=True)
    start, extracting = time.perf_counter(), features.seconds
    result = protocol.run(context)
    timings["protocols_s"] += time.perf_counter() - start - (features.seconds - extracting)
    start = time.perf_counter()
    scored = score(result, context.studies, resamples, context.seed)
    timings["bootstrap_s"] += time.perf_counter() - start
    return scored


def compare(protocol: str, scored: dict[str, Scored], confidence: float) -> list[dict[str, Any]]:
    """Rows of one protocol: figures with intervals, and paired differences to the first encoder.

    The first encoder of `scored` is the reference; all were scored on the same draws (`scores.score`).
    """
    labels = list(scored)
    reference = scored[labels[0]]
    rows = []
    for label, own in scored.items():
        if own.study_ids != reference.study_ids:
            raise ProtocolError(
                f"protocol {protocol!r} scored different test studies for {label!r} and {labels[0]!r}; "
                "a protocol must score every encoder on the suite's test split"
            )
        for metric, value in own.points.items():
            interval = percentile_interval(value, own.draws[metric], confidence)
            row = {"protocol": protocol, "metric": metric, "encoder": label, "value": interval.value,
                   "ci_low": interval.low, "ci_high": interval.high, "resamples": interval.resamples,
                   "n_test": len(own.study_ids), "diff": None, "diff_low": None, "diff_high": None,
                   "verdict": "reference" if label == labels[0] else None}  # fmt: skip
            if label != labels[0] and metric in reference.points:
                diff = percentile_interval(
                    value - reference.points[metric], own.draws[metric] - reference.draws[metric], confidence
                )
                row.update(diff=diff.value, diff_low=diff.low, diff_high=diff.high, verdict=_verdict(diff))
            rows.append(row)
    return rows


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
    reuse: bool = True,
) -> SuiteOutcome:
    """Run `config`'s protocols (or the named subset) for `encoders` (see `encoders.load_entry`).

    work_dir: where protocols put files worth keeping (e.g. a segmentation decoder's logs).
    reuse: read features and figures kept by an earlier run with the same inputs (see the
        module docstring); False extracts and fits everything again (and overwrites them).
    """
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
        config,
        entries,
        built,
        cache,
        studies,
        Path(work_dir),
        torch_device,
        _RunOptions(show_progress, reuse),
    )
    rows = []
    for name in chosen:
        ran = {e.label: results[(name, e.label)] for e in entries if (name, e.label) in results}
        if ran:
            rows += compare(name, ran, config.bootstrap.confidence)
    described = [
        {
            "label": e.label, "source": e.source, "identity": e.identity, "random_init": e.random_init,
            "text_side": str(e.clip) if e.clip else None, "input_spec": e.spec.to_dict(),
            "input_notes": input_notes(e.spec, cache),
        }
        for e in entries
    ]  # fmt: skip
    return SuiteOutcome(config, pl.DataFrame(rows, schema=TABLE_SCHEMA), described, results, skipped, timings)
