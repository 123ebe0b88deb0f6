"""Key matching shared by the peer-weight adapters: unwrap, find the encoder's prefix, check, load.

Each adapter turns a peer's state dict into a `PeerConversion` (fm3d keys -> tensors, the
encoder to build, the keys it set aside). `check_conversion` compares that with the encoder's
own keys and shapes and returns a `KeyMatchReport`; `load_conversion` refuses to load unless
every encoder tensor is matched and every peer key inside the encoder is used. That is the
point of the module: VoCo's own loader keeps only keys whose names and shapes already agree,
so a prefix mismatch loads nothing and says nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm3d.errors import Fm3dError
from fm3d.models.config import EncoderConfigError
from fm3d.models.registry import create_encoder
from fm3d.models.weights import check_finite

logger = logging.getLogger(__name__)

# Keys under which training scripts nest the weights: plain torch / Lightning ("state_dict"),
# nnU-Net ("network_weights"), VoCo's and MONAI bundles' ("net", "model").
WRAPPER_KEYS = ("state_dict", "network_weights", "net", "model")
# How many names an error message lists before "... and N more".
_SHOWN = 12


class PeerWeightsError(Fm3dError, ValueError):
    """A peer checkpoint whose keys or shapes do not cover an fm3d encoder (or cannot be recognised)."""


@dataclass
class PeerConversion:
    """A peer state dict rewritten for one fm3d encoder, with what was set aside and why.

    weights: fm3d parameter name -> tensor.
    unmapped: peer keys inside the encoder that map to nothing (an error when not empty).
    ignored: peer keys outside the encoder (decoders, task heads, text towers), counted only.
    source: what the weights expect (format, input axes, intensity, size), for `config.source`.
    """

    format: str
    encoder_name: str
    config: dict[str, Any]
    weights: dict[str, torch.Tensor]
    unmapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class KeyMatchReport:
    """How a peer checkpoint covered an fm3d encoder: counts, and the names that did not match."""

    path: str
    format: str
    encoder: str
    matched: int
    ignored: int
    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    shape_mismatched: tuple[str, ...]

    @property
    def complete(self) -> bool:
        """True when every encoder tensor is filled and every peer key inside the encoder was used."""
        return not (self.missing or self.unexpected or self.shape_mismatched)

    def summary(self) -> str:
        """One line of counts, for logs and config.json."""
        return (
            f"{self.format} -> {self.encoder}: {self.matched} matched, {len(self.missing)} missing, "
            f"{len(self.unexpected)} unexpected, {len(self.shape_mismatched)} shape mismatches, "
            f"{self.ignored} non-encoder keys ignored"
        )

    def to_dict(self) -> dict[str, Any]:
        """The report as plain JSON types."""
        return {key: list(v) if isinstance(v, tuple) else v for key, v in asdict(self).items()}


def shown(names: Iterable[str]) -> str:
    """The first few names, then how many more there are."""
    names = list(names)
    head = ", ".join(names[:_SHOWN])
    return head + (f" ... and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def unwrap_state_dict(content: Any, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a loaded checkpoint, looking through the usual wrapper keys."""
    if isinstance(content, nn.Module):  # a pickled whole model, loaded with trust_pickle=True
        return dict(content.state_dict())
    if isinstance(content, Mapping):
        tensors = {key: value for key, value in content.items() if isinstance(value, torch.Tensor)}
        if tensors and len(tensors) == len(content):
            return dict(tensors)
        for key in WRAPPER_KEYS:
            if isinstance(content.get(key), Mapping | nn.Module):
                return unwrap_state_dict(content[key], path)
        if tensors:
            return dict(tensors)
        keys = shown(str(key) for key in content)
        raise PeerWeightsError(
            f"{path}: found no weights. The checkpoint is a dict with keys [{keys}] but none of the "
            f"wrapper keys {list(WRAPPER_KEYS)} holds a state dict. Extract the state dict and save it with "
            "torch.save(state_dict, path)."
        )
    raise PeerWeightsError(
        f"{path}: holds a {type(content).__name__}, not a state dict. Save `model.state_dict()` instead "
        "of the model object."
    )


