"""Streaming packs of a prepared cache: whole studies in tar shards, read through fsspec from a path or URL.

A prepared cache (`fm3d prepare`) is a folder of one file per study, read by memory map; on a
cluster whose data sits in an object store, or whose shared filesystem chokes on millions of
small files, training reads it as a *pack* instead: a few large shard files, each a plain tar
in WebDataset's layout, that a loader streams (`fm3d.data.streaming_loader`)::

    URL/pack.json                      format, the shard files and their sizes (written last)
    URL/pack.parquet                   the cache's index rows + where each study is in its shard
    URL/labels.json                    the cache's label names, when it has them
    URL/shards/000000-of-000008.tar    whole studies, three members each:
        s000042.row.parquet            the study's index row (every column, one-row parquet)
        s000042.image.npy              its array file as the cache stores it (.npy or .b2nd)
        s000042.label.npy              its label map, when it has one

Members are keyed by the study's position in the cache index (`s000042`), not by its id, because
WebDataset readers split a member name at its first dot and study ids (DICOM UIDs) hold dots.
Each array is copied as its cache file's bytes: a `.b2nd` study stays compressed in the shard and
a crop decompresses only the chunks it touches (`fm3d.data.cache_formats.CompressedVolume`).

Which shard holds a study: the studies sorted by a blake2b hash of their id, cut into N runs of
equal size (sizes differ by at most one). Equal sizes keep every rank's and worker's share even,
so few batches are padded (`fm3d.data.streaming_loader`); the hash order spreads one patient's
studies and the index's neighbours over the shards. Tar headers carry no time or owner, so the
same cache packs to the same bytes.

Why plain tar and fsspec rather than a streaming library: LitData and MosaicML Streaming both
install torchvision beside torch (checked with pip against torch 2.13 CPU), which fm3d must not
depend on. WebDataset installs cleanly, but a loader needs more than its tar iterator gives:
equal batch counts per rank (DDP), exact mid-epoch resumption and a shuffled read order inside
a shard, which all come from knowing where each study is (`pack.parquet`'s offsets, read by
ranged reads). The shards stay WebDataset-readable for anyone who wants its pipelines.

Writes: a local shard goes through a temporary name and a rename (`fm3d.atomic`); an object
store publishes an object only once its upload completes, so remote shards are written in place.
`pack.json` is written after every shard and the index, so a pack with a `pack.json` is whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import blosc2
import fsspec
import numpy as np
import polars as pl
from fsspec.implementations.local import LocalFileSystem
from tqdm.auto import tqdm

from fm3d.atomic import atomic_path
from fm3d.data.cache import INDEX_FILE, LABEL_NAMES_FILE, PreparedCache
from fm3d.data.cache_formats import BLOSC2, CompressedVolume, VolumeArray, format_of
from fm3d.data.errors import DataError

logger = logging.getLogger(__name__)

PACK_FILE = "pack.json"
PACK_INDEX = "pack.parquet"
SHARDS_DIR = "shards"
PACK_FORMAT = "fm3d-pack"
PACK_VERSION = 1
# Where a study's members are in its shard: the pack index's columns beside the cache's own.
POSITION_COLUMNS: tuple[str, ...] = (
    "pack_shard",
    "pack_key",
    "image_offset",
    "image_bytes",
    "label_offset",
    "label_bytes",
)
_BLOCK = tarfile.BLOCKSIZE  # one ustar header: the member names here are short, never a pax header
_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
PACK_HINT = "pack the cache again: `fm3d stream pack CACHE --to URL --shards N`"


class PackError(DataError):
    """A pack (or one of its shards) is missing, incomplete or damaged; the message names the URL."""

    def __init__(self, url: str | Path, reason: str, hint: str = "") -> None:
        super().__init__(url, reason, hint)
        # PathError's Path() would fold "s3://bucket" into "s3:/bucket": keep the URL as written.
        self.url = str(url)
        message = f"{self.url}: {reason}"
        self.args = (message + (f". {hint[0].upper()}{hint[1:]}" if hint else ""),)

    def __reduce__(self):
        return (type(self), (self.url, self.reason, self.hint))


@dataclass(frozen=True)
class ShardFile:
    """One shard of a pack: its file (relative to the pack URL), its studies and its size in bytes."""

    file: str
    studies: int
    bytes: int


@dataclass(frozen=True)
class PackStats:
    """What `pack_cache` wrote: shards, studies, bytes and the wall time it took."""

    url: str
    shards: int
    studies: int
    bytes: int
    seconds: float


def shard_name(index: int, count: int) -> str:
    """The shard file's path inside a pack, e.g. `shards/000003-of-000008.tar` (sorts by index)."""
    return f"{SHARDS_DIR}/{index:06d}-of-{count:06d}.tar"


