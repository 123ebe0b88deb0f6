"""Encoder training step: fm3d's vit3d_base against MONAI's ViT at 160x224x224, fp32, on the CPU.

One forward + backward of a ViT-B (hidden 768, 12 blocks, 12 heads, MLP 3072, conv patch
embedding of 16^3) on one volume [1, 1, 160, 224, 224] = 10 x 14 x 14 = 1,960 patch tokens
(fm3d adds a cls token: 1,961), loss = mean of the output tokens, gradients set to None
between steps as `zero_grad(set_to_none=True)` does. Candidates:

  fm3d           `fm3d.create_encoder("vit3d_base", image_size=(160, 224, 224))` (SDPA attention);
  fm3d + ckpt    the same with `grad_checkpointing=True` (each block recomputed in backward);
  MONAI          `monai.networks.nets.ViT` with the same sizes and qkv bias (einsum attention);
  MONAI flash    the same with `use_flash_attention=True` on every block (SDPA attention).

Each candidate runs in its own child process with `--threads` torch threads (default 2):
build, `--warmup` untimed steps (the first pays page faults and allocator growth), then
`--steps` timed ones. The parent reads the child's peak RSS from the kernel. The child also
measures the matmul limit (fp32 4096^2 `torch.mm`, same threads) right before building and
right after its timed steps, and its MFU divides by the best matmul call of the two: on a
shared machine the load changes within a minute (the limit read 90 GFLOP/s before a step and
191 right after it), and the best call is the least disturbed estimate of what the machine
can do. The step time is a median over rounds, so under load the MFU errs low, never high.
Rounds interleave the candidates; the table gives medians over rounds.

Model FLOPs per training step, counted from the config (multiply-add = 2 FLOPs; backward =
2x forward for every matmul whose input needs a gradient; elementwise work not counted;
recomputation under checkpointing not counted, i.e. model FLOPs, not hardware FLOPs):

    blocks       3 * L * ((8 + 4 * mlp_ratio) * N * C^2  +  4 * N^2 * C)
                 (qkv 6NC^2 + proj 2NC^2 + MLP 4*mlp_ratio*NC^2 per forward; q k^T and a v 4N^2C)
    patch embed  2 * 2 * P * (in_chans * p^3) * C   (forward + weight gradient; the image needs none)

With L=12, C=768, mlp_ratio=4, N=1961, P=1960, p=16: 1.425 TFLOP for the blocks + 0.025 for
the patch embedding. MFU = model FLOPs / step time / matmul limit of the same process.

    python benchmarks/encoder_step.py              # 2 rounds, ~25 min on 2 loaded cores
    python benchmarks/encoder_step.py --quick      # 2 blocks at 32x64x64, a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time

# Run as a script, this folder is on sys.path: the shared helpers import without a package.
from _common import (
    BenchmarkError,
    machine_line,
    markdown_table,
    matmul_gflops,
    median,
    peak_rss_self_mib,
    run_child,
)

FULL = {"image_size": (160, 224, 224), "depth": 12, "embed_dim": 768, "heads": 12}
# The smoke run keeps every code path but shrinks the work to seconds: ViT-Tiny width, 2 blocks.
QUICK = {"image_size": (32, 64, 64), "depth": 2, "embed_dim": 192, "heads": 3}
CANDIDATES = {
    "fm3d": {"impl": "fm3d", "attention": "SDPA (fm3d entry point)", "ckpt": False},
    "fm3d + ckpt": {"impl": "fm3d", "attention": "SDPA (fm3d entry point)", "ckpt": True},
    "MONAI": {"impl": "monai", "attention": "einsum + softmax", "ckpt": False},
    "MONAI flash": {"impl": "monai", "attention": "SDPA (use_flash_attention)", "ckpt": False},
}
MLP_RATIO, PATCH = 4.0, 16


def training_flops(
    *,
    embed_dim: int,
    depth: int,
    mlp_ratio: float,
    tokens: int,
    patches: int,
    patch_voxels: int,
    in_chans: int,
) -> float:
    """Model FLOPs of one forward + backward of a plain ViT (see the module docstring for the terms)."""
    c, n = embed_dim, tokens
    per_block_forward = (8 + 4 * mlp_ratio) * n * c * c + 4 * n * n * c
    patch_embed = 2 * 2 * patches * in_chans * patch_voxels * c
    return 3 * depth * per_block_forward + patch_embed


def _build(impl: str, ckpt: bool, image_size: tuple[int, int, int], depth: int, embed_dim: int, heads: int):
    """The model and a loss function of its output, for one candidate."""
    if impl == "fm3d":
        import fm3d

        model = fm3d.create_encoder(
            "vit3d_base", image_size=image_size, patch_size=PATCH, depth=depth, embed_dim=embed_dim,
            num_heads=heads, grad_checkpointing=ckpt,
        )  # fmt: skip
        return model, lambda out: out.tokens.mean()
    from monai.networks.nets import ViT

    model = ViT(
        in_channels=1,
        img_size=image_size,
        patch_size=PATCH,
        hidden_size=embed_dim,
        mlp_dim=int(embed_dim * MLP_RATIO),
        num_layers=depth,
        num_heads=heads,
        proj_type="conv",
        qkv_bias=True,
    )
    if impl == "monai_flash":
        for block in model.blocks:
            block.attn.use_flash_attention = True
    return model, lambda out: out[0].mean()


def run_case(case: dict) -> dict:
    """One candidate in this process: limit, build, warm up, time `steps` training steps, limit again."""
    import torch

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    # Before the build, so the matmul's buffers stay below the step's peak RSS.
    limit_before = max(matmul_gflops(case["limit_n"], seconds=case["limit_seconds"]))
    started = time.perf_counter()
    model, loss_of = _build(
        case["impl"], case["ckpt"], tuple(case["image_size"]), case["depth"], case["embed_dim"], case["heads"]
    )
    model.train()
    x = torch.randn(1, 1, *case["image_size"])
    build_seconds = time.perf_counter() - started
    baseline = peak_rss_self_mib()

    def step() -> float:
        start = time.perf_counter()
        loss_of(model(x)).backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    warm = [step() for _ in range(case["warmup"])]
    times = [step() for _ in range(case["steps"])]
    limit_after = max(matmul_gflops(case["limit_n"], seconds=case["limit_seconds"]))
    return {
        "limit_gflops": [limit_before, limit_after],
        "build_seconds": build_seconds,
        "baseline_rss_mib": baseline,
        "warmup_seconds": warm,
        "seconds": times,
    }


def _fmt_mib(value: float) -> str:
    return f"{value:,.0f}"


def run(args: argparse.Namespace) -> str:
    """All rounds, candidates interleaved; returns the markdown table and notes."""
    sizes = QUICK if args.quick else FULL
    image_size, depth, embed_dim = sizes["image_size"], sizes["depth"], sizes["embed_dim"]
    grid = tuple(s // PATCH for s in image_size)
    patches = grid[0] * grid[1] * grid[2]
    flops = training_flops(
        embed_dim=embed_dim, depth=depth, mlp_ratio=MLP_RATIO, tokens=patches + 1,
        patches=patches, patch_voxels=PATCH**3, in_chans=1,
    )  # fmt: skip
    chosen = args.candidates or list(CANDIDATES)
    limit_n, limit_seconds = (1024, 0.5) if args.quick else (4096, 3.0)
    results: dict[str, list[dict]] = {name: [] for name in chosen}
    errors: dict[str, str] = {}
    for round_index in range(args.rounds):
        for name in chosen:
            spec = CANDIDATES[name]
            impl = "monai_flash" if name == "MONAI flash" else spec["impl"]
            case = {"impl": impl, "ckpt": spec["ckpt"], **sizes, "threads": args.threads,
                    "warmup": args.warmup, "steps": args.steps, "limit_n": limit_n,
                    "limit_seconds": limit_seconds}  # fmt: skip
            try:
                child = run_child([__file__, "--case", json.dumps(case)], timeout=args.timeout)
            except BenchmarkError as error:
                errors[name] = str(error).splitlines()[-1]
                print(f"encoder_step {name}: failed: {error}", file=sys.stderr, flush=True)
                continue
            results[name].append({**child.report, "peak_rss_mib": child.peak_rss_mib})
            print(f"encoder_step round {round_index + 1} {name}: {child.report['seconds']} s/step, limit "
                  f"{child.report['limit_gflops']} GFLOP/s, peak RSS {child.peak_rss_mib:.0f} MiB",
                  file=sys.stderr, flush=True)  # fmt: skip
    ref = results.get("MONAI") or []
    ref_seconds = median([median(r["seconds"]) for r in ref])
    ref_rss = median([r["peak_rss_mib"] for r in ref])
    rows = []
    for name in chosen:
        runs = results[name]
        if not runs:
            rows.append(
                (name, CANDIDATES[name]["attention"], "", f"failed: {errors.get(name, '?')}", *[""] * 8)
            )
            continue
        seconds = median([median(r["seconds"]) for r in runs])
        mfu = median([flops / median(r["seconds"]) / 1e9 / max(r["limit_gflops"]) for r in runs])
        rss = median([r["peak_rss_mib"] for r in runs])
        above = median([r["peak_rss_mib"] - r["baseline_rss_mib"] for r in runs])
        gflops = flops / seconds / 1e9
        rows.append(
            (
                name,
                CANDIDATES[name]["attention"],
                "yes" if CANDIDATES[name]["ckpt"] else "no",
                # Three significant digits: a --quick step can take under 5 ms, which "0.00" hid.
                f"{seconds:.3g}",
                ", ".join(f"{median(r['seconds']):.3g}" for r in runs),
                f"{gflops:.1f}",
                f"{100 * mfu:.0f} %",
                ", ".join(f"{max(r['limit_gflops']):.0f}" for r in runs),
                _fmt_mib(rss),
                _fmt_mib(above),
                f"{ref_seconds / seconds:.2f}x" if ref else "",
                f"{rss / ref_rss:.2f}x" if ref else "",
            )
        )
    table = markdown_table(
        ("candidate", "attention", "checkpointing", "s/step (median)", "per round", "GFLOP/s",
         "MFU (of its limit)", "limit per round (GFLOP/s)", "peak RSS (MiB)", "peak above built model (MiB)",
         "speed vs MONAI", "peak RSS vs MONAI"),
        rows,
        (False, False, False, True, True, True, True, True, True, True, True, True),
    )  # fmt: skip
    notes = (
        f"Input [1, 1, {', '.join(map(str, image_size))}], patch {PATCH}, {patches:,} patch tokens, "
        f"hidden {embed_dim}, {depth} blocks, fp32, {args.threads} torch threads, forward + backward, "
        f"{args.warmup} warm-up + {args.steps} timed step(s) per process, {args.rounds} round(s). "
        f"Model FLOPs per step {flops / 1e12:.4f} TFLOP (formula in benchmarks/encoder_step.py). "
        f"MFU = model FLOPs / step time / the matmul limit (fp32 {limit_n}² torch.mm, {args.threads} "
        "threads), best call of those timed in the same process before and after its steps; median over "
        "rounds; GFLOP/s uses the median step time.\n\n"
        f"{machine_line()}"
    )
    return f"{table}\n\n{notes}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 blocks at 32x64x64, 1 round: a smoke run")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 2, quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process (default 1)")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per process (default 1)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every child (default 2)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds one child may run")
    parser.add_argument(
        "--candidates", nargs="+", choices=list(CANDIDATES), metavar="NAME",
        help=f"run only these ({', '.join(CANDIDATES)}); MONAI is the reference of the ratios",
    )  # fmt: skip
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one candidate in this process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
