"""Attention entry-point overhead: `fm3d.models.attention.attention` against the bare SDPA kernel.

fm3d's encoder calls its attention entry point with q, k, v as token-major views
[B, N, H, Dh] of one fused qkv tensor; the entry point resolves the backend and hands SDPA
transposed views [B, H, N, Dh]. Three ways, forward and forward + backward, N = 512, 2048
and 8192 tokens, 12 heads of 64, batch 1, fp32:

  entry point      `attention(q, k, v, backend="sdpa")` on the fused tensor's views;
  bare SDPA        `F.scaled_dot_product_attention` on the same views, transposed by hand:
                   the entry point's overhead (dispatch, layout) is the ratio of the two;
  bare, separate   SDPA on three freshly made contiguous [B, H, N, Dh] tensors: the kernel's
                   best case, which no fused-projection model gets (its backward must stack
                   the three gradients into the fused tensor's gradient).

The math path is benchmarks/attention.py's subject (SDPA vs math up to N = 8192).

Each case runs in its own child process: it builds its inputs, records its RSS, and the
parent reads the child's peak RSS from the kernel, so "peak extra" is the memory the case
needed above its inputs (scores, outputs, gradients). Time is the median over rounds of the
child's timed steps (after one warm-up step); rounds interleave the three.

    python benchmarks/attention_entry.py            # N = 512, 2048, 8192; 2 rounds, ~15 min
    python benchmarks/attention_entry.py --quick    # N = 256, 512, one round
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# Run as a script, this folder is on sys.path: the shared helpers import without a package.
from _common import BenchmarkError, machine_line, markdown_table, median, peak_rss_self_mib, run_child

HEADS, HEAD_DIM = 12, 64


IMPLS = ("entry", "bare", "bare_separate")


def _step(impl: str, n: int, backward: bool):
    import torch
    import torch.nn.functional as F

    from fm3d.models.attention import attention

    if impl == "bare_separate":
        leaves = [torch.randn(1, HEADS, n, HEAD_DIM, requires_grad=backward) for _ in range(3)]

        def forward() -> torch.Tensor:
            return F.scaled_dot_product_attention(*leaves)  # contiguous [B, H, N, Dh] each

    else:
        qkv = torch.randn(1, n, 3, HEADS, HEAD_DIM, requires_grad=backward)  # the fused projection's output
        leaves = [qkv]

        def forward() -> torch.Tensor:
            q, k, v = qkv.unbind(2)  # [B, N, H, Dh] views, as in fm3d's Attention module
            if impl == "entry":
                return attention(q, k, v, backend="sdpa")
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def step() -> None:
        out = forward()
        if backward:
            out.sum().backward()
            for leaf in leaves:
                leaf.grad = None

    return step


def run_case(case: dict) -> dict:
    """One case in this process: inputs, then RSS, one warm-up step and timed steps for `seconds`."""
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    step = _step(case["impl"], case["n"], case["backward"])
    baseline = peak_rss_self_mib()
    step()
    times: list[float] = []
    while not times or sum(times) < case["seconds"]:
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"baseline_rss_mib": baseline, "seconds": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 256, 512 and one round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="time steps for this long per process (at least one step)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every child (default 2)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case in this process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    rounds = args.rounds or (1 if args.quick else 2)
    lengths = (256, 512) if args.quick else (512, 2048, 8192)
    keys = [(backward, n) for backward in (False, True) for n in lengths]
    results: dict[tuple, list[dict]] = {}
    for round_index in range(rounds):
        for backward, n in keys:
            for impl in IMPLS:
                case = {
                    "impl": impl,
                    "n": n,
                    "backward": backward,
                    "threads": args.threads,
                    "seconds": args.seconds,
                }
                try:
                    child = run_child([__file__, "--case", json.dumps(case)], timeout=3600)
                except BenchmarkError as error:
                    print(f"attention_entry {case}: failed: {error}", file=sys.stderr, flush=True)
                    continue
                extra = child.peak_rss_mib - child.report["baseline_rss_mib"]
                seconds = median(child.report["seconds"])
                results.setdefault((backward, n, impl), []).append({"seconds": seconds, "extra_mib": extra})
                print(
                    f"attention_entry round {round_index + 1} {impl} N={n} backward={backward}: "
                    f"{seconds:.3f} s, peak extra {extra:.0f} MiB",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    for backward, n in keys:
        got = {impl: results.get((backward, n, impl), []) for impl in IMPLS}
        if not all(got.values()):
            rows.append(("fwd+bwd" if backward else "fwd", f"{n:,}", "failed", *[""] * 8))
            continue
        t = {impl: 1000 * median([r["seconds"] for r in runs]) for impl, runs in got.items()}
        m = {impl: median([r["extra_mib"] for r in runs]) for impl, runs in got.items()}
        rows.append(
            (
                "fwd+bwd" if backward else "fwd",
                f"{n:,}",
                *(f"{t[impl]:.1f}" for impl in IMPLS),
                f"{t['entry'] / t['bare']:.2f}",
                *(f"{m[impl]:.0f}" for impl in IMPLS),
                f"{m['entry'] / m['bare']:.2f}" if m["bare"] > 0 else "",
            )
        )
    print(
        markdown_table(
            (
                "pass",
                "tokens",
                "entry point (ms)",
                "bare SDPA (ms)",
                "bare SDPA, separate q/k/v (ms)",
                "time entry / bare",
                "entry peak extra (MiB)",
                "bare peak extra (MiB)",
                "bare separate peak extra (MiB)",
                "memory entry / bare",
            ),
            rows,
            (False, *[True] * 9),
        )
    )
    print(
        f"\n12 heads of 64, batch 1, fp32, {args.threads} torch threads, median of {rounds} interleaved "
        f"round(s); in each, the median of the steps timed for {args.seconds:g} s (at least one) after a "
        "warm-up step. Entry point and bare SDPA get the same q/k/v views of one fused [B, N, 3, H, Dh] "
        "tensor; 'separate' gives SDPA three contiguous [B, H, N, Dh] leaves (no fused projection: its "
        "backward skips stacking the three gradients into one). Peak extra = the child's peak RSS "
        "minus its RSS after building the inputs.\n\n" + machine_line()
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
