"""Pretraining objectives' training step against the full-token encoder step: time, memory, FLOPs, on the CPU.

One training step is forward + backward (no optimizer) on one fixed batch, gradients set to
None between steps. Rows, per encoder (`--encoders`):

  encoder   the reference: the shared encoder on every patch token of the batch, with a
            trivial loss (mean square of its tokens): what any full-view objective pays first;
  mae       MAE at `--mask-ratio` (0.75): the encoder on the visible tokens only, the
            objective's default decoder on all tokens, the masked-patch loss;
  multicrop_encoder   the encoder alone on DINO's views (the input as 2 global crops, 8 local
            crops of half its size per axis), a trivial loss: DINO's own reference;
  dino_student        DINO + iBOT + KoLeo with DINOv2's heads (65536 prototypes), iBOT masks on
            30 % of the first global crop's tokens, the teacher's output computed outside the step;
  dino      the same with the teacher's forward in the step: dino / dino_student - 1 is what the
            teacher adds (the issue's bound: 40 %).

`STEPS` maps a row's name to its step builder, so another objective adds one entry.

Input [2, 1, 64, 128, 128] with 16^3 patches: 4 x 8 x 8 = 256 tokens per volume: a CT
pretraining crop at about 3 x 1.5 x 1.5 mm spacing (a 19 cm cube), small enough that a
vit3d_small step takes under half a second on two cores. The ratios depend on the token
count: attention grows with its square and MAE's encoder attends over a quarter of the
tokens, so larger crops favour MAE further; a lighter decoder does too, and the decoder is
fixed while the encoder grows (vit3d_base: `--encoders vit3d_base`).

Each case runs in its own child process with `--threads` torch threads: build, `--warmup`
untimed steps, one step under torch's FLOP counter and a saved-tensor hook (untimed), then
`--steps` timed ones. Two memory figures: "activations", the bytes autograd keeps for backward
in that step (each storage once, weights and batch excluded: exact, machine-independent), and
"peak above built", the child's peak RSS read by the parent from the kernel
(`_common.run_child`) minus the child's own peak before its first step, i.e. activations plus
gradients plus allocator slack. Rounds interleave the cases; the table gives medians over
rounds (three by default, so one round slowed by a neighbour on a shared machine does not
move them); the ratios divide by the encoder row of the same encoder.

    python benchmarks/objectives.py                    # vit3d_tiny and vit3d_small, 3 rounds (~2 min)
    python benchmarks/objectives.py --quick            # vit3d_tiny at 32x64x64, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# Run as a script, this folder is on sys.path: the shared helpers import without a package.
from _common import BenchmarkError, machine_line, markdown_table, median, peak_rss_self_mib, run_child

FULL = {"image_size": (64, 128, 128), "batch_size": 2}
QUICK = {"image_size": (32, 64, 64), "batch_size": 2}
PATCH = 16
REFERENCE = "encoder"


@dataclass
class Step:
    """One row's training step: `loss()` runs the forward; `modules` hold every trained parameter."""

    loss: Callable[[], object]
    modules: tuple[object, ...]


def encoder_step(encoder, image, case: dict) -> Step:
    """The full-token encoder with a trivial loss: the reference every objective is compared to."""
    return Step(lambda: encoder(image).tokens.float().square().mean(), (encoder,))


def mae_step(encoder, image, case: dict) -> Step:
    """MAE with its default decoder at `case["mask_ratio"]`: a fixed random mask, the same count per row."""
    import torch

    from pretrain.objectives.mae import MAEObjective

    objective = MAEObjective(encoder.embed_dim)
    objective.bind(encoder)
    batch_size, num_tokens = image.shape[0], _num_tokens(image.shape[2:])
    num_masked = round(case["mask_ratio"] * num_tokens)
    generator = torch.Generator().manual_seed(1)
    order = torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(batch_size)])
    mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool).scatter(1, order[:, :num_masked], True)
    batch = {"mae_image": image, "mae_mask": mask}

    def loss():
        return objective(batch, objective.encode(encoder, batch))[0]

    return Step(loss, (encoder, objective))


