"""Benchmark study-label building on the MIMIC-IV demo replicated to ~10M events, and 4x and 16x that.

    python benchmarks/ehr_labels.py [--scales 1 4 16] [--copies 11] [--tasks-k 64] [--threads 2] \\
        [--repeats 3] [--memory-budget-mib MIB] [--save docs/benchmarks/ehr_labels.md]

At scale s the demo (916k events, 100 subjects) is written `copies x s` times into a temporary
MEDS folder with subject ids offset per copy (core columns only); the studies are every hospital
admission of every copy, and the tasks are selected once on the demo (every copy has its
statistics), so each scale labels the same codes. Label building (open + validate + build +
write parquet/sidecar) runs in a child process so its peak RSS (VmHWM) is its own; a child that
only imports the modules gives the interpreter + library baseline. The child also resets VmHWM
between phases (/proc/self/clear_refs) to report each phase's own peak, and one more child per
scale runs with polars' allocator returning freed pages at once, which splits what label
building holds from what jemalloc keeps for reuse. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
from _common import cpu_name, markdown_table

DEMO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ehr" / "mimic_iv_demo_meds"
PHENOTYPES = Path(__file__).resolve().parents[1] / "conf" / "ehr" / "phenotypes_example.yaml"
CORE = ["subject_id", "time", "code", "numeric_value", "text_value"]
SUBJECT_OFFSET = 100_000_000
PHASES = ("open", "build", "write")
# jemalloc (polars' allocator) otherwise keeps freed pages for 0.5-1 s (polars/__init__.py)
# for reuse; with no decay the high-water mark is what label building really holds.
NO_DECAY = "dirty_decay_ms:0,muzzy_decay_ms:0"


def demo_events() -> pl.DataFrame:
    """The demo's core columns, sorted as MEDS wants (subject, then time with static rows first)."""
    return pl.read_parquet(DEMO / "data" / "*" / "*.parquet", columns=CORE).sort(
        "subject_id", "time", nulls_last=False, maintain_order=True
    )


def replicate(events: pl.DataFrame, copies: int, root: Path) -> tuple[int, int]:
    """Write `copies` shifted copies of `events` as MEDS shards; returns (events, bytes on disk)."""
    (root / "data").mkdir(parents=True)
    (root / "metadata").mkdir()
    for copy in range(copies):
        shifted = events.with_columns(pl.col("subject_id") + copy * SUBJECT_OFFSET)
        shifted.write_parquet(root / "data" / f"copy_{copy:04d}.parquet")
    (root / "metadata" / "dataset.json").write_text(json.dumps({"meds_version": "0.3.3"}))
    size = sum(path.stat().st_size for path in (root / "data").glob("*.parquet"))
    return events.height * copies, size


def admission_studies(events: pl.DataFrame, copies: int) -> pl.DataFrame:
    """Every hospital admission of every copy, numbered in (subject, time) order."""
    admissions = (
        events.filter(pl.col("code").str.starts_with("HOSPITAL_ADMISSION//"))
        .select("subject_id", study_time="time")
        .unique()
    )
    shifted = [
        admissions.with_columns(pl.col("subject_id") + copy * SUBJECT_OFFSET) for copy in range(copies)
    ]
    return (
        pl.concat(shifted)
        .sort("subject_id", "study_time")
        .with_columns(study_id=pl.format("s{}", pl.int_range(pl.len())))
    )


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM) since start or the last reset, in MiB.

    Not getrusage: on Linux its ru_maxrss carries the parent's high-water mark over fork + exec.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # not Linux: best effort


