"""Benchmark `fm3d prepare`: studies per second with 1 and 2 worker processes, and 1 and 2 array tasks.

The TotalSegmentator example CT (122x101x30 at 3 mm, shared/data) is listed ~32 times under
different study ids in a temporary manifest, and the real `fm3d prepare` command prepares it
into a fresh temporary cache at the default settings (3.0 x 1.5 x 1.5 mm, HU -1000..1000).
Wall time includes process start-up, hashing, reading, resampling and the atomic writes; CPU
seconds are those of the command and its worker processes. Prints a markdown table and saves it
to docs/benchmarks/prepare.md (--no-save to skip). `run_prepare_benchmark` can be called from
the data-loading benchmark. The array-task rows run N `fm3d prepare --shard i/N` commands at
once, as N SLURM array tasks on one node would, then the `--merge`: wall time is until the last
task ends plus the merge.

    python benchmarks/prepare.py [--studies 32] [--workers 1 2] [--tasks 1 2] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import psutil

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CT = REPO.parent / "shared" / "data" / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"


def _run_measured(command: list[str]) -> tuple[float, float]:
    """Run a command; return (wall s, CPU s of it and every process it starts, sampled every 20 ms).

    getrusage(RUSAGE_CHILDREN) would miss the workers, which the fork server reaps, not us.
    """
    cpu: dict[int, float] = {}
    start = time.perf_counter()
    process = psutil.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    while process.poll() is None:
        try:
            tree = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            tree = []
        for p in tree:
            try:
                times = p.cpu_times()
                cpu[p.pid] = times.user + times.system
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.02)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {process.stderr.read().decode()[-2000:]}")
    return wall, sum(cpu.values())


def _copies_manifest(source: Path, studies: int, folder: Path) -> Path:
    """A manifest listing `source` `studies` times under different study ids, written into `folder`."""
    if not source.is_file():
        raise FileNotFoundError(f"{source} is absent; the benchmark needs ../shared/data (see its README)")
    manifest = folder / "manifest.csv"
    ids = [f"study{i:03d}" for i in range(studies)]
    pl.DataFrame({"study_id": ids, "patient_id": ids, "image_path": [str(source)] * studies}).write_csv(
        manifest
    )
    return manifest


def run_prepare_benchmark(
    source: Path = DEFAULT_CT, studies: int = 32, workers: tuple[int, ...] = (1, 2), repeats: int = 2
) -> list[dict[str, float]]:
    """Time `fm3d prepare` over `studies` copies of `source` for each worker count (best of `repeats`)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fm3d-prepare-bench-") as tmp:
        manifest = _copies_manifest(source, studies, Path(tmp))
        for n in workers:
            best: dict[str, float] | None = None
            for _ in range(repeats):
                out = Path(tmp) / f"cache-{n}"
                shutil.rmtree(out, ignore_errors=True)
                command = [sys.executable, "-m", "fm3d.cli", "prepare", "--manifest", str(manifest),
                           "--out", str(out), "--workers", str(n), "--no-progress"]  # fmt: skip
                wall, cpu = _run_measured(command)
                prepared = len(list((out / "studies").glob("*.npy")))
                if prepared != studies:
                    raise RuntimeError(f"expected {studies} prepared studies, found {prepared} in {out}")
                row = {"workers": n, "studies": studies, "wall_s": wall, "studies_per_s": studies / wall,
                       "cpu_s_per_study": cpu / studies}  # fmt: skip
                if best is None or row["wall_s"] < best["wall_s"]:
                    best = row
            # A re-run of the finished cache: the cost of resuming when nothing changed.
            best["rerun_s"], _ = _run_measured(command)
            rows.append(best)
    return rows