def _multicrop(image):
    """DINO's views of `image` [B, 1, D, H, W]: 2 global crops (it and its mirror), 8 half-size local
    crops, and iBOT masks on 30 % of the first global crop's tokens (DINOv2 masks half the global
    crops, 10-50 % of their tokens)."""
    import torch
    import torch.nn.functional as F

    batch_size, num_tokens = image.shape[0], _num_tokens(image.shape[2:])
    local = F.interpolate(image, scale_factor=0.5, mode="trilinear")  # [B, 1, D/2, H/2, W/2]
    masks = torch.zeros(batch_size, 2, num_tokens, dtype=torch.bool)
    generator = torch.Generator().manual_seed(1)
    for row in range(batch_size):
        masks[row, 0, torch.randperm(num_tokens, generator=generator)[: round(0.3 * num_tokens)]] = True
    return {
        "global_crops": torch.stack([image, image.flip(-1)], dim=1),  # [B, 2, 1, D, H, W]
        "local_crops": local[:, None].expand(-1, 8, -1, -1, -1, -1).contiguous(),  # [B, 8, 1, ...]
        "global_masks": masks,
    }


def multicrop_encoder_step(encoder, image, case: dict) -> Step:
    """The encoder alone on DINO's views (2 global + 8 local crops), a trivial loss: DINO's reference."""
    batch = _multicrop(image)
    global_crops, local_crops = (batch[key].flatten(0, 1) for key in ("global_crops", "local_crops"))

    def loss():
        return sum(encoder(x).tokens.float().square().mean() for x in (global_crops, local_crops))

    return Step(loss, (encoder,))


def _dino(encoder):
    from pretrain.objectives.dino import DINOObjective

    objective = DINOObjective(encoder.embed_dim)  # DINOv2's heads: 65536 prototypes
    objective.bind(encoder)
    return objective.train()


def dino_step(encoder, image, case: dict) -> Step:
    """DINO + iBOT + KoLeo with DINOv2's default heads: the student step plus the teacher's forward."""
    objective, batch = _dino(encoder), _multicrop(image)

    def loss():
        return objective(batch, objective.encode(encoder, batch))[0]

    return Step(loss, (encoder, objective))


def dino_student_step(encoder, image, case: dict) -> Step:
    """The DINO step without the teacher's forward: its output is computed once, outside the step.

    The student's encodings are made as `DINOObjective.encode` makes them (crop-major views,
    masked global crops), so `dino` minus this row is what the teacher adds.
    """
    import torch

    objective, batch = _dino(encoder), _multicrop(image)
    global_crops, local_crops, masks = (
        batch[key].transpose(0, 1).flatten(0, 1) for key in ("global_crops", "local_crops", "global_masks")
    )
    with torch.no_grad():  # what DINOObjective.encode runs for the teacher, without the student's graph
        teacher = objective.teacher_encoder.eval()(global_crops)

    def loss():
        encoded = {
            "student_global": encoder(global_crops, token_mask=masks, mask_token=objective.mask_token),
            "student_local": encoder(local_crops),
            "teacher_global": teacher,
        }
        return objective(batch, encoded)[0]

    return Step(loss, (encoder, objective))


# Row name -> step builder (encoder, image [B, 1, D, H, W], case settings) -> Step.
STEPS: dict[str, Callable[..., Step]] = {
    "encoder": encoder_step,
    "mae": mae_step,
    "multicrop_encoder": multicrop_encoder_step,
    "dino_student": dino_student_step,
    "dino": dino_step,
}


