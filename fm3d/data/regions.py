"""Regions of a [D, H, W] volume: where a crop starts, and the crop itself, padded where it leaves the volume.

One crop sampler for both applications. A region starts at a random corner (training), is
centred (evaluation), and may be jittered by a share of its size (downstream's cheap training
shift). Centring: a volume larger than the region is cut from `(n - s) // 2`, a smaller one
sits in the region with `(s - n) // 2` voxels of padding before it (MONAI's `SpatialPad`).

Two readers share the geometry: `read_region` is the pretraining hot path (clip to the HU
window and shift to 0 in one pass from the memory map, docs/benchmarks/data_loading.md);
`crop_or_pad` copies any array's box as it is (label maps, float HU), padded with a fill value.
`scale_window` maps window-shifted values to the intensity range.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Air, the padding of HU crops that do not fit (prepared volumes are clipped well above it).
AIR_HU = -1024.0


def region_start(shape: Sequence[int], size: Sequence[int], rng: np.random.Generator | None) -> list[int]:
    """Random (rng) or centred (None) corner of a region; a smaller volume sits centred in it."""
    starts = []
    for n, s in zip(shape, size, strict=True):
        if n <= s:
            starts.append(-((s - n) // 2))  # symmetric padding, as MONAI SpatialPad
        else:
            starts.append(int(rng.integers(0, n - s + 1)) if rng is not None else (n - s) // 2)
    return starts


def jitter_start(start: Sequence[int], size: Sequence[int], max_shift: float) -> list[int]:
    """`start` shifted per axis by a whole number of voxels up to `max_shift` of the region's size.

    Drawn from torch's global generator, which DataLoader seeds per worker, so every worker
    shifts differently.
    """
    shifted = []
    for s, n in zip(start, size, strict=True):
        reach = int(n * max_shift)
        shifted.append(s + int(torch.randint(-reach, reach + 1, ()).item()))
    return shifted


def _overlap(
    start: Sequence[int], size: Sequence[int], shape: Sequence[int]
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """(source slices in the volume, destination slices in the region), None when they do not meet."""
    src, dst = [], []
    for s, n, length in zip(start, size, shape, strict=True):
        a, b = max(s, 0), min(s + n, length)
        if b <= a:
            return None
        src.append(slice(a, b))
        dst.append(slice(a - s, b - s))
    return tuple(src), tuple(dst)


def crop_or_pad(array: np.ndarray, start: Sequence[int], size: Sequence[int], fill: float) -> np.ndarray:
    """The box [start, start + size) of an array (same dtype), padded with `fill` where it leaves it."""
    out = np.full(tuple(size), fill, dtype=array.dtype)
    boxes = _overlap(start, size, array.shape)
    if boxes is not None:
        out[boxes[1]] = array[boxes[0]]
    return out


def read_region(
    volume: np.ndarray, start: Sequence[int], size: Sequence[int], hu_window: tuple[int, int]
) -> np.ndarray:
    """Window-shifted integer copy of volume[start : start + size]: clip(x, lo, hi) - lo.

    Touches only the slab (one pass: clip from the memmap into the output); voxels outside
    the volume read 0, i.e. the HU floor. Integers keep the copy small; the float scaling
    happens once, straight into the output crops (`scale_window`).
    """
    lo, hi = hu_window
    out = np.zeros(tuple(size), dtype=np.int16 if hi - lo <= np.iinfo(np.int16).max else np.int32)
    boxes = _overlap(start, size, volume.shape)
    if boxes is None:
        return out
    target = out[boxes[1]]
    np.clip(volume[boxes[0]], lo, hi, out=target, casting="unsafe")  # the only read of the volume
    np.subtract(target, lo, out=target, casting="unsafe")
    return out


def scale_window(
    shifted: torch.Tensor,
    hu_window: tuple[int, int],
    intensity_range: tuple[float, float] = (0.0, 1.0),
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Window-shifted values (0 .. hi - lo) to floats in `intensity_range` (into `out` when given).

    The one scaling of HU input in fm3d: the data loaders apply it to integer slabs, downstream
    tasks (`DownstreamTask.prepare_image`) to clipped float batches on any device.
    """
    lo, hi = hu_window
    low, high = intensity_range
    if out is None:
        out = torch.empty(shifted.shape, device=shifted.device)
    # A converting copy then in-place arithmetic is ~3x faster than one promoting multiply on
    # strided integer input (measured with one thread).
    out.copy_(shifted).mul_((high - low) / (hi - lo))
    return out.add_(low) if low else out


def study_crop(image: np.ndarray, size: Sequence[int], max_shift: float | None) -> torch.Tensor:
    """A float32 [1, *size] HU crop of a study: centred, or jittered by up to `max_shift` of its size.

    The jitter is a cheap training augmentation that keeps the anatomy in view; None
    (evaluation) keeps the crop centred. Padding reads air.
    """
    start = region_start(image.shape, size, None)
    if max_shift is not None:
        start = jitter_start(start, size, max_shift)
    return torch.from_numpy(crop_or_pad(image, start, size, AIR_HU).astype(np.float32))[None]
