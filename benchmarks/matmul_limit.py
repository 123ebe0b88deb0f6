"""The machine's matmul limit: fp32 `torch.mm` throughput on 4096 x 4096 matrices (bf16 too on CUDA).

Every other figure of the suite divides by this one: a model FLOP utilisation says how much
of what this machine can do in a dense matmul a training step achieves, a number that
survives a change of machine or a busy neighbour far better than seconds do. Each thread
count runs in its own child process (the thread pool is fixed once per process); the table
gives the median of the timed calls, and the best one as the less disturbed estimate.

    python benchmarks/matmul_limit.py              # 1 thread and the threads in use, ~3 s each
    python benchmarks/matmul_limit.py --quick      # 1024 x 1024, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Run as a script, this folder is on sys.path: the shared helpers import without a package.
from _common import machine_line, markdown_table, matmul_gflops, median, run_child

N_FULL, N_QUICK = 4096, 1024


def measure(threads: int, n: int, dtype: str, device: str, seconds: float) -> dict:
    """One limit measurement in this process: `threads` torch threads, median and best GFLOP/s."""
    import torch

    torch.set_num_threads(threads)
    samples = matmul_gflops(n, dtype=dtype, device=device, seconds=seconds)
    return {"threads": threads, "n": n, "dtype": dtype, "device": device,
            "median_gflops": median(samples), "best_gflops": max(samples), "calls": len(samples)}  # fmt: skip


def measure_in_child(threads: int, *, n: int = N_FULL, dtype: str = "float32", device: str = "cpu",
                     seconds: float = 3.0) -> dict:  # fmt: skip
    """`measure` in a fresh process, so the thread count is its own; adds the child's peak RSS."""
    case = {"threads": threads, "n": n, "dtype": dtype, "device": device, "seconds": seconds}
    result = run_child([str(Path(__file__).resolve()), "--case", json.dumps(case)], timeout=600)
    return {**result.report, "peak_rss_mib": result.peak_rss_mib}


def cases(quick: bool) -> list[dict]:
    """Thread counts 1 and the benchmark's default (the cores), fp32 on CPU; bf16 too on CUDA."""
    import torch

    n, seconds = (N_QUICK, 0.5) if quick else (N_FULL, 3.0)
    cores = len(os.sched_getaffinity(0))
    out = [{"threads": t, "n": n, "dtype": "float32", "device": "cpu", "seconds": seconds}
           for t in sorted({1, cores})]  # fmt: skip
    if torch.cuda.is_available():
        out += [{"threads": cores, "n": n, "dtype": dt, "device": "cuda", "seconds": seconds}
                for dt in ("float32", "bfloat16")]  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"{N_QUICK}x{N_QUICK}, 0.5 s per case")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one measurement in this process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure(**json.loads(args.case))))
        return 0
    rows = []
    for case in cases(args.quick):
        r = measure_in_child(**case)
        print(f"matmul_limit: {r}", file=sys.stderr, flush=True)
        rows.append((r["device"], r["dtype"], f"{r['n']}²", r["threads"], f"{r['median_gflops']:.1f}",
                     f"{r['best_gflops']:.1f}", r["calls"]))  # fmt: skip
    print(
        markdown_table(
            ("device", "dtype", "matrices", "threads", "median GFLOP/s", "best GFLOP/s", "timed calls"),
            rows,
            (False, False, True, True, True, True, True),
        )
    )
    print(f"\n{machine_line()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