def _num_tokens(image_size) -> int:
    d, h, w = (s // PATCH for s in image_size)
    return d * h * w


def run_case(case: dict) -> dict:
    """One row in this process: build, warm up, count FLOPs of one step, time `steps` steps."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import fm3d

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    started = time.perf_counter()
    image_size = tuple(case["image_size"])
    encoder = fm3d.create_encoder(case["encoder"], image_size=image_size, patch_size=PATCH).train()
    image = torch.randn(case["batch_size"], 1, *image_size, generator=torch.Generator().manual_seed(0))
    step = STEPS[case["objective"]](encoder, image, case)
    build_seconds = time.perf_counter() - started
    baseline = peak_rss_self_mib()

    def train_step() -> float:
        start = time.perf_counter()
        step.loss().backward()
        for module in step.modules:
            module.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    warm = [train_step() for _ in range(case["warmup"])]
    # Tensors autograd keeps for backward, each storage once, minus the weights and the batch:
    # the activation memory of the step, exact and independent of the allocator.
    not_activations = {p.untyped_storage().data_ptr() for m in step.modules for p in m.parameters()}
    not_activations.add(image.untyped_storage().data_ptr())
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in not_activations:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with (
        FlopCounterMode(display=False) as counter,
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        train_step()
    times = [train_step() for _ in range(case["steps"])]
    return {
        "build_seconds": build_seconds,
        "baseline_rss_mib": baseline,
        "warmup_seconds": warm,
        "seconds": times,
        "flops": counter.get_total_flops(),
        "saved_mib": sum(saved.values()) / 2**20,
        "params_m": sum(p.numel() for m in step.modules for p in m.parameters()) / 1e6,
    }


def _ratio(value: float, reference: float) -> str:
    return f"{value / reference:.2f}x" if math.isfinite(reference) and reference > 0 else ""


def run(args: argparse.Namespace) -> str:
    """All rounds, cases interleaved; returns the markdown table and notes."""
    sizes = QUICK if args.quick else FULL
    image_size, batch_size = sizes["image_size"], args.batch_size or sizes["batch_size"]
    encoders = args.encoders or (["vit3d_tiny"] if args.quick else ["vit3d_tiny", "vit3d_small"])
    rows_wanted = [REFERENCE] + [name for name in (args.objectives or list(STEPS)) if name != REFERENCE]
    cases = [(e, o) for e in encoders for o in rows_wanted]
    results: dict[tuple[str, str], list[dict]] = {case: [] for case in cases}
    errors: dict[tuple[str, str], str] = {}
    for round_index in range(args.rounds):
        for encoder, objective in cases:
            case = {"encoder": encoder, "objective": objective, "image_size": image_size,
                    "batch_size": batch_size, "mask_ratio": args.mask_ratio, "threads": args.threads,
                    "warmup": args.warmup, "steps": args.steps}  # fmt: skip
            try:
                child = run_child([__file__, "--case", json.dumps(case)], timeout=args.timeout)
            except BenchmarkError as error:
                errors[(encoder, objective)] = str(error).splitlines()[-1]
                print(f"objectives {encoder} {objective}: failed: {error}", file=sys.stderr, flush=True)
                continue
            results[(encoder, objective)].append({**child.report, "peak_rss_mib": child.peak_rss_mib})
            print(
                f"objectives round {round_index + 1} {encoder} {objective}: {child.report['seconds']} "
                f"s/step, peak RSS {child.peak_rss_mib:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    num_tokens = _num_tokens(image_size)
    visible = num_tokens - round(args.mask_ratio * num_tokens)
    # Per volume: 2 global crops of N tokens and 8 local crops of N / 8 for DINO's student.
    multicrop = 2 * num_tokens + 8 * (num_tokens // 8)
    seen = {REFERENCE: num_tokens, "mae": visible, "multicrop_encoder": multicrop, "dino_student": multicrop,
            "dino": multicrop}  # fmt: skip
    table_rows, teacher_lines = [], []
    for encoder in encoders:
        summary = {}
        for objective in rows_wanted:
            runs = results[(encoder, objective)]
            if runs:
                summary[objective] = {
                    "seconds": median([median(r["seconds"]) for r in runs]),
                    "rss": median([r["peak_rss_mib"] for r in runs]),
                    "above": median([r["peak_rss_mib"] - r["baseline_rss_mib"] for r in runs]),
                    "gflop": runs[0]["flops"] / 1e9,
                    "saved": runs[0]["saved_mib"],
                }
        ref = summary.get(REFERENCE, dict.fromkeys(("seconds", "above", "gflop", "saved"), float("nan")))
        if "dino" in summary and "dino_student" in summary:
            with_teacher, student = summary["dino"], summary["dino_student"]
            time_added = with_teacher["seconds"] / student["seconds"] - 1
            memory_added = with_teacher["above"] / student["above"] - 1
            teacher_lines.append(
                f"{encoder}: DINO's teacher forward adds {time_added:+.0%} time and {memory_added:+.0%} "
                "peak memory above built to the student's step."
            )
        for objective in rows_wanted:
            runs = results[(encoder, objective)]
            if not runs:
                failed = f"failed: {errors.get((encoder, objective), '?')}"
                table_rows.append((encoder, objective, "", "", failed, *[""] * 10))
                continue
            s = summary[objective]
            table_rows.append(
                (
                    encoder,
                    objective,
                    seen.get(objective, ""),
                    f"{runs[0]['params_m']:.1f}",
                    f"{1000 * s['seconds']:.3g}",
                    ", ".join(f"{1000 * median(r['seconds']):.3g}" for r in runs),
                    f"{batch_size / s['seconds']:.2f}",
                    f"{s['gflop']:.1f}",
                    f"{s['saved']:,.1f}",
                    f"{s['rss']:,.0f}",
                    f"{s['above']:,.0f}",
                    _ratio(s["seconds"], ref["seconds"]),
                    _ratio(s["saved"], ref["saved"]),
                    _ratio(s["above"], ref["above"]),
                    _ratio(s["gflop"], ref["gflop"]),
                )
            )
    table = markdown_table(
        ("encoder", "step", "tokens in encoder", "params (M)", "ms/step (median)", "per round", "samples/s",
         "GFLOP/step", "activations (MiB)", "peak RSS (MiB)", "peak above built (MiB)", "time vs encoder",
         "activations vs encoder", "peak above built vs encoder", "FLOPs vs encoder"),
        table_rows,
        (False, False, *[True] * 13),
    )  # fmt: skip
    notes = (
        f"Input [{batch_size}, 1, {', '.join(map(str, image_size))}], patch {PATCH}, {num_tokens} patch "
        f"tokens per volume (+1 cls); MAE masks {args.mask_ratio:.0%} ({num_tokens - visible} tokens), "
        f"default decoder of pretrain.objectives.mae. fp32, {args.threads} torch threads, forward + "
        f"backward without optimizer, {args.warmup} warm-up + 1 FLOP-counted + {args.steps} timed step(s) "
        f"per process, {args.rounds} round(s). Activations: bytes autograd saves for backward in one step "
        "(each storage once, weights and batch excluded). Peak above built: the process's peak RSS minus "
        "its peak before the first step (activations, gradients, allocator slack). FLOPs: torch's "
        "FlopCounterMode count of one step (matmuls and attention).\n\n"
        f"{machine_line()}"
    )
    teacher = "\n".join(teacher_lines)
    return f"{table}\n\n{teacher}\n\n{notes}" if teacher else f"{table}\n\n{notes}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="vit3d_tiny at 32x64x64, 1 round: a smoke run")
    parser.add_argument("--encoders", nargs="+", metavar="NAME", help="default vit3d_tiny vit3d_small")
    parser.add_argument("--objectives", nargs="+", choices=list(STEPS), metavar="NAME",
                        help=f"rows besides the encoder reference ({', '.join(STEPS)})")  # fmt: skip
    parser.add_argument("--mask-ratio", type=float, default=0.75, help="MAE's masked share (default 0.75)")
    parser.add_argument("--batch-size", type=int, default=None, help="volumes per step (default 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 3, quick 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process (default 1)")
    parser.add_argument(
        "--steps", type=int, default=None, help="timed steps per process (default 3, quick 1)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every child (default 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds one child may run")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case in this process
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.steps is None:
        args.steps = 1 if args.quick else 3
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