def hash_order(study_ids: list[str]) -> list[str]:
    """`study_ids` sorted by a blake2b hash of each id: the order the shards are cut from."""
    return sorted(study_ids, key=lambda s: hashlib.blake2b(s.encode("utf-8"), digest_size=8).digest())


def pack_cache(
    cache: str | Path | PreparedCache,
    url: str,
    shards: int,
    storage_options: dict[str, Any] | None = None,
    progress: bool = True,
) -> PackStats:
    """Write the prepared studies of `cache` as `shards` tar shards at `url` (a path or fsspec URL).

    Every study with status "ok" goes into exactly one shard with its index row and its label map.
    A pack already at `url` is replaced: its `pack.json` is rewritten last and shard files of an
    earlier split that the new one does not list are deleted.
    """
    started = time.perf_counter()
    cache = cache if isinstance(cache, PreparedCache) else PreparedCache(cache)
    if not 1 <= shards <= len(cache):
        raise PackError(
            cache.root,
            f"cannot be packed into {shards} shards: it has {len(cache)} prepared studies and a shard "
            "holds at least one",
            f"choose --shards between 1 and {len(cache)}",
        )
    fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
    positions = {study_id: i for i, study_id in enumerate(cache.study_ids)}
    ordered = hash_order(cache.study_ids)
    cuts = [len(ordered) * i // shards for i in range(shards + 1)]
    located: dict[str, dict[str, Any]] = {}
    files: list[ShardFile] = []
    for index in tqdm(range(shards), desc="packing shards", unit="shard", disable=not progress):
        members = ordered[cuts[index] : cuts[index + 1]]
        name = shard_name(index, shards)
        with _writable(fs, f"{root}/{name}") as handle:
            located.update(_write_shard(handle, cache, members, positions, index))
        files.append(ShardFile(name, len(members), int(fs.size(f"{root}/{name}"))))
    locations = pl.DataFrame([located[study_id] for study_id in cache.study_ids])
    index = pl.concat([cache.index, locations.drop("study_id")], how="horizontal")
    with _writable(fs, f"{root}/{PACK_INDEX}") as handle:
        index.write_parquet(handle)
    names = cache.root / LABEL_NAMES_FILE
    if names.is_file():
        with _writable(fs, f"{root}/{LABEL_NAMES_FILE}") as handle:
            handle.write(names.read_bytes())
    description = {
        "format": PACK_FORMAT,
        "version": PACK_VERSION,
        "source": str(cache.root.resolve()),
        "order": "blake2b hash of study_id, cut into equal runs",
        "studies": len(cache),
        "shards": [vars(f) for f in files],
    }
    with _writable(fs, f"{root}/{PACK_FILE}") as handle:
        handle.write(json.dumps(description, indent=1).encode())
    _remove_stale_shards(fs, root, {f.file for f in files})
    total = sum(f.bytes for f in files)
    return PackStats(fs.unstrip_protocol(root), shards, len(cache), total, time.perf_counter() - started)


def _write_shard(
    handle: BinaryIO, cache: PreparedCache, members: list[str], positions: dict[str, int], index: int
) -> dict[str, dict[str, Any]]:
    """Write one shard's tar into `handle`; returns each study's location columns by id."""
    located = {}
    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for study_id in members:
            key = f"s{positions[study_id]:06d}"
            row = io.BytesIO()
            cache.index.slice(positions[study_id], 1).write_parquet(row)
            _add_member(tar, f"{key}.row.parquet", io.BytesIO(row.getvalue()), row.tell())
            where: dict[str, Any] = {"study_id": study_id, "pack_shard": index, "pack_key": key}
            for kind, relative in (("image", cache.row(study_id)["image_file"]),
                                   ("label", cache.row(study_id)["label_file"])):  # fmt: skip
                if relative is None:
                    where[f"{kind}_offset"] = where[f"{kind}_bytes"] = None
                    continue
                path = cache.root / relative
                size = path.stat().st_size
                with path.open("rb") as source:
                    where[f"{kind}_offset"] = _add_member(tar, f"{key}.{kind}{path.suffix}", source, size)
                where[f"{kind}_bytes"] = size
            located[study_id] = where
    return located


def _add_member(tar: tarfile.TarFile, name: str, data: BinaryIO, size: int) -> int:
    """Append `size` bytes of `data` as a member with a reproducible header; returns where its data starts."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    header_at = tar.offset
    tar.addfile(info, data)
    return header_at + _BLOCK


@contextmanager
def _writable(fs: fsspec.AbstractFileSystem, path: str) -> Iterator[BinaryIO]:
    """A file to write `path` through: atomic (temporary name + rename) on a local filesystem."""
    if isinstance(fs, LocalFileSystem):
        with atomic_path(path) as temp, temp.open("wb") as handle:
            yield handle
        return
    # An object store makes an object visible only when its upload completes: written in place.
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wb") as handle:
        yield handle


def _remove_stale_shards(fs: fsspec.AbstractFileSystem, root: str, listed: set[str]) -> None:
    """Delete shard files an earlier pack into another number of shards left at `root`."""
    for path in fs.glob(f"{root}/{SHARDS_DIR}/*-of-*.tar"):
        relative = f"{SHARDS_DIR}/{path.rsplit('/', 1)[-1]}"
        if relative not in listed:
            fs.rm(path)


class PackedCache(PreparedCache):
    """A pack opened for reading: `PreparedCache`'s index API, its arrays read out of the shards.

    `image` and `label` read the study's member with one ranged read of its shard (an open
    handle per shard is kept, per process) and return it decoded: an array over the read bytes
    (`.npy`) or a `CompressedVolume` whose slices decompress only their chunks (`.b2nd`). So the
    datasets built on a `PreparedCache` (`fm3d.data.datasets.CTDataset`) read a pack unchanged.
    Damage is reported as a `PackError` naming the shard: a missing or resized shard file, or a
    member whose tar header or array header is not the one `pack.parquet` promises. Voxel bytes
    carry no checksum (hashing every study on every read would cost more than reading it).
    """

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.storage_options = dict(storage_options or {})
        self.fs, self.path = fsspec.core.url_to_fs(url, **self.storage_options)
        self.url = url if isinstance(self.fs, LocalFileSystem) else self.fs.unstrip_protocol(self.path)
        self.root = Path(self.path)  # what PreparedCache's messages name
        description = self._description()
        self.shards = [ShardFile(**s) for s in description["shards"]]
        index_url = self._url(PACK_INDEX)
        try:
            index = pl.read_parquet(io.BytesIO(self.fs.cat_file(f"{self.path}/{PACK_INDEX}")))
        except FileNotFoundError:
            raise PackError(index_url, f"is missing beside {PACK_FILE}", PACK_HINT) from None
        except Exception as exc:  # pyarrow/polars raise several types for a damaged file
            raise PackError(index_url, f"cannot be read as parquet ({exc})", PACK_HINT) from exc
        needed = ("study_id", "image_file", "label_file", *POSITION_COLUMNS)
        missing = [c for c in needed if c not in index.columns]
        if missing:
            raise PackError(index_url, f"lacks the columns {missing}", PACK_HINT)
        self._adopt_index(index)  # what PreparedCache's methods read (row, shape, spacing, input_spec, ...)
        self._handles: tuple[int, int, BinaryIO] | None = None  # (pid, shard, open file)
        self._checked: set[int] = set()

    def __repr__(self) -> str:
        return f"PackedCache({self.url!r}, studies={len(self)}, shards={len(self.shards)})"

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get their own handles; an fsspec filesystem re-creates itself when pickled.
        return {**self.__dict__, "_handles": None}

    def shard_positions(self) -> list[list[int]]:
        """Each shard's studies as positions in `study_ids`, in the order the shard stores them."""
        shard_of = self.index["pack_shard"].to_list()
        members: list[list[int]] = [[] for _ in self.shards]
        for position, shard in enumerate(shard_of):
            members[shard].append(position)
        offsets = self.index["image_offset"].to_list()
        return [sorted(m, key=offsets.__getitem__) for m in members]

    def image(self, study_id: str) -> VolumeArray:
        """The study's int16 HU volume [D, H, W], read out of its shard."""
        return self._member(study_id, "image")

    def label(self, study_id: str) -> VolumeArray | None:
        """The study's label map [D, H, W], or None without one."""
        return None if self.row(study_id)["label_file"] is None else self._member(study_id, "label")

    def _description(self) -> dict[str, Any]:
        where = self._url(PACK_FILE)
        try:
            description = json.loads(self.fs.cat_file(f"{self.path}/{PACK_FILE}"))
        except FileNotFoundError:
            if self.fs.exists(f"{self.path}/{INDEX_FILE}"):
                raise PackError(
                    self.url,
                    f"is a prepared cache ({INDEX_FILE}), not a pack",
                    PACK_HINT.replace("CACHE", self.url),
                ) from None
            raise PackError(
                self.url, f"has no {PACK_FILE}, so it is no pack or its packing did not finish", PACK_HINT
            ) from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise PackError(where, f"is not readable JSON ({exc})", PACK_HINT) from exc
        if description.get("format") != PACK_FORMAT or description.get("version") != PACK_VERSION:
            raise PackError(
                where,
                f"describes {description.get('format')!r} version {description.get('version')!r}, "
                f"not {PACK_FORMAT} version {PACK_VERSION}",
                PACK_HINT,
            )
        return description

    def _url(self, relative: str) -> str:
        return f"{self.url.rstrip('/')}/{relative}"

    def _shard(self, shard: int) -> BinaryIO:
        """The open file of shard `shard` in this process (one kept open; its size checked once)."""
        pid = os.getpid()
        if self._handles is not None and self._handles[:2] == (pid, shard):
            return self._handles[2]
        if self._handles is not None and self._handles[0] == pid:
            self._handles[2].close()
        listed = self.shards[shard]
        path, url = f"{self.path}/{listed.file}", self._url(listed.file)
        try:
            if shard not in self._checked and (size := int(self.fs.size(path))) != listed.bytes:
                raise PackError(
                    url, f"holds {size} bytes where {PACK_FILE} lists {listed.bytes}: cut short or replaced",
                    PACK_HINT,
                )  # fmt: skip
            handle = self.fs.open(path, "rb")
        except FileNotFoundError:
            raise PackError(url, f"is listed in {PACK_FILE} but missing", PACK_HINT) from None
        self._checked.add(shard)
        self._handles = (pid, shard, handle)
        return handle

    def _member(self, study_id: str, kind: str) -> VolumeArray:
        row = self.row(study_id)
        shard, offset, size = row["pack_shard"], row[f"{kind}_offset"], row[f"{kind}_bytes"]
        name = f"{row['pack_key']}.{kind}{Path(row[f'{kind}_file']).suffix}"
        url = self._url(self.shards[shard].file)
        handle = self._shard(shard)
        handle.seek(offset - _BLOCK)
        data = handle.read(_BLOCK + size)
        header = data[:100].rstrip(b"\0").decode("utf-8", "replace")
        if len(data) != _BLOCK + size or header != name:
            raise PackError(
                url,
                f"does not hold {name} (study {study_id}) where {PACK_INDEX} puts it "
                f"(found {header!r}, {len(data) - _BLOCK} of {size} bytes)",
                PACK_HINT,
            )
        return _decode(memoryview(data)[_BLOCK:], row[f"{kind}_file"], url, study_id)


def _decode(data: memoryview, cache_file: str, url: str, study_id: str) -> VolumeArray:
    """An array over a member's bytes: a read-only view of a `.npy`, a `CompressedVolume` of a `.b2nd`."""
    try:
        if format_of(cache_file) == BLOSC2:
            array = blosc2.ndarray_from_cframe(bytes(data))
            return CompressedVolume(array, Path(f"{url}#{study_id}"))
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        shape, fortran, dtype = _NPY_HEADERS[version](stream)
        if fortran:
            raise ValueError("Fortran-ordered arrays are not written by fm3d prepare")
        voxels = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=stream.tell())
        return voxels.reshape(shape)
    except (ValueError, KeyError, RuntimeError, EOFError) as exc:
        raise PackError(url, f"holds an unreadable array for study {study_id} ({exc})", PACK_HINT) from exc


def open_cache(location: str | Path) -> PreparedCache:
    """The cache at `location`: a pack (a URL, or a folder holding pack.json) or a prepared folder.

    Data modules take either as `cache_dir`, so training reads a pack by naming it.
    """
    text = str(location)
    if "://" in text or (Path(text) / PACK_FILE).is_file():
        return PackedCache(text)
    return PreparedCache(location)
