"""Report embeddings computed once by a frozen text tower, stored on disk, read by the data loader.

A frozen text tower gets no gradients, so its embedding of a report never changes: `fm3d
text-cache build` computes every report's embedding once, and CLIP pretraining in `frozen` mode
reads them from here instead of loading the text model (Pillar-0 trains this way).

A cache is a folder:

    settings.json         the tower's `TextSettings`, the embedding width `dim`, `format_version`
    parts/*.parquet       rows (text_sha256: str, embedding: float32[dim]), written atomically

An entry's key is the SHA-256 of the report as the tower embeds it (`clean_report`, lowercased
when the settings say so), so a report that changes gets a new key and a rebuild embeds only the
reports that changed. Each flush writes a new part atomically, so a killed build leaves only
complete parts and a rerun resumes; `shard=(i, n)` takes the keys with `int(key, 16) % n == i`,
so n SLURM array tasks write disjoint parts into one folder that together equal one build.
A cache built with other settings than a run's is refused, naming every difference.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from tqdm.auto import tqdm

from fm3d.data.atomic import write_json, write_parquet
from fm3d.errors import Fm3dError
from fm3d.text import clean_report

if TYPE_CHECKING:
    from fm3d.text import TextTower

FORMAT_VERSION = 1
SETTINGS_FILE = "settings.json"
PARTS_FOLDER = "parts"
# Keys of settings.json that describe the cache rather than the embedding of a text.
_LAYOUT_KEYS = ("dim", "format_version")
# The model's name is how a user called it; its files' hash says whether it is the same model.
_NAMING_KEYS = ("model",)


class TextCacheError(Fm3dError):
    """A folder that is not a usable report-embedding cache, or one that does not fit the run."""


def text_key(text: str | None, lowercase: bool) -> str:
    """The cache key of a report: SHA-256 (hex) of the text the tower embeds."""
    return hashlib.sha256(clean_report(text, lowercase).encode()).hexdigest()


def setting_differences(cached: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Every embedding setting in which `cached` differs from `expected`, as "name: cache X, this run Y"."""
    names = [k for k in dict.fromkeys([*expected, *cached]) if k not in (*_LAYOUT_KEYS, *_NAMING_KEYS)]
    differences = [
        f"{name}: cache {cached.get(name)!r}, this run {expected.get(name)!r}"
        for name in names
        if cached.get(name) != expected.get(name)
    ]
    if any(d.startswith("model_hash") for d in differences) and cached.get("model") != expected.get("model"):
        differences.insert(0, f"model: cache {cached.get('model')!r}, this run {expected.get('model')!r}")
    return differences


def _read_settings(directory: Path) -> dict[str, Any]:
    file = directory / SETTINGS_FILE
    if not file.is_file():
        raise TextCacheError(
            f"{directory} is not a report-embedding cache (no {SETTINGS_FILE}); write one with "
            "`fm3d text-cache build --out <folder>`"
        )
    try:
        settings = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TextCacheError(f"{file} is not valid JSON ({error}); build the cache again") from error
    if not isinstance(settings, dict) or settings.get("format_version") != FORMAT_VERSION:
        found = settings.get("format_version") if isinstance(settings, dict) else None
        raise TextCacheError(
            f"{file} has format version {found!r}, this fm3d reads {FORMAT_VERSION}; build the cache again"
        )
    return settings


def _part_files(directory: Path) -> list[Path]:
    """Finished parts (temporaries of a running or killed writer start with "." and are left out)."""
    return sorted(p for p in (directory / PARTS_FOLDER).glob("*.parquet") if not p.name.startswith("."))


def _cached_keys(directory: Path) -> set[str]:
    return {
        key
        for part in _part_files(directory)
        for key in pl.read_parquet(part, columns=["text_sha256"])["text_sha256"].to_list()
    }