def run_array_benchmark(
    source: Path = DEFAULT_CT, studies: int = 32, tasks: tuple[int, ...] = (1, 2), repeats: int = 2
) -> list[dict[str, float]]:
    """N parallel `--shard i/N` runs + the merge over `studies` copies of `source` (best of `repeats`)."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="fm3d-prepare-array-") as tmp:
        manifest = _copies_manifest(source, studies, Path(tmp))
        for n in tasks:
            best: dict[str, float] | None = None
            for _ in range(repeats):
                out = Path(tmp) / f"cache-{n}"
                shutil.rmtree(out, ignore_errors=True)
                base = [sys.executable, "-m", "fm3d.cli", "prepare", "--manifest", str(manifest), "--out",
                        str(out), "--no-progress"]  # fmt: skip
                start = time.perf_counter()
                if n == 1:
                    _run_measured(base)
                    merge_s = 0.0
                else:
                    running = [subprocess.Popen([*base, "--shard", f"{i}/{n}"], stdout=subprocess.DEVNULL,
                                                stderr=subprocess.PIPE) for i in range(n)]  # fmt: skip
                    for process in running:
                        if process.wait() != 0:
                            raise RuntimeError(f"a shard failed: {process.stderr.read().decode()[-2000:]}")
                    merge_s, _ = _run_measured([*base, "--merge"])
                wall = time.perf_counter() - start
                prepared = len(list((out / "studies").glob("*.npy")))
                if prepared != studies:
                    raise RuntimeError(f"expected {studies} prepared studies, found {prepared} in {out}")
                row = {"tasks": n, "studies": studies, "wall_s": wall, "studies_per_s": studies / wall,
                       "merge_s": merge_s}  # fmt: skip
                if best is None or row["wall_s"] < best["wall_s"]:
                    best = row
            rows.append(best)
    return rows


def array_table(rows: list[dict[str, float]]) -> str:
    """The array-task rows as a markdown table."""
    lines = ["| array tasks | studies | wall incl. merge (s) | studies/s | of which merge (s) | speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for r in rows:
        speedup = r["studies_per_s"] / rows[0]["studies_per_s"]
        lines.append(
            f"| {r['tasks']} | {r['studies']} | {r['wall_s']:.2f} | {r['studies_per_s']:.2f} "
            f"| {r['merge_s']:.2f} | {speedup:.2f}x |"
        )
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, float]]) -> str:
    """The benchmark rows as a markdown table."""
    lines = [
        "| workers | studies | wall (s) | studies/s | CPU-s per study | re-run, all skipped (s) "
        "| studies/s net of start-up |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        net = r["studies"] / max(r["wall_s"] - r["rerun_s"], 1e-9)
        lines.append(
            f"| {r['workers']} | {r['studies']} | {r['wall_s']:.2f} | {r['studies_per_s']:.2f} "
            f"| {r['cpu_s_per_study']:.3f} | {r['rerun_s']:.2f} | {net:.2f} |"
        )
    return "\n".join(lines)


def machine() -> str:
    """A one-line description of the machine the figures come from."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return f"{cpu}, {os.cpu_count()} cores visible, Python {platform.python_version()}, load average {load}"


def _load_note() -> str:
    """A warning when other work competed for the CPU, since then worker scaling is not representative."""
    load, cores = os.getloadavg()[0], os.cpu_count() or 1
    if load <= cores:
        return ""
    return (
        f"\nThe load average ({load:.1f}) exceeded the {cores} cores while measuring: other jobs competed "
        "for the CPU, so absolute figures are pessimistic and the worker scaling is not representative. "
        "CPU-s per study is the better guide to cost on an idle machine.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=DEFAULT_CT)
    parser.add_argument("--studies", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 2], help="array tasks run at once")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument(
        "--no-save", action="store_true", help="print only; do not write docs/benchmarks/prepare.md"
    )
    args = parser.parse_args(argv)
    host = machine()
    rows = run_prepare_benchmark(args.source, args.studies, tuple(args.workers), args.repeats)
    table = markdown_table(rows)
    arrays = array_table(run_array_benchmark(args.source, args.studies, tuple(args.tasks), args.repeats))
    print(table)
    print(f"\n{arrays}")
    print(f"\nMachine: {host}\n{_load_note()}")
    if not args.no_save:
        doc = REPO / "docs" / "benchmarks" / "prepare.md"
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(
            "# `fm3d prepare` throughput\n\n"
            f"`python benchmarks/prepare.py --studies {args.studies} --repeats {args.repeats}`: the real "
            f"TotalSegmentator example CT ({args.source.name}, 122x101x30 voxels at 3 mm) listed "
            f"{args.studies} times under different study ids, prepared by the `fm3d prepare` command into "
            "a fresh cache at the default settings (3.0 x 1.5 x 1.5 mm (D, H, W), HU -1000..1000; output "
            "30x202x244 int16). Wall time is the whole command (start-up, hashing, reading, resampling, "
            f"atomic writes, index), best of {args.repeats}; CPU-s sums the command and its worker "
            "processes (sampled every 20 ms). "
            "'Re-run' runs the command again on the finished cache (every study skipped as up to date): "
            "that is the fixed cost of starting Python, importing torch and checking the sources, and "
            "the last column divides the studies by the wall time net of it.\n\n"
            f"{table}\n\n"
            "As SLURM array tasks (`--shard i/N` commands run at once with one worker each, as N array "
            "tasks on one node would, then `--merge`; wall time until the merge ends):\n\n"
            f"{arrays}\n\nMachine: {host}.\n{_load_note()}"
        )
        print(f"saved {doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
