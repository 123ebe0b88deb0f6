"""What a dataset adapter is, the registry that finds adapters by name, and what an adapter hands back.

An adapter reads one public dataset in the layout its publishers ship and returns fm3d's tables
(`DatasetTables`): the `fm3d prepare` manifest, and where the dataset has them, reports, labels,
the official splits and a label-name table. Built-in adapters are the modules of `fm3d.data.public`;
a site adds its own through the entry-point group `fm3d.datasets` (`name = "pkg.module:Class"`),
as encoder families and downstream tasks do, so adding a dataset never edits fm3d.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import polars as pl

from fm3d.errors import Fm3dError, PathError
from fm3d.plugins import Registry

ENTRY_POINT_GROUP = "fm3d.datasets"
# fm3d's split names (LoaderSettings.fixed_splits): "predict" holds the images a publisher ships
# without labels (an MSD or AMOS test set), which can be embedded but not scored.
SPLIT_NAMES: tuple[str, ...] = ("train", "val", "test", "predict")
# How many names a message lists before it only counts the rest.
LISTED = 5


class DatasetLayoutError(PathError):
    """A folder that is not the dataset asked for, or lacks a file the dataset cannot do without.

    The message says what was expected there and what was found, so a wrong --root or an
    unfinished download is recognised at a glance.
    """


class UnknownDatasetError(Fm3dError, LookupError):
    """A dataset name no adapter is registered under."""


@dataclass
class LayoutReport:
    """What an adapter found beside what the publishers' layout promises.

    missing: kind of file ("volume", "segmentation mask", ...) -> the files the dataset's own
        tables list but the folder lacks (their studies are left out).
    unexpected: files in the dataset's folders that its layout does not account for (not read).
    skipped: reason -> study ids left out on purpose (an MRI in AMOS, a split not asked for).
    notes: one line each on what the adapter decided (e.g. volumes rescaled to HU).
    """

    missing: dict[str, list[str]] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add_missing(self, kind: str, name: str) -> None:
        self.missing.setdefault(kind, []).append(name)

    def add_skipped(self, reason: str, study_id: str) -> None:
        self.skipped.setdefault(reason, []).append(study_id)

    def split_of(
        self,
        study_id: str,
        published: str | None,
        names: Mapping[str, str],
        wanted: Collection[str] | None,
        column: str,
    ) -> str | None:
        """fm3d's split of a study the publisher puts in split `published` (`names` maps publisher
        names to fm3d's); None, recorded as skipped, for an unknown name or a split not `wanted`."""
        split = names.get((published or "").strip().lower())
        if split is None:
            self.add_skipped(f"{column} not one of {sorted(names)}", study_id)
        elif wanted is not None and split not in wanted:
            self.add_skipped("split not in --split", study_id)
            return None
        return split

    def lines(self) -> list[str]:
        """The report as short lines for a terminal: counts and the first few names of each list."""
        lines = [f"missing {kind}s: {listing(names)}" for kind, names in self.missing.items()]
        if self.unexpected:
            lines.append(f"unexpected files (not read): {listing(self.unexpected)}")
        lines += [f"left out ({reason}): {listing(ids)}" for reason, ids in self.skipped.items()]
        return lines + self.notes

    def as_dict(self) -> dict[str, object]:
        return {
            "missing": self.missing,
            "unexpected": self.unexpected,
            "skipped": self.skipped,
            "notes": self.notes,
        }


@dataclass
class DatasetTables:
    """An adapter's result: fm3d's tables for one dataset.

    manifest: study_id, patient_id (where known), image_path, label_path (segmentation data
        sets) and a `split` column with fm3d's split names; paths absolute, or relative to the
        output folder for files the adapter wrote there.
    reports: study_id + the report text columns, or None.
    labels: study_id + one boolean column per finding (null: not known), as the evaluation
        suite's linear probe, kNN and zero-shot protocols read, or None.
    label_names: label value -> structure name of the label maps, or None.
    layout: what was found missing, unexpected or left out.
    """

    manifest: pl.DataFrame
    reports: pl.DataFrame | None = None
    labels: pl.DataFrame | None = None
    label_names: dict[str, str] | None = None
    layout: LayoutReport = field(default_factory=LayoutReport)

    @property
    def splits(self) -> dict[str, list[str]]:
        """fm3d split name -> study ids, for the splits the dataset defines (`fixed_splits` form)."""
        frame = self.manifest
        return {
            name: frame.filter(pl.col("split") == name)["study_id"].to_list()
            for name in SPLIT_NAMES
            if name in set(frame["split"].drop_nulls().to_list())
        }


class DatasetAdapter(ABC):
    """Reads one public dataset in its publishers' layout into `DatasetTables`.

    Subclasses set the class attributes `list` prints and implement `read`; `register_dataset`
    sets `name`.
    """

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""
    writes: ClassVar[str] = ""
    source: ClassVar[str] = ""
    licence: ClassVar[str] = ""

    @abstractmethod
    def read(self, root: Path, out: Path, splits: Collection[str] | None = None) -> DatasetTables:
        """The dataset under `root` as fm3d's tables; files it must derive (label maps) go under `out`.

        splits: fm3d split names to keep (None: all); studies of other splits are left out
        before anything is read or written for them.
        Raises `DatasetLayoutError` when `root` is not this dataset or lacks a file it cannot do without.
        """


DATASETS = Registry(
    "dataset adapter", "fm3d.data.public", ENTRY_POINT_GROUP, "name", error=UnknownDatasetError
)


def register_dataset(name: str) -> Callable[[type[DatasetAdapter]], type[DatasetAdapter]]:
    """Class decorator: make a `DatasetAdapter` findable as `name` (`fm3d datasets manifest NAME`)."""
    return DATASETS.register(name)


def dataset_names() -> list[str]:
    """The names of every adapter, built-in and installed."""
    return DATASETS.names()


def get_adapter(name: str) -> DatasetAdapter:
    """A new adapter of the dataset registered as `name`."""
    return DATASETS.get(name)()


def listing(names: Sequence[str]) -> str:
    """`"3 (a, b, c)"`, or the first few and a count of the rest, for messages about many files."""
    shown = ", ".join(str(n) for n in names[:LISTED])
    more = f", ... {len(names) - LISTED} more" if len(names) > LISTED else ""
    return f"{len(names)} ({shown}{more})"


def require_file(root: Path, relative: str, dataset: str, expected: str) -> Path:
    """`root/relative`, or a `DatasetLayoutError` saying what `root` holds instead."""
    path = root / relative
    if path.is_file():
        return path
    raise DatasetLayoutError(
        path,
        f"is missing, so {root} does not look like {dataset} (expected {expected}; "
        f"found {describe_folder(path.parent if path.parent.is_dir() else root)})",
        f"pass the folder the {dataset} download unpacked into as --root",
    )


def describe_folder(folder: Path) -> str:
    """What a folder holds, for a message: its first few entries, or that it is empty or absent."""
    if not folder.is_dir():
        return f"no folder {folder}"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    return f"{folder.name}/ holding {listing(entries)}" if entries else f"an empty {folder.name}/"
