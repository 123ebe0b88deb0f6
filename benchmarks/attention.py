"""Benchmark attention backends and ViT3D training steps on this machine; prints a markdown table.

Attention: SDPA vs math, sequence lengths 512..8192, 12 heads of 64, batch 1, fp32 on CPU,
forward and forward+backward, through `fm3d.models.attention.attention` with q/k/v taken as
views of one fused qkv tensor (the layout the encoder's hot path uses). ViT3D: one
forward+backward of vit3d_tiny and vit3d_small at 96^3 (216 tokens), batch 2, with and without
activation checkpointing.

Peak memory: every case runs in its own child process. The child builds its inputs, reads its
peak resident set size (`getrusage(RUSAGE_SELF).ru_maxrss`), runs the case once and reads it
again; the difference is the extra memory the case needed at its peak (activations, scores,
gradients), independent of torch's import, the inputs and whatever earlier cases left cached.
Time is the median wall time of the repeats that follow.

    python benchmarks/attention.py            # the full table (needs ~16 GiB free for math at 8192)
    python benchmarks/attention.py --quick    # N <= 2048 and one repeat, a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

import fm3d
from fm3d.models.attention import attention

HEADS, HEAD_DIM = 12, 64


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _attention_case(backend: str, n: int, backward: bool):
    qkv = torch.randn(1, n, 3, HEADS, HEAD_DIM, requires_grad=backward)

    def step() -> None:
        q, k, v = qkv.unbind(2)  # [B, N, H, Dh] views
        out = attention(q, k, v, backend=backend)
        if backward:
            out.sum().backward()
            qkv.grad = None

    return step


def _vit_case(name: str, checkpointing: bool):
    torch.manual_seed(0)
    encoder = fm3d.create_encoder(name, grad_checkpointing=checkpointing).train()
    x = torch.randn(2, 1, 96, 96, 96)

    def step() -> None:
        out = encoder(x)
        (out.tokens.mean() + out.pooled.mean()).backward()
        encoder.zero_grad(set_to_none=True)

    return step


def run_case(case: dict, repeats: int) -> dict:
    """Run one case in this process: peak extra memory of the first run, median time of the rest."""
    torch.set_grad_enabled(True)
    if case["kind"] == "attention":
        step = _attention_case(case["backend"], case["n"], case["backward"])
    else:
        step = _vit_case(case["model"], case["checkpointing"])
    before = _peak_mib()
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    peak = _peak_mib() - before
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {**case, "seconds": statistics.median(times) if times else first, "peak_mib": peak}


def _in_child(case: dict, repeats: int) -> dict:
    command = [sys.executable, __file__, "--case", json.dumps(case), "--repeats", str(repeats)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {
            **case,
            "error": done.stderr.strip().splitlines()[-1] if done.stderr else f"rc {done.returncode}",
        }
    return json.loads(done.stdout.strip().splitlines()[-1])


def cases(quick: bool) -> list[dict]:
    lengths = (512, 1024, 2048) if quick else (512, 1024, 2048, 4096, 8192)
    out = [
        {"kind": "attention", "backend": backend, "n": n, "backward": backward}
        for backward in (False, True)
        for n in lengths
        for backend in ("sdpa", "math")
    ]
    models = ("vit3d_tiny",) if quick else ("vit3d_tiny", "vit3d_small")
    out += [
        {"kind": "vit", "model": model, "checkpointing": ckpt} for model in models for ckpt in (False, True)
    ]
    return out


def _table(results: list[dict]) -> str:
    lines = [
        "| case | pass | backend / checkpointing | tokens | time (ms) | peak extra memory (MiB) |",
        "|---|---|---|---:|---:|---:|",
    ]
    for r in results:
        if r["kind"] == "attention":
            label = ("attention", "fwd+bwd" if r["backward"] else "fwd", r["backend"], r["n"])
        else:
            label = (f"{r['model']} 96³ ×2", "fwd+bwd", "ckpt" if r["checkpointing"] else "no ckpt", 216)
        if "error" in r:
            lines.append("| {} | {} | {} | {} | failed: {} | |".format(*label, r["error"][:60]))
        else:
            lines.append(
                "| {} | {} | {} | {} | {:.1f} | {:.0f} |".format(*label, 1000 * r["seconds"], r["peak_mib"])
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N <= 2048, vit3d_tiny only, one repeat")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed repeats per case (default 3, quick 1)"
    )
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    repeats = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case), repeats)))
        return 0
    results = []
    for case in cases(args.quick):
        results.append(_in_child(case, repeats))
        print(f"done: {results[-1]}", file=sys.stderr, flush=True)
    print(
        f"Machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, fp32, batch 1 for attention.\n"
    )
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