class TextEmbeddingCache:
    """A report-embedding cache folder, opened for reading.

    Settings come from settings.json when opened (cheap: a run checks them before its data is
    set up); the embeddings are read on first use, all parts at once, into one matrix.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.settings = _read_settings(self.directory)
        if not _part_files(self.directory):
            raise TextCacheError(
                f"{self.directory} holds no embeddings yet (no {PARTS_FOLDER}/*.parquet); run "
                f"`fm3d text-cache build --out {self.directory}` to (re)start the build"
            )

    @property
    def dim(self) -> int:
        return int(self.settings["dim"])

    @cached_property
    def _rows(self) -> tuple[dict[str, int], np.ndarray]:
        """Every entry's row number by key, and the matrix [entries, dim] (float32)."""
        table = pl.concat([pl.read_parquet(p) for p in _part_files(self.directory)])
        table = table.unique(subset="text_sha256", keep="first", maintain_order=True)
        matrix = table["embedding"].to_numpy().astype(np.float32, copy=False).reshape(table.height, self.dim)
        return {key: row for row, key in enumerate(table["text_sha256"].to_list())}, matrix

    def __len__(self) -> int:
        return len(self._rows[0])

    def key(self, text: str | None) -> str:
        """The key of `text` under this cache's settings."""
        return text_key(text, bool(self.settings["lowercase"]))

    def missing(self, texts: Sequence[str | None]) -> list[int]:
        """Indices of the texts that have no embedding here (empty texts never do: they embed as zeros)."""
        rows = self._rows[0]
        lowercase = bool(self.settings["lowercase"])
        return [
            i for i, text in enumerate(texts) if clean_report(text, lowercase) and self.key(text) not in rows
        ]

    def vectors(self, texts: Sequence[str | None]) -> np.ndarray:
        """Embeddings [len(texts), dim] float32 in the order of `texts`; zeros for empty texts."""
        missing = self.missing(texts)
        if missing:
            raise TextCacheError(
                f"{self.directory} has no embedding for {len(missing)} of {len(texts)} texts; run "
                f"`fm3d text-cache build --out {self.directory}` over them (only missing ones are embedded)"
            )
        rows, matrix = self._rows
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        lowercase = bool(self.settings["lowercase"])
        for i, text in enumerate(texts):
            if clean_report(text, lowercase):
                out[i] = matrix[rows[self.key(text)]]
        return out

    def check_settings(self, expected: Mapping[str, Any]) -> None:
        """Refuse this cache for a run whose text settings differ, naming each difference."""
        differences = setting_differences(self.settings, expected)
        if differences:
            raise TextCacheError(
                f"the report-embedding cache {self.directory} was built with other text settings "
                f"({'; '.join(differences)}); build one with this run's settings into another folder "
                "(`fm3d text-cache build --out <new folder>` with the run's model, pooling, max length, "
                "prefix and long-report options) and point data.text_embeddings at it"
            )

    def size_on_disk(self) -> int:
        """Bytes of settings.json and every part."""
        return sum(p.stat().st_size for p in [self.directory / SETTINGS_FILE, *_part_files(self.directory)])


@dataclass(frozen=True)
class BuildStats:
    """What one `build_text_cache` call did: texts embedded now, found cached, empty; its wall time."""

    embedded: int
    reused: int
    skipped_empty: int
    seconds: float


def _shard_of(key: str, shards: int) -> int:
    return int(key, 16) % shards


def build_text_cache(
    tower: TextTower,
    texts: Sequence[str | None],
    out: str | Path,
    *,
    batch_size: int = 32,
    shard: tuple[int, int] = (0, 1),
    progress: bool = True,
    flush_every: int = 512,
) -> BuildStats:
    """Embed the texts `out` lacks with `tower` (frozen, eval mode) and add them to the cache in `out`.

    Identical texts are embedded once; with `shard=(i, n)` only the keys of shard i of n are
    considered, so array tasks split one build. Every `flush_every` embeddings become one part,
    written atomically: a killed build keeps what it flushed and a rerun embeds only the rest.
    A folder built with other settings is refused.
    """
    index, count = shard
    if not 0 <= index < count:
        raise TextCacheError(f"shard {index}/{count} does not exist: the index must be in 0..{count - 1}")
    if batch_size < 1 or flush_every < 1:
        raise TextCacheError(f"batch_size ({batch_size}) and flush_every ({flush_every}) must be positive")
    started = time.perf_counter()
    out = Path(out)
    settings = {**tower.settings.to_dict(), "dim": tower.hidden_size, "format_version": FORMAT_VERSION}
    if (out / SETTINGS_FILE).exists():
        cached = _read_settings(out)
        differences = setting_differences(cached, settings) + [
            f"{name}: cache {cached.get(name)!r}, this build {settings[name]!r}"
            for name in _LAYOUT_KEYS
            if cached.get(name) != settings[name]
        ]
        if differences:
            raise TextCacheError(
                f"{out} holds embeddings made with other settings ({'; '.join(differences)}); "
                "build into another folder, or delete this one to replace it"
            )
    else:
        write_json(out / SETTINGS_FILE, settings)
    (out / PARTS_FOLDER).mkdir(parents=True, exist_ok=True)

    by_key: dict[str, str | None] = {}
    skipped_empty = 0
    for text in texts:
        if not clean_report(text, tower.settings.lowercase):
            skipped_empty += 1
            continue
        key = text_key(text, tower.settings.lowercase)
        if _shard_of(key, count) == index:
            by_key.setdefault(key, text)
    present = _cached_keys(out)
    todo = sorted((k for k in by_key if k not in present), key=lambda k: len(by_key[k] or ""))
    bar = tqdm(total=len(todo), unit="report", desc="embedding reports", disable=not progress)
    try:
        for start in range(0, len(todo), flush_every):
            keys = todo[start : start + flush_every]
            vectors = tower.embed([by_key[k] for k in keys], batch_size=batch_size).numpy()
            part = pl.DataFrame(
                {"text_sha256": keys, "embedding": vectors},
                schema={"text_sha256": pl.String, "embedding": pl.Array(pl.Float32, tower.hidden_size)},
            )
            name = f"shard{index:04d}of{count:04d}-{uuid.uuid4().hex[:12]}.parquet"
            write_parquet(out / PARTS_FOLDER / name, part)
            bar.update(len(keys))
    finally:
        bar.close()
    return BuildStats(
        embedded=len(todo),
        reused=len(by_key) - len(todo),
        skipped_empty=skipped_empty,
        seconds=time.perf_counter() - started,
    )