def find_prefix(keys: Iterable[str], anchor: str, path: str | Path, what: str) -> str:
    """The one prefix P such that P + anchor is a key (P is "" or ends with "."); errors otherwise."""
    keys = list(keys)
    prefixes = sorted({key[: -len(anchor)] for key in keys if key == anchor or key.endswith("." + anchor)})
    if not prefixes:
        raise PeerWeightsError(
            f"{path}: no key ends with '{anchor}', so this is not a {what} checkpoint (or its layout "
            f"is not one fm3d knows). First keys: {shown(keys)}."
        )
    if len(prefixes) > 1:
        raise PeerWeightsError(
            f"{path}: holds several {what} encoders, under the prefixes {prefixes}. Keep the one you want, "
            "e.g. {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}, and save it on its own."
        )
    return prefixes[0]


def split_prefix(state: Mapping[str, torch.Tensor], prefix: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The keys under `prefix` with it removed, and the keys outside it (not part of the encoder)."""
    inside = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    outside = [key for key in state if not key.startswith(prefix)]
    return inside, outside


def check_conversion(encoder: nn.Module, conversion: PeerConversion, path: str | Path) -> KeyMatchReport:
    """Compare a conversion with an encoder's own keys and shapes (works on a meta-device encoder)."""
    expected = {name: tuple(tensor.shape) for name, tensor in encoder.state_dict().items()}
    given = {name: tuple(tensor.shape) for name, tensor in conversion.weights.items()}
    mismatched = tuple(
        f"{name}: file {given[name]} vs encoder {expected[name]}"
        for name in expected
        if name in given and given[name] != expected[name]
    )
    return KeyMatchReport(
        path=str(path),
        format=conversion.format,
        encoder=conversion.encoder_name,
        matched=sum(1 for name in expected if given.get(name) == expected[name]),
        ignored=len(conversion.ignored),
        missing=tuple(name for name in expected if name not in given),
        unexpected=tuple(conversion.unmapped) + tuple(name for name in given if name not in expected),
        shape_mismatched=mismatched,
    )


def describe_failure(report: KeyMatchReport) -> str:
    """The error text for an incomplete match: what did not match, and what to try."""
    parts = [
        f"{report.path}: the {report.format} weights do not cover the {report.encoder} encoder "
        f"({report.summary()})."
    ]
    if report.missing:
        parts.append(f"Missing from the file: {shown(report.missing)}.")
    if report.unexpected:
        parts.append(f"In the file but not in the encoder: {shown(report.unexpected)}.")
    if report.shape_mismatched:
        parts.append(f"Wrong shapes: {shown(report.shape_mismatched)}.")
    parts.append(
        "Nothing was loaded. A truncated or partial file, a different architecture, or the wrong "
        "format= would cause this; see docs/peer-weights.md."
    )
    return " ".join(parts)


def load_conversion(conversion: PeerConversion, path: str | Path) -> nn.Module:
    """Build the conversion's encoder, check the match, and load the weights; refuses any partial match."""
    source = dict(conversion.source, format=conversion.format, file=str(path))
    try:  # the config comes from the file's shapes: a crafted file may describe an absurd model
        encoder = create_encoder(conversion.encoder_name, **conversion.config, source=source)
    except EncoderConfigError as error:
        raise PeerWeightsError(
            f"{path}: the {conversion.format} weights describe an unusable encoder: {error}"
        ) from error
    report = check_conversion(encoder, conversion, path)
    if not report.complete:
        raise PeerWeightsError(describe_failure(report))
    check_finite(conversion.weights, Path(path))
    encoder.load_state_dict(conversion.weights, strict=True)
    encoder.config.source["keys"] = {
        "matched": report.matched,
        "ignored_non_encoder": report.ignored,
    }
    encoder.peer_weights_report = report
    logger.info("loaded %s from %s: %s", conversion.encoder_name, path, report.summary())
    return encoder
