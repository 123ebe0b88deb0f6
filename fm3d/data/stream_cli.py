"""`fm3d stream`: pack a prepared cache into tar shards that training streams from a path or object store.

    fm3d stream pack demo/cache --to demo/pack --shards 8
    fm3d stream pack /data/prepared --to s3://bucket/ct-pack --shards 512 --option profile=lab
    fm3d stream info s3://bucket/ct-pack

`pack` writes every prepared study, with its index row and label map, into exactly one of N
shards (`fm3d.data.streaming`); the destination is a local path or any fsspec URL whose
filesystem is installed (s3fs for s3://, gcsfs for gs://), with `--option KEY=VALUE` passed to
it. Pick N so that every rank's DataLoader workers get shards of their own: at least
ranks x workers, better a few times more (shards of some hundreds of MB stream well).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fm3d.cli import command_parser
from fm3d.cli_errors import report
from fm3d.errors import Fm3dError

PROG = "fm3d stream"


def _option(text: str) -> tuple[str, Any]:
    """A `KEY=VALUE` storage option; VALUE read as JSON where it is (true, 3, "x"), else as text."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(PROG, __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{pack,info}")

    about = "write a prepared cache's studies as N tar shards at a path or URL"
    pack = commands.add_parser("pack", help=about, description=about)
    pack.add_argument("cache", type=Path, help="folder written by `fm3d prepare`")
    pack.add_argument(
        "--to", required=True, help="destination: a folder, or an fsspec URL (s3://, gs://, ...)"
    )
    pack.add_argument("--shards", required=True, type=int, help="number of shard files (1 to the studies)")
    pack.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")

    about = "print a pack's studies, shards and size"
    info = commands.add_parser("info", help=about, description=about)
    info.add_argument("url", help="a pack written by `fm3d stream pack`")
    for sub in (pack, info):
        sub.add_argument(
            "--option",
            type=_option,
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="a storage option of the URL's fsspec filesystem (repeatable), e.g. anon=true",
        )
    return parser


def _pack(args: argparse.Namespace) -> int:
    from fm3d.data.streaming import pack_cache

    if args.shards < 1:
        return report(PROG, f"--shards must be at least 1, got {args.shards}")
    stats = pack_cache(args.cache, args.to, args.shards, dict(args.option), progress=not args.no_progress)
    rate = stats.bytes / 2**20 / stats.seconds if stats.seconds > 0 else 0.0
    print(
        f"{PROG}: packed {stats.studies} studies into {stats.shards} shards, {stats.bytes / 2**20:.1f} MiB "
        f"in {stats.seconds:.1f} s ({rate:.0f} MiB/s) -> {stats.url}"
    )
    print(f"  read with: fm3d.data.streaming.PackedCache({args.to!r}) and fm3d.data.streaming_loader")
    return 0


def _info(args: argparse.Namespace) -> int:
    from fm3d.data.streaming import PackedCache

    pack = PackedCache(args.url, dict(args.option))
    sizes = [shard.studies for shard in pack.shards]
    total = sum(shard.bytes for shard in pack.shards)
    print(f"{pack.url}: {len(pack)} studies in {len(pack.shards)} shards, {total / 2**20:.1f} MiB")
    print(f"  studies per shard: {min(sizes)} to {max(sizes)}")
    spec = pack.input_spec
    print(f"  prepared at:       spacing {list(spec.target_spacing_mm)} mm, HU window {list(spec.hu_window)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d stream`: 0 on success, 2 with one line on stderr for a user error."""
    args = _parser().parse_args(argv)
    try:
        return _pack(args) if args.command == "pack" else _info(args)
    except Fm3dError as error:
        return report(PROG, str(error))
    except ImportError as error:  # fsspec names the package a URL's protocol needs (s3fs, gcsfs)
        return report(PROG, f"{error} (the filesystem of this URL's protocol is not installed)")
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to write the whole pack", file=sys.stderr)
        return 130