def reset_peak() -> bool:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so the next reading is one phase's peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def child(
    meds: Path,
    studies: Path,
    out: Path,
    tasks_file: Path,
    only_import: bool,
    memory_budget_mib: float | None,
) -> None:
    """Runs in the child process: import, then (unless only_import) build and write the labels."""
    from ehr.labels import build_study_labels, write_study_labels
    from ehr.meds import MEDSDataset
    from ehr.vocab import load_phenotypes

    peaks = {"import": peak_rss_mib()}
    if only_import:
        print(json.dumps({"peak_rss_mib": peaks["import"]}))
        return
    budget = {} if memory_budget_mib is None else {"memory_budget_mib": memory_budget_mib}
    started = time.perf_counter()
    phased = reset_peak()
    tasks = tasks_file.read_text().split("\n")
    groups = load_phenotypes(PHENOTYPES)
    dataset = MEDSDataset(meds)
    peaks["open"] = peak_rss_mib()
    reset_peak()
    labels = build_study_labels(dataset, pl.read_parquet(studies), tasks, groups, (365, 30), **budget)
    peaks["build"] = peak_rss_mib()
    reset_peak()
    write_study_labels(labels, out, tasks=tasks, phenotypes=groups, window_days=(365, 30))
    peaks["write"] = peak_rss_mib()
    seconds = time.perf_counter() - started
    report = {
        "seconds": seconds,
        "studies": labels.height,
        "peak_rss_mib": max(peaks.values()) if phased else peaks["write"],
        "phases": peaks if phased else None,
    }
    print(json.dumps(report))


