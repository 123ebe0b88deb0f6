"""On-disk formats of a prepared study array: plain `.npy` (memory-mapped) or chunked, compressed `.b2nd`.

The format is per file and its suffix says which (`image_file` / `label_file` in the index), so
one cache may hold both and be converted study by study (`fm3d prepare --convert`). Both read
back as something that slices like an array: `volume[z0:z1, y0:y1, x0:x1]` is an np.ndarray,
`volume.shape` / `volume.dtype` answer without reading voxels, and `np.asarray(volume)` is the
whole volume. A `.npy` is a read-only memory map; a `.b2nd` is a `CompressedVolume`, whose
slice decompresses only the chunks the box touches.

Why blosc2 NDArray (python-blosc2) rather than zarr v3 with its blosc codec, measured on the
TotalSegmentator example CT prepared at the demo spacing (3, 1.5, 1.5) mm and at 1.5 mm, and on
the demo cohort (docs/benchmarks/cache_formats.md):

- bytes: blosc2's byte-delta filter after shuffle, under zstd, stores the real CT in 0.39-0.41x
  the `.npy` bytes; zarr's blosc codec offers shuffle or bitshuffle only, 0.44-0.47x at the
  same zstd level, above the 0.45x target at the demo spacing.
- crop read time, one thread: a (64, 192, 192) VoCo-v2 region or a 32^3 crop read in 1-2 ms per
  crop from `.b2nd` against 4-12 ms through zarr's (asynchronous) array API.
- one file per study: a `.b2nd` is one contiguous frame, so it is written like a `.npy` (temporary
  name, fsync, rename: `fm3d.atomic`), `--merge` moves it by its relative name and its size and
  mtime fingerprint it; a zarr v3 array is a folder of chunk files (or of shards), which
  neither renames atomically over an old one nor keeps the file count of a large cache down.

The codec is fixed: zstd level 5 after shuffle + byte-delta (levels 1 and 9 were within 0.02x
of its bytes; lz4 and lz4hc read about twice as fast but stored 0.46-0.58x). Chunks are 32^3
voxels (blosc2 then makes each chunk one block): 64^3 chunks stored the same bytes and read the
multi-crop view more slowly, its small crops dragging along more of each partly touched chunk.
Reads use one decompression thread, a DataLoader worker's share of the CPU.

What it costs: a crop is decompressed on every read, about 1 GB/s of int16 per core with this
codec, where a `.npy` in the page cache is a memory copy. VoCo-v2's (64, 192, 192) region thus
reads at about 0.3x the memory map's samples/s (docs/benchmarks/cache_formats.md); the multi-crop
view with its augmentation at about 0.8x.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import blosc2
import numpy as np

from fm3d.atomic import atomic_path
from fm3d.data.atomic import npy_intact, save_npy
from fm3d.data.errors import CacheError

NPY = "npy"
BLOSC2 = "blosc2"
SUFFIXES: dict[str, str] = {NPY: ".npy", BLOSC2: ".b2nd"}
CACHE_FORMATS: tuple[str, ...] = tuple(SUFFIXES)

CHUNK_SHAPE: tuple[int, int, int] = (32, 32, 32)
# Fixed so that one cache's files compare byte for byte; nthreads=1: prepare's workers are the parallelism.
CODEC = blosc2.CParams(
    codec=blosc2.Codec.ZSTD, clevel=5, filters=[blosc2.Filter.SHUFFLE, blosc2.Filter.BYTEDELTA], nthreads=1
)
_READ = blosc2.DParams(nthreads=1)
# What blosc2 raises for a file that is not a readable frame (truncated, overwritten, not blosc2).
_OPEN_ERRORS = (RuntimeError, OSError, ValueError, KeyError, TypeError)


class CompressedVolume:
    """A study array stored as a blosc2 NDArray (`.b2nd`), read by slicing.

    `volume[box]` decompresses only the chunks `box` touches and returns an np.ndarray;
    `np.asarray(volume)` decompresses it whole. `array` is the blosc2 NDArray itself, for
    format-level access (chunk layout, compression parameters).
    """

    def __init__(self, array: blosc2.NDArray, path: Path) -> None:
        self.array = array
        self.path = path

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.array.dtype

    @property
    def ndim(self) -> int:
        return len(self.array.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"CompressedVolume({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"

    def __getitem__(self, key: Any) -> np.ndarray:
        try:
            return np.asarray(self.array[key])
        except RuntimeError as exc:  # blosc2's error for a chunk that does not decompress
            raise CacheError(
                self.path,
                f"cannot be decompressed ({exc})",
                "delete it and re-run `fm3d prepare` on its cache, which prepares the study again",
            ) from exc

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        # Every call decompresses afresh, so the array is always a copy, whatever `copy` asks.
        whole = self[...]
        return whole if dtype is None else whole.astype(dtype, copy=False)


VolumeArray = np.ndarray | CompressedVolume


def format_of(name: str | Path) -> str:
    """The format of a cache file, from its suffix; `CacheError` for a suffix no format uses."""
    suffix = Path(name).suffix
    for cache_format, known in SUFFIXES.items():
        if suffix == known:
            return cache_format
    raise CacheError(
        Path(name),
        f"has the suffix {suffix!r}, which is no prepared-cache format ({', '.join(SUFFIXES.values())})",
        "re-run `fm3d prepare` on its cache",
    )


def array_file(folder: str, study_id: str, cache_format: str) -> str:
    """The relative name of a study's array in `folder` (studies/ or labels/) in `cache_format`."""
    return f"{folder}/{study_id}{SUFFIXES[cache_format]}"


def save_array(path: Path, array: np.ndarray, chunks: tuple[int, ...] = CHUNK_SHAPE) -> None:
    """Write an array atomically in the format `path`'s suffix names (`chunks` only shapes a `.b2nd`)."""
    if format_of(path) == NPY:
        save_npy(path, array)
        return
    with atomic_path(path) as temp:
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(temp), mode="w", chunks=chunks, cparams=CODEC)


def open_array(path: Path) -> VolumeArray:
    """A cache array for reading: a read-only memory map (`.npy`) or a `CompressedVolume` (`.b2nd`)."""
    cache_format = format_of(path)
    if not path.is_file():
        raise CacheError(path, "is listed in the index but missing", "re-run `fm3d prepare` on this folder")
    if cache_format == NPY:
        try:
            return np.load(path, mmap_mode="r")
        except ValueError as exc:
            raise CacheError(path, f"is not a readable .npy file ({exc})", "re-run `fm3d prepare`") from exc
    try:
        array = blosc2.open(str(path), mode="r", dparams=_READ)
    except _OPEN_ERRORS as exc:
        raise CacheError(path, f"is not a readable .b2nd file ({exc})", "re-run `fm3d prepare`") from exc
    if not isinstance(array, blosc2.NDArray):
        raise CacheError(
            path, f"holds a blosc2 {type(array).__name__}, not an NDArray", "re-run `fm3d prepare`"
        )
    return CompressedVolume(array, path)


def array_intact(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether a cache file still holds a readable array of `shape`, without reading its voxels.

    `.npy`: the header promises `shape` and the file has exactly the bytes it promises. `.b2nd`:
    the frame opens (blosc2 checks its trailer against the file length, so a truncated file
    fails) as an NDArray of `shape`.
    """
    if format_of(path) == NPY:
        return npy_intact(path, shape)
    try:
        array = blosc2.open(str(path), mode="r")
    except _OPEN_ERRORS:
        return False
    return isinstance(array, blosc2.NDArray) and tuple(array.shape) == tuple(shape)
