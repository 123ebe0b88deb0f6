"""`fm3d text-model`: write a tiny from-scratch BERT text model learned from report text (offline).

    fm3d text-model --out demo/text_model --texts demo/manifest.parquet --columns findings impression

For CLIP pretraining where no pretrained clinical text model can be downloaded (the demo,
air-gapped clusters, tests): `fm3d.text.init_text_model` learns a WordPiece vocabulary from the
reports and initialises a small BERT at random, which CLIP pretraining then trains. Its
report-generation counterpart, `fm3d causal-lm`, takes the same options; both read their texts
and write their summary here, so the two commands cannot drift apart.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import polars as pl
from transformers.utils.logging import disable_progress_bar

from fm3d.cli import summary_line
from fm3d.cli_errors import did_you_mean, nearest_file, report
from fm3d.data.tables import TableError
from fm3d.errors import Fm3dError, PathError
from fm3d.text import clean_report, init_text_model

TABLE_SUFFIXES = (".parquet", ".pq", ".csv")


def read_texts(path: str | Path, columns: list[str]) -> list[str]:
    """One text per row of a parquet/CSV table: its non-empty `columns` joined by newlines.

    Rows whose chosen columns are all empty are left out; a table with no text at all, a
    missing file or a missing column is a `TableError` naming it and the nearest valid one.
    """
    path = Path(path)
    if not path.is_file():
        close = nearest_file(path)
        hint = f"did you mean {close}?" if close else "pass a parquet or CSV table of reports"
        raise TableError(path, "does not exist", hint)
    if path.suffix.lower() not in TABLE_SUFFIXES:
        raise TableError(path, f"is not a table ({', '.join(TABLE_SUFFIXES)})", "pass a parquet or CSV file")
    table = pl.read_csv(path, infer_schema=False) if path.suffix.lower() == ".csv" else pl.read_parquet(path)
    for column in columns:
        if column not in table.columns:
            raise TableError(
                path,
                f"has no column {column!r}{did_you_mean(column, table.columns, quote=chr(39))}",
                f"its columns are {', '.join(table.columns)}",
            )
    rows = table.select(pl.col(c).cast(pl.String) for c in columns).iter_rows()
    texts = ["\n".join(part for part in map(clean_report, row) if part) for row in rows]
    texts = [text for text in texts if text]
    if not texts:
        raise TableError(
            path,
            f"columns {', '.join(columns)} hold no text in any of its {table.height} rows",
            "choose the columns that hold the report text",
        )
    return texts


def model_parser(prog: str, doc: str, max_length: int) -> argparse.ArgumentParser:
    """The options `fm3d text-model` and `fm3d causal-lm` share (output, table, columns, sizes).

    `max_length` is the command's default for `--max-length`: a text tower reads one report, a
    causal LM for report generation also holds the image tokens and the prompt before it.
    """
    parser = argparse.ArgumentParser(
        prog=prog,
        description=summary_line(doc),
        epilog="Nothing is downloaded: the vocabulary is learned from the table, the weights are random.",
    )
    parser.add_argument("--out", required=True, type=Path, help="folder to write the model and tokenizer to")
    parser.add_argument("--texts", required=True, type=Path, help="parquet or CSV table holding the reports")
    parser.add_argument(
        "--columns",
        required=True,
        nargs="+",
        metavar="COLUMN",
        help="text columns to learn from; a row's columns are joined by newlines (e.g. findings impression)",
    )
    parser.add_argument(
        "--vocab-size", type=int, default=500, help="largest vocabulary to learn (default 500)"
    )
    parser.add_argument("--hidden-size", type=int, default=64, help="model width (default 64)")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers (default 2)")
    parser.add_argument(
        "--heads", type=int, default=2, help="attention heads; divide --hidden-size (default 2)"
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=max_length,
        help=f"longest input in tokens (position embeddings; default {max_length})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace what --out already holds")
    return parser


def _parameters(directory: Path) -> int:
    """Parameters in a saved model's `model.safetensors`, counted from its header (nothing loaded)."""
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", framework="pt") as weights:
        return sum(math.prod(weights.get_slice(key).get_shape()) for key in weights.keys())  # noqa: SIM118


def write_model(prog: str, args: argparse.Namespace, write: Callable[..., Path], load_hint: str) -> int:
    """Read the texts, call `write(out, texts, **sizes)`, print progress and a summary; 2 on a user error.

    `sizes` are the shared size and seed options as the init functions' keyword arguments.
    """
    if args.hidden_size % args.heads:
        return report(prog, f"--hidden-size {args.hidden_size} is not divisible by --heads {args.heads}")
    try:
        if args.out.exists() and (args.out.is_file() or any(args.out.iterdir())) and not args.overwrite:
            raise PathError(args.out, "already exists", "pass --overwrite to replace it, or another --out")
        started = time.perf_counter()
        print(f"{prog}: reading {', '.join(args.columns)} from {args.texts}", flush=True)
        texts = read_texts(args.texts, args.columns)
        print(
            f"{prog}: learning a vocabulary of up to {args.vocab_size} tokens from {len(texts)} texts",
            flush=True,
        )
        # A one-file model writes in a blink; transformers' "Writing model shards" bar is noise in logs.
        disable_progress_bar()
        sizes = {
            "vocab_size": args.vocab_size,
            "hidden_size": args.hidden_size,
            "num_layers": args.layers,
            "num_heads": args.heads,
            "max_length": args.max_length,
            "seed": args.seed,
        }
        out = write(args.out, texts, **sizes)
    except Fm3dError as exc:
        return report(prog, str(exc))
    config = json.loads((out / "config.json").read_text())
    print(f"{prog}: wrote {out.resolve()} in {time.perf_counter() - started:.1f} s")
    print(f"  model:      {config.get('model_type')}, {_parameters(out):,} parameters (random weights)")
    print(f"  vocabulary: {config['vocab_size']} tokens learned from {len(texts)} texts")
    print(f"  load with:  {load_hint.format(out=out)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d text-model`."""
    args = model_parser("fm3d text-model", __doc__, max_length=128).parse_args(argv)

    hint = "fm3d.text.TextTower('{out}', pooling='mean'), or transformers.AutoModel.from_pretrained('{out}')"
    return write_model("fm3d text-model", args, init_text_model, hint)
