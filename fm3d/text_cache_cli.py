"""`fm3d text-cache`: embed every report once with a frozen text tower, for `frozen` CLIP pretraining.

    fm3d text-cache build --model sentence-transformers/all-MiniLM-L6-v2 \\
        --reports demo/manifest.parquet --columns impression --out demo/text_cache
    fm3d text-cache info demo/text_cache

`build` reads the reports as the pretraining data module joins them (`--columns` of the table,
by `--id-column`), embeds those the cache lacks and adds them; a rerun after a kill or after
reports changed embeds only what is missing. `--shard i/n` builds one of n disjoint shards into
the same folder (slurm/text-cache.sbatch runs them as an array job). The text settings given
here must be the CLIP objective's (`text_model`, `pooling`, `max_length`, ...): a run refuses a
cache built with other settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fm3d.cli import command_parser
from fm3d.cli_errors import report
from fm3d.errors import Fm3dError
from fm3d.sharding import WHOLE, parse_shard
from fm3d.text import LONG_REPORTS, POOLINGS

PROG = "fm3d text-cache"


def _parser() -> argparse.ArgumentParser:
    parser = command_parser(PROG, __doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="{build,info}")

    about = "embed the reports a cache lacks and add them to it (resumable; shardable)"
    build = commands.add_parser("build", help=about, description=about)
    build.add_argument(
        "--model", required=True, help="text model: a folder written by save_pretrained, or a hub name"
    )
    build.add_argument("--reports", required=True, type=Path, help="parquet or CSV table of reports")
    build.add_argument(
        "--columns",
        required=True,
        nargs="+",
        metavar="COLUMN",
        help="report columns, joined by newlines as the data module joins data.report_columns",
    )
    build.add_argument("--id-column", default="study_id", help="study id column (default study_id)")
    build.add_argument("--out", required=True, type=Path, help="cache folder (created, or added to)")
    build.add_argument(
        "--pooling", default="auto", choices=("auto", *POOLINGS), help="(default auto: the model's own)"
    )
    build.add_argument("--max-length", type=int, default=256, help="tokens per input (default 256)")
    build.add_argument("--lowercase", action="store_true", help="lowercase reports before tokenising")
    build.add_argument(
        "--prefix", default=None, help="text put before every report (default: the model's own prompt)"
    )
    build.add_argument(
        "--long-reports",
        default="truncate",
        choices=LONG_REPORTS,
        help="cut at --max-length, or embed sentence chunks and average them (default truncate)",
    )
    build.add_argument("--batch-size", type=int, default=32, help="reports per forward pass (default 32)")
    build.add_argument(
        "--shard",
        type=parse_shard,
        default=WHOLE,
        metavar="I/N",
        help="build shard I of N (default 0/1: all)",
    )
    build.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    build.add_argument(
        "--trust-remote-code", action="store_true", help="run the model's own code (trusted sources only)"
    )

    about = "print a cache's settings, entries, width and size on disk"
    info = commands.add_parser("info", help=about, description=about)
    info.add_argument("folder", type=Path, help="cache folder written by `fm3d text-cache build`")
    return parser


def _build(args: argparse.Namespace) -> int:
    from transformers.utils.logging import disable_progress_bar

    from fm3d.data.tables import ReportTable
    from fm3d.text import TextTower
    from fm3d.text_cache import build_text_cache

    if args.max_length < 1 or args.batch_size < 1:
        return report(
            PROG, f"--max-length ({args.max_length}) and --batch-size ({args.batch_size}) must be positive"
        )
    table = ReportTable.read(args.reports, args.columns, args.id_column)
    texts = [table.get(study_id) for study_id in table.study_ids_with_text()]
    if not texts:
        return report(PROG, f"{args.reports}: columns {', '.join(args.columns)} hold no report text")
    print(f"{PROG}: loading {args.model}", flush=True)
    disable_progress_bar()  # transformers' "Loading weights" bar: noise beside the build's own
    tower = TextTower(
        args.model,
        pooling=args.pooling,
        max_length=args.max_length,
        lowercase=args.lowercase,
        trust_remote_code=args.trust_remote_code,
        prefix=args.prefix,
        long_reports=args.long_reports,
    )
    shard = "" if args.shard.whole else f" (shard {args.shard})"
    print(f"{PROG}: {len(texts)} reports from {args.reports}{shard}", flush=True)
    stats = build_text_cache(
        tower,
        texts,
        args.out,
        batch_size=args.batch_size,
        shard=(args.shard.index, args.shard.count),
        progress=not args.no_progress,
    )
    rate = stats.embedded / stats.seconds if stats.seconds > 0 else 0.0
    print(
        f"{PROG}: embedded {stats.embedded} and reused {stats.reused} cached of the "
        f"{stats.embedded + stats.reused} distinct report texts{shard} in {stats.seconds:.1f} s "
        f"({rate:.1f} reports/s) into {args.out.resolve()}"
    )
    print(f"  settings:   {tower.settings.pooling} pooling, max_length {tower.max_length}, "
          f"long reports {tower.settings.long_reports}, prefix {tower.settings.prefix!r}")  # fmt: skip
    print(f"  use with:   data.text_embeddings: {args.out} and the CLIP objective's text_mode: frozen")
    return 0


def _info(args: argparse.Namespace) -> int:
    from fm3d.text_cache import TextEmbeddingCache

    cache = TextEmbeddingCache(args.folder)
    print(f"{cache.directory.resolve()}: {len(cache)} report embeddings of width {cache.dim}, "
          f"{cache.size_on_disk() / 2**20:.1f} MiB")  # fmt: skip
    for name, value in cache.settings.items():
        print(f"  {name:<15} {value!r}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d text-cache`: 0 on success, 2 with one line on stderr for a user error."""
    args = _parser().parse_args(argv)
    try:
        return _build(args) if args.command == "build" else _info(args)
    except Fm3dError as error:
        return report(PROG, str(error))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
