"""The peer-format registry: each peer module declares its format; detection asks them all.

A peer module registers its converter with `@register_peer_format(name, detect=..., priority=...)`
in its own file; `peer_formats()` imports every module of this package (pkgutil) and of the
`fm3d.peer_formats` entry points, so a new peer format is one new file here (or in another
package) and nothing else. `detect_format` asks every registered
detector and takes the highest priority that matches: a more specific layout (M3D's MONAI ViT)
outranks the general one it specialises (any MONAI ViT). A tie at the top, or no match, is an
error that lists what each detector saw or looked for.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fm3d.models.adapters.matching import PeerConversion, PeerWeightsError, shown
from fm3d.plugins import import_package_modules, load_entry_points

PEER_FORMAT_ENTRY_POINTS = "fm3d.peer_formats"

# A detector returns what it recognised (e.g. "key 'vit.patch_embedding.position_embeddings'"), or
# None when the state dict is not its layout.
Detector = Callable[[Mapping[str, torch.Tensor]], str | None]
Converter = Callable[..., PeerConversion]


@dataclass(frozen=True)
class PeerFormat:
    """One peer layout: how to recognise it, how much to trust that, and how to convert it.

    looks_for: what `detect` checks, for the message when nothing matches.
    hints: keyword arguments `convert` takes beyond (state, path), for what files do not store.
    """

    name: str
    detect: Detector
    convert: Converter
    priority: int
    looks_for: str
    hints: tuple[str, ...] = ()


_FORMATS: dict[str, PeerFormat] = {}


def register_peer_format(
    name: str, *, detect: Detector, priority: int, looks_for: str, hints: tuple[str, ...] = ()
) -> Callable[[Converter], Converter]:
    """Register the decorated `convert(state, path, **hints) -> PeerConversion` as peer format `name`."""

    def decorator(convert: Converter) -> Converter:
        known = _FORMATS.get(name)
        if known is not None and known.convert is not convert:
            raise PeerWeightsError(
                f"peer format {name!r} is registered twice ({known.convert} and {convert})."
            )
        _FORMATS[name] = PeerFormat(name, detect, convert, priority, looks_for, tuple(hints))
        return convert

    return decorator


def _discover() -> None:
    """Import every module of this package and of the `fm3d.peer_formats` entry points.

    Each peer module registers its format on import; a package outside fm3d declares an entry
    point naming its module (`[project.entry-points."fm3d.peer_formats"]`).
    """
    import_package_modules(__package__)
    load_entry_points(PEER_FORMAT_ENTRY_POINTS)


def peer_formats() -> dict[str, PeerFormat]:
    """The registered peer formats by name (every peer module in this package, and any registered since)."""
    _discover()
    return dict(_FORMATS)


def peer_format(name: str, path: str | Path = "<state dict>") -> PeerFormat:
    """The registered format `name`; an unknown name is an error listing the known ones."""
    formats = peer_formats()
    if name not in formats:
        raise PeerWeightsError(f"{path}: unknown format {name!r}; peer formats: {sorted(formats)}.")
    return formats[name]


def detect_format(state: Mapping[str, torch.Tensor], path: str | Path = "<state dict>") -> str:
    """The registered format with the highest priority whose detector recognises `state`."""
    formats = peer_formats()
    seen = {name: fmt.detect(state) for name, fmt in formats.items()}
    matches = sorted(
        (name for name, evidence in seen.items() if evidence is not None),
        key=lambda name: -formats[name].priority,
    )
    if not matches:
        looked = "; ".join(f"{name}: {fmt.looks_for}" for name, fmt in sorted(formats.items()))
        raise PeerWeightsError(
            f"{path}: not an fm3d encoder, and no peer layout recognised. Looked for {looked}. "
            f"First keys: {shown(state)}. fm3d reads the peers' files under their own module names; "
            "rename renamed keys back, or pass format=..."
        )
    top = formats[matches[0]].priority
    tied = [name for name in matches if formats[name].priority == top]
    if len(tied) > 1:
        found = "; ".join(f"{name} (priority {top}) saw {seen[name]}" for name in tied)
        raise PeerWeightsError(
            f"{path}: several peer layouts match equally well: {found}. Pass format= one of {tied}."
        )
    return matches[0]
