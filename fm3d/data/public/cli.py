"""`fm3d datasets`: read a public CT dataset in its publishers' layout into fm3d's manifest and tables.

    fm3d datasets list
    fm3d datasets manifest ct-rate --root /data/CT-RATE --out /data/ct-rate-fm3d
    fm3d prepare --manifest /data/ct-rate-fm3d/manifest.parquet --out /data/ct-rate-cache

`manifest` validates what it finds (missing and unexpected files are counted and named) and
writes manifest.parquet, and where the dataset has them reports.parquet, labels.parquet,
splits.json (the official split, usable as data.loader.fixed_splits) and labels.json (label
names, copied into the cache by `fm3d prepare`). Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from fm3d.cli import command_parser
from fm3d.cli_errors import did_you_mean, report
from fm3d.data.public.registry import SPLIT_NAMES, dataset_names, get_adapter
from fm3d.errors import Fm3dError

PROG = "fm3d datasets"


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(PROG, __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{list,manifest}")
    about = "list the datasets fm3d reads: what each writes, where to get it, its licence"
    commands.add_parser("list", help=about, description=about)
    about = "write manifest.parquet (+ reports, labels, splits, label names) for one dataset"
    manifest = commands.add_parser("manifest", help=about, description=about)
    manifest.add_argument("name", help="dataset name (see `fm3d datasets list`)")
    manifest.add_argument("--root", required=True, type=Path, help="folder the download unpacked into")
    manifest.add_argument("--out", required=True, type=Path, help="folder for the tables (created)")
    manifest.add_argument(
        "--split",
        nargs="+",
        choices=SPLIT_NAMES,
        default=None,
        metavar="SPLIT",
        help=f"keep only these official splits ({', '.join(SPLIT_NAMES)}; default: all)",
    )
    return parser


def _list() -> int:
    for name in dataset_names():
        adapter = get_adapter(name)
        print(f"{name}: {adapter.title}")
        print(f"  writes:  {adapter.writes}")
        print(f"  get it:  {adapter.source}")
        print(f"  licence: {adapter.licence}")
    return 0


def _manifest(args: argparse.Namespace) -> int:
    from fm3d.data.public.build import build_dataset

    known = dataset_names()
    if args.name not in known:
        hint = did_you_mean(args.name, known, quote="'")
        return report(PROG, f"unknown dataset {args.name!r}{hint}; known: {', '.join(known)}")
    start = time.perf_counter()
    result = build_dataset(args.name, args.root, args.out, args.split)
    tables = result.tables
    sizes = ", ".join(f"{split} {len(ids)}" for split, ids in tables.splits.items())
    print(
        f"{PROG}: {args.name}: {tables.manifest.height} studies ({sizes or 'no official split'}) "
        f"in {time.perf_counter() - start:.1f} s"
    )
    for line in tables.layout.lines():
        print(f"  {line}")
    for path in result.written:
        print(f"  wrote {path}")
    print(f"  next: fm3d prepare --manifest {args.out / 'manifest.parquet'} --out CACHE")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d datasets`: 0 on success, 2 with one line on stderr for a user error."""
    args = _parser().parse_args(argv)
    try:
        return _list() if args.command == "list" else _manifest(args)
    except Fm3dError as error:
        return report(PROG, str(error))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command", file=sys.stderr)
        return 130