def run_child(args: list[str], threads: int, allocator: str | None = None) -> dict:
    """Run this script as a child process; returns the JSON line it prints (its own peak RSS included)."""
    env = {**os.environ, "POLARS_MAX_THREADS": str(threads)}
    if allocator:
        env["_RJEM_MALLOC_CONF"] = allocator
    result = subprocess.run(
        [sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False
    )
    if result.returncode:
        sys.exit(f"benchmark child {' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def machine() -> str:
    python = f"Python {platform.python_version()}, polars {pl.__version__}"
    return f"{cpu_name()}, {os.cpu_count()} visible cores, {python}"


def measure_scale(
    events: pl.DataFrame, copies: int, tasks_file: Path, args: argparse.Namespace, import_rss: float
) -> dict:
    """Replicate the demo `copies` times into a temporary folder and time label building there."""
    with tempfile.TemporaryDirectory(prefix="fm3d_ehr_bench_") as tmp:
        tmp = Path(tmp)
        meds = tmp / "meds"
        num_events, size = replicate(events, copies, meds)
        admission_studies(events, copies).write_parquet(tmp / "studies.parquet")
        child_args = ["--child", str(meds), str(tmp / "studies.parquet"), str(tmp / "labels.parquet"),
                      str(tasks_file)]  # fmt: skip
        if args.memory_budget_mib is not None:
            child_args += ["--memory-budget-mib", str(args.memory_budget_mib)]
        runs = [run_child(child_args, args.threads) for _ in range(args.repeats)]
        no_decay = run_child(child_args, args.threads, allocator=NO_DECAY)
    size_mib = size / 2**20
    fastest = min(runs, key=lambda run: run["seconds"])  # the least disturbed run on a shared machine
    highest = max(runs, key=lambda run: run["peak_rss_mib"])
    return {
        "copies": copies,
        "events": num_events,
        "size_mib": size_mib,
        "studies": fastest["studies"],
        "seconds": fastest["seconds"],
        "all_seconds": [run["seconds"] for run in runs],
        "above": highest["peak_rss_mib"] - import_rss,
        "phases": highest["phases"],
        "no_decay_above": no_decay["peak_rss_mib"] - import_rss,
        "no_decay_phases": no_decay["phases"],
        "no_decay_seconds": no_decay["seconds"],
    }


def tables(results: list[dict], scales: list[int], import_rss: float) -> str:
    """The scale table and the per-phase profile, as markdown."""
    rows = []
    for scale, r in zip(scales, results, strict=True):
        rows.append(
            [
                f"{scale}x",
                f"{r['events']:,}",
                f"{r['size_mib']:.1f}",
                f"{r['studies']:,}",
                f"{r['seconds']:.2f} ({', '.join(f'{s:.2f}' for s in r['all_seconds'])})",
                f"{r['events'] / r['seconds'] / 1e6:.1f}",
                f"{r['above']:.0f}",
                f"{r['above'] / r['size_mib']:.2f}x",
                f"{r['no_decay_above']:.0f} ({r['no_decay_above'] / r['size_mib']:.2f}x)",
            ]
        )
    main = markdown_table(
        [
            "scale",
            "events",
            "parquet MiB",
            "studies",
            "time s, best (all runs)",
            "M events/s",
            "peak RSS above import, MiB",
            "/ parquet size",
            "same, freed pages returned at once (/ parquet)",
        ],
        rows,
        [False, True, True, True, True, True, True, True, True],
    )
    profile_rows = []
    for scale, r in zip(scales, results, strict=True):
        for label, phases in (("default", r["phases"]), ("no decay", r["no_decay_phases"])):
            if phases:
                profile_rows.append(
                    [f"{scale}x", label, *(f"{phases[phase] - import_rss:.0f}" for phase in PHASES)]
                )
    profile = markdown_table(
        ["scale", "allocator", "open + validate", "build labels", "write parquet + sidecar"],
        profile_rows,
        [False, False, True, True, True],
    )
    return (
        main + "\n\nPeak RSS above the import baseline by phase (MiB; VmHWM reset at each phase's start, so a"
        " phase's figure includes what earlier phases left resident):\n\n" + profile
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", type=int, nargs="+", default=[1, 4, 16], help="multiples of --copies")
    parser.add_argument("--copies", type=int, default=11, help="demo copies at scale 1")
    parser.add_argument("--tasks-k", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="POLARS_MAX_THREADS of the child")
    parser.add_argument(
        "--repeats", type=int, default=3, help="child runs per scale; the fastest is reported"
    )
    parser.add_argument(
        "--memory-budget-mib", type=float, help="build_study_labels' memory_budget_mib (default: its own)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 copies, scales 1 and 2, one run")
    parser.add_argument("--save", type=Path, help="also write the tables to this markdown file")
    parser.add_argument("--child", nargs=4, metavar=("MEDS", "STUDIES", "OUT", "TASKS"))
    parser.add_argument("--only-import", action="store_true")
    args = parser.parse_args()
    if args.child:
        child(*(Path(p) for p in args.child), args.only_import, args.memory_budget_mib)
        return
    if not DEMO.is_dir():
        sys.exit(f"the MIMIC-IV demo is not at {DEMO} (see ../shared/data/README.md)")
    if args.quick:
        args.copies, args.scales, args.repeats = 2, [1, 2], 1

    from ehr.meds import MEDSDataset
    from ehr.vocab import load_phenotypes, select_tasks

    events = demo_events()
    with tempfile.TemporaryDirectory(prefix="fm3d_ehr_bench_") as tmp:
        tasks_file = Path(tmp) / "tasks.txt"
        tasks = select_tasks(MEDSDataset(DEMO), args.tasks_k)["code"].to_list()
        tasks_file.write_text("\n".join(tasks))
        import_rss = run_child(["--child", *["-"] * 4, "--only-import"], args.threads)["peak_rss_mib"]
        results = []
        for scale in args.scales:
            print(f"scale {scale}x: {args.copies * scale} demo copies", file=sys.stderr, flush=True)
            results.append(measure_scale(events, args.copies * scale, tasks_file, args, import_rss))
    load = os.getloadavg()[0]
    budget = "its default" if args.memory_budget_mib is None else f"{args.memory_budget_mib:g} MiB"
    text = "\n".join(
        [
            f"Machine: {machine()}; child limited to POLARS_MAX_THREADS={args.threads}; "
            f"1-min load average {load:.1f} at the end (the machine is shared). "
            f"{len(tasks)} tasks, {len(load_phenotypes(PHENOTYPES))} phenotype groups; memory_budget_mib "
            f"{budget}; a child that only imports peaks at {import_rss:.0f} MiB; peaks are the highest of "
            f"{args.repeats} run(s), the no-decay column one run with _RJEM_MALLOC_CONF={NO_DECAY}.",
            "",
            tables(results, args.scales, import_rss),
        ]
    )
    print(text)
    if args.save:
        args.save.parent.mkdir(parents=True, exist_ok=True)
        header = (
            "# EHR label building benchmark\n\n"
            f"Produced by `python benchmarks/ehr_labels.py --save {args.save}` "
            f"(MIMIC-IV demo x {args.copies} at scale 1, scales {', '.join(f'{s}x' for s in args.scales)}, "
            f"{args.tasks_k} MOTOR tasks, conf/ehr/phenotypes_example.yaml).\n\n"
        )
        args.save.write_text(header + text + "\n")


if __name__ == "__main__":
    main()
