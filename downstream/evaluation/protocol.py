"""What a protocol is: a registered class that scores one encoder on the suite's test studies.

A protocol (linear probe, kNN, survival, segmentation, zero-shot, retrieval) is one module of
`downstream.evaluation.protocols` decorated with `@register_protocol("name")`; third-party ones
declare an entry point in the group `fm3d.eval_protocols`. Its constructor takes the settings
of its section in the suite YAML; `run` gets an `EvalContext` and returns a `ProtocolResult`:
the test studies and a function that scores any resample of them, so the suite can put a
patient-level bootstrap interval on every figure and pair encoders on the same resamples.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import polars as pl
import torch

from downstream.evaluation.encoders import EncoderEntry
from downstream.evaluation.studies import Features, Studies
from fm3d.data.cache import PreparedCache
from fm3d.errors import Fm3dError
from fm3d.plugins import Registry, RegistryError

ENTRY_POINT_GROUP = "fm3d.eval_protocols"
PROTOCOLS_PACKAGE = "downstream.evaluation.protocols"


class ProtocolRegistryError(RegistryError):
    """A protocol name that is unknown or registered twice."""


class ProtocolError(Fm3dError, ValueError):
    """A protocol that cannot run on the data it was given (names the file or setting and the fix)."""


PROTOCOLS = Registry(
    "evaluation protocol", PROTOCOLS_PACKAGE, ENTRY_POINT_GROUP, "protocol_name", ProtocolRegistryError
)


def register_protocol(name: str) -> Callable[[type], type]:
    """Class decorator that makes a `Protocol` subclass runnable by `name` (sets `protocol_name`)."""
    return PROTOCOLS.register(name)


# Row indices into `ProtocolResult.study_ids` (repeats allowed) -> {metric: value}.
ScoreFunction = Callable[[np.ndarray], dict[str, float]]


@dataclass
class EvalContext:
    """What a protocol may use for one encoder.

    encoder: the encoder (frozen, eval mode), its input spec, identity and text side.
    cache: the prepared studies; studies: their patients and suite splits (train/val/test).
    features: the encoder's pooled embedding of every study, extracted once and cached on disk
        (call it; it is only extracted when a protocol asks).
    seed: the suite's seed, for anything random a protocol does (recorded in the table).
    device: where to run the encoder and any head.
    work_dir: a folder of this protocol and encoder for files worth keeping (figures, tables).
    """

    encoder: EncoderEntry
    cache: PreparedCache
    studies: Studies
    features: Callable[[], Features]
    seed: int
    device: torch.device
    work_dir: Path


@dataclass
class ProtocolResult:
    """One encoder's outcome of one protocol on the test studies.

    study_ids: the scored test studies, in row order (the same set for every encoder).
    score: metrics of any resample of those rows: `score(np.arange(n))` gives the figures
        themselves, the bootstrap calls it with resampled rows. Every metric it returns is one
        row of the suite's table; a metric that a resample cannot define (AUROC of a label with
        one class in it) is NaN there, and that resample is left out of its interval.
    selected: what the protocol chose on the validation split (e.g. {"lr": 1e-3}), recorded.
    tables: detail tables worth writing (e.g. per-class figures), by name.
    """

    study_ids: list[str]
    score: ScoreFunction
    selected: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pl.DataFrame] = field(default_factory=dict)


class Protocol:
    """Base of the protocols: settings in the constructor, one `run` per encoder.

    headline: the metric the suite's plot shows for this protocol.
    """

    protocol_name: ClassVar[str]
    headline: ClassVar[str]

    def unavailable(self, encoder: EncoderEntry) -> str | None:
        """Why this protocol cannot run for `encoder` (e.g. no text side), or None when it can."""
        return None

    def run(self, context: EvalContext) -> ProtocolResult:
        """Score `context.encoder` on the test studies (fit what it fits on train, select on val)."""
        raise NotImplementedError


def build_protocol(name: str, settings: dict[str, Any] | None) -> Protocol:
    """The protocol `name` built from its YAML section; unknown settings name the protocol."""
    cls = PROTOCOLS.get(name)
    try:
        return cls(**(settings or {}))
    except TypeError as exc:
        raise ProtocolError(
            f"protocols.{name}: {exc}; see the {cls.__name__} docstring for its settings"
        ) from exc


@contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, restoring the thread count after it.

    For protocols that fit small full-batch heads on features (a few hundred studies): torch's
    thread pool costs more than it saves on such matrices, and on a busy machine every parallel
    region waits for a time slice. Measured on 2 cores at load ~7: the linear probe's 12 fits of
    50 steps took 58 s with 2 threads and 0.4 s with one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
