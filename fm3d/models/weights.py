"""Weight files: read and write .safetensors, refuse unreadable or non-finite weights.

`fm3d.io` (fm3d's own exports and checkpoints), the peer-weight adapters and the CLIP towers
all read weights through here, so neither of them imports the other for it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fm3d.atomic import atomic_path
from fm3d.errors import Fm3dError


class EncoderLoadError(Fm3dError, RuntimeError):
    """An encoder file or folder that cannot be read or does not match its config."""


def listed(names: list[str], limit: int = 12) -> str:
    """The first `limit` names, then how many more there are (for error messages)."""
    return ", ".join(names[:limit]) + (f" ... and {len(names) - limit} more" if len(names) > limit else "")


def unreadable_weights(path: Path, error: Exception) -> EncoderLoadError:
    """The error for a weight file torch or safetensors could not read: the file, the reason, the way out."""
    return EncoderLoadError(
        f"{path} could not be read: {error}. The file is truncated or corrupt (an interrupted download "
        "or copy?), or not a PyTorch/safetensors file; download or save it again."
    )


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as .safetensors atomically (a killed save leaves the previous file whole)."""
    with atomic_path(path) as temp:
        save_file(tensors, temp, metadata=metadata)


def read_safetensors(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file; a truncated or corrupt file is an EncoderLoadError naming it."""
    try:
        return load_file(path, device=str(map_location))
    except SafetensorError as error:
        raise unreadable_weights(path, error) from error


def check_finite(state: dict[str, torch.Tensor], source: Path) -> None:
    """Refuse weights holding NaN or infinity: an encoder built from them returns NaN for every input."""
    bad = {
        name: int((~torch.isfinite(tensor)).sum())
        for name, tensor in state.items()
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())
    }
    if bad:
        counts = [f"{name} ({count} values)" for name, count in bad.items()]
        raise EncoderLoadError(
            f"{source}: {len(bad)} tensor(s) hold NaN or infinite values: {listed(counts)}. The weights "
            "come from a diverged run or a damaged file; export them again from a healthy checkpoint."
        )
