"""`fm3d ehr`: select MOTOR tasks from a MEDS dataset and build per-study label tables.

    fm3d ehr tasks --meds DIR -k 64
    fm3d ehr labels --meds DIR --studies studies.csv --out labels.parquet --tasks-k 64 \\
        --phenotypes conf/ehr/phenotypes_example.yaml --window-days 365 30

`labels --shard i/n` labels one of n disjoint parts of the subjects and `labels --merge` folds the
parts into --out (`ehr.label_shards`; slurm/ehr-labels.sbatch runs the parts as an array job).
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from pathlib import Path

from ehr.errors import EHRSettingError, TaskSpecError
from ehr.label_shards import merge_label_shards, shard_file, shard_studies
from ehr.labels import build_study_labels, write_study_labels
from ehr.meds import MEDSDataset
from ehr.studies import read_studies
from ehr.subject_chunks import DEFAULT_MEMORY_BUDGET_MIB
from ehr.validity import DROP_OPTION, YEARS_OPTION, ValidityPolicy
from ehr.vocab import load_phenotypes, select_tasks
from fm3d.atomic import write_text_atomic
from fm3d.errors import Fm3dError
from fm3d.sharding import WHOLE, parse_shard


def _add_task_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--min-event-fraction",
        type=float,
        default=1 / 1000,
        metavar="F",
        help="least fraction of subjects with the code for a task (femr's min_fraction, default 0.001)",
    )
    parser.add_argument(
        "--expand-parents",
        action="store_true",
        help="also count codes under their codes.parquet parent_codes",
    )
    parser.add_argument(
        "--exclude-prefix",
        action="append",
        default=[],
        metavar="PREFIX",
        help="never pick codes starting with PREFIX (repeatable), e.g. MEDS_BIRTH",
    )
    parser.add_argument(
        DROP_OPTION,
        action="store_true",
        help="leave out (and count) events with a null code or an implausible time, and studies with an "
        "unusable subject_id or study_time; by default they are refused with their counts",
    )
    parser.add_argument(
        YEARS_OPTION,
        nargs=2,
        type=int,
        default=(1800, 2300),
        metavar=("MIN", "MAX"),
        help="years a plausible time falls in (default 1800 2300; MIMIC shifts dates to 2100-2200)",
    )


def _parser() -> argparse.ArgumentParser:
    summary, examples = __doc__.split("\n", 1)
    parser = argparse.ArgumentParser(
        prog="fm3d ehr",
        description=summary.split(": ", 1)[1],
        epilog="examples:\n" + examples.strip("\n"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{tasks,labels}")

    about = "print the K codes MOTOR's entropy criterion selects as time-to-event tasks"
    tasks = commands.add_parser("tasks", help=about, description=about)
    tasks.add_argument(
        "--meds", required=True, type=Path, metavar="DIR", help="MEDS root (holds data/ and metadata/)"
    )
    tasks.add_argument("-k", type=int, default=64, help="number of tasks (default 64)")
    tasks.add_argument("--out", type=Path, metavar="FILE", help="also write the selected codes, one per line")
    _add_task_selection(tasks)

    about = (
        "build the per-study label parquet: phenotype flags in a window around each study and "
        "time-to-event (days, event) for each task, the labels `fm3d pretrain` reads as data.labels"
    )
    labels = commands.add_parser(
        "labels", help="build the per-study phenotype + time-to-event label parquet", description=about
    )
    labels.add_argument(
        "--meds", required=True, type=Path, metavar="DIR", help="MEDS root (holds data/ and metadata/)"
    )
    labels.add_argument(
        "--studies",
        required=True,
        type=Path,
        metavar="TABLE",
        help="CSV/parquet with study_id, subject_id, study_time (e.g. the demo's manifest.parquet)",
    )
    labels.add_argument(
        "--out",
        required=True,
        type=Path,
        metavar="FILE",
        help="output parquet (a <out>.json sidecar is written too)",
    )
    which = labels.add_mutually_exclusive_group()
    which.add_argument(
        "--tasks-k", type=int, metavar="K", help="select K tasks by MOTOR's criterion (default 64)"
    )
    which.add_argument("--tasks", metavar="CODES", help="comma-separated task codes")
    which.add_argument("--tasks-file", type=Path, metavar="FILE", help="file with one task code per line")
    labels.add_argument(
        "--phenotypes", type=Path, metavar="FILE", help="YAML/JSON mapping group -> code prefixes"
    )
    labels.add_argument(
        "--window-days",
        nargs=2,
        type=float,
        default=(365.0, 30.0),
        metavar=("BEFORE", "AFTER"),
        help="phenotype window around study_time in days (default 365 30)",
    )
    labels.add_argument(
        "--subject-column",
        default="subject_id",
        metavar="NAME",
        help="subject id column of the studies table (default subject_id)",
    )
    labels.add_argument(
        "--num-bins",
        type=int,
        default=8,
        metavar="N",
        help="time bins for the suggested bin edges (default 8)",
    )
    labels.add_argument(
        "--memory-budget-mib",
        type=float,
        default=DEFAULT_MEMORY_BUDGET_MIB,
        metavar="MIB",
        help="label subjects in chunks of at most about this much memory (default %(default)g; "
        "the labels do not depend on it)",
    )
    split = labels.add_mutually_exclusive_group()
    split.add_argument(
        "--shard",
        type=parse_shard,
        default=WHOLE,
        metavar="I/N",
        help="label only the studies of subject shard I of N into <out>.shards/ (for SLURM array tasks)",
    )
    split.add_argument(
        "--merge",
        action="store_true",
        help="fold the finished <out>.shards/ into --out, in --studies order (MEDS is not read again)",
    )
    _add_task_selection(labels)
    return parser


def _task_codes(args: argparse.Namespace, dataset: MEDSDataset) -> list[str]:
    if args.tasks:
        return [code.strip() for code in args.tasks.split(",") if code.strip()]
    if args.tasks_file:
        if not args.tasks_file.is_file():
            raise TaskSpecError(args.tasks_file, "does not exist", "give a file with one task code per line")
        codes = [line.strip() for line in args.tasks_file.read_text().splitlines() if line.strip()]
        if not codes:
            raise TaskSpecError(args.tasks_file, "lists no task codes")
        return codes
    selected = select_tasks(
        dataset,
        64 if args.tasks_k is None else args.tasks_k,
        min_event_fraction=args.min_event_fraction,
        expand_parents=args.expand_parents,
        exclude_prefixes=tuple(args.exclude_prefix),
    )
    return selected["code"].to_list()


def _print_summary(description: dict, seconds: float, out: Path) -> None:
    summary = description["summary"]
    print(f"wrote {out} (+ {out}.json) in {seconds:.1f} s")
    print(
        f"studies: {summary['studies']}  with EHR: {summary['with_ehr']}  "
        f"unknown subject: {summary['unknown_subject']}  no follow-up after study: {summary['no_followup']}"
    )
    print("\n| task | event rate | median days to event |\n|---|---|---|")
    for task in summary["tasks"]:
        median = "-" if task["median_days_to_event"] is None else f"{task['median_days_to_event']:.1f}"
        print(f"| {task['code']} | {task['event_rate']:.3f} | {median} |")
    if summary["phenotypes"]:
        print("\n| phenotype | prevalence |\n|---|---|")
        for group in summary["phenotypes"]:
            print(f"| {group['group']} | {group['prevalence']:.3f} |")


def _check_settings(args: argparse.Namespace) -> ValidityPolicy:
    """Refuse counts, windows and ranges that cannot work before any file is read."""
    counts = {"-k": getattr(args, "k", None), "--tasks-k": getattr(args, "tasks_k", None)}
    counts["--num-bins"] = getattr(args, "num_bins", None)
    for option, value in counts.items():
        if value is not None and value < 1:
            raise EHRSettingError(f"{option} must be a positive count, got {value}")
    if not 0 < args.min_event_fraction < 0.5:
        raise EHRSettingError(f"--min-event-fraction must be in (0, 0.5), got {args.min_event_fraction}")
    window = getattr(args, "window_days", (0.0, 0.0))
    if not all(math.isfinite(w) and w >= 0 for w in window):
        raise EHRSettingError(f"--window-days needs two finite numbers >= 0, got {list(window)}")
    return ValidityPolicy(drop_invalid=args.drop_invalid, valid_years=tuple(args.valid_years))


def main(argv: list[str] | None = None) -> int:
    """Entry point of `fm3d ehr`: 0 on success, 2 with one line on stderr for a user error."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    try:
        policy = _check_settings(args)
        if args.command == "labels" and args.merge:
            started = time.perf_counter()
            studies = read_studies(args.studies, subject_column=args.subject_column, policy=policy)
            description = merge_label_shards(args.out, studies, num_bins=args.num_bins)
            _print_summary(description, time.perf_counter() - started, args.out)
            return 0
        dataset = MEDSDataset(args.meds, policy=policy)
        if args.command == "tasks":
            selected = select_tasks(
                dataset,
                args.k,
                min_event_fraction=args.min_event_fraction,
                expand_parents=args.expand_parents,
                exclude_prefixes=tuple(args.exclude_prefix),
            )
            print("| # | code | subject fraction | score |\n|---|---|---|---|")
            for rank, row in enumerate(selected.iter_rows(named=True), start=1):
                print(f"| {rank} | {row['code']} | {row['subject_fraction']:.4f} | {row['score']:.4f} |")
            if args.out:
                write_text_atomic(args.out, "\n".join(selected["code"]) + "\n")
            return 0
        started = time.perf_counter()
        tasks = _task_codes(args, dataset)
        phenotypes = load_phenotypes(args.phenotypes) if args.phenotypes else None
        studies = read_studies(args.studies, subject_column=args.subject_column, policy=policy)
        studies = shard_studies(studies, args.shard)
        out = args.out if args.shard.whole else shard_file(args.out, args.shard)
        labels = build_study_labels(
            dataset,
            studies,
            tasks,
            phenotypes,
            window_days=tuple(args.window_days),
            expand_parents=args.expand_parents,
            memory_budget_mib=args.memory_budget_mib,
        )
        description = write_study_labels(
            labels,
            out,
            tasks=tasks,
            phenotypes=phenotypes,
            window_days=tuple(args.window_days),
            num_bins=args.num_bins,
            dropped_events=dataset.dropped,
        )
        _print_summary(description, time.perf_counter() - started, out)
        return 0
    except Fm3dError as error:
        print(f"fm3d ehr {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
