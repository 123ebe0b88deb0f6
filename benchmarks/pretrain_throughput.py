"""Training throughput (samples/s) and peak memory of the PretrainModule on CPU, per objective.

Each case (encoder x objective set) runs in its own process, so its peak resident memory
(`ru_maxrss`) is its own, and the cases run round-robin for `--rounds` rounds (samples/s is
the median over rounds), so load that comes and goes hits every case alike. A step is what
`training_step` does plus the optimizer: encode every view once, the weighted objective
losses, backward, AdamW step, EMA update. "encoder, all four's views" is the reference for
the objectives' cost: the same encoder work as "all four" (global view, VoCo bases and crops,
encoded as the module encodes them) with a trivial loss instead of the objectives. Batches
follow the data contract with the demo geometry: the global view is 32 x 64 x 64 voxels and
VoCo uses the "tiny" preset (4 base + 2 random 32^3 crops per study); the CLIP text tower is a
from-scratch 2-layer BERT (hidden 64), as in the demo.

    python benchmarks/pretrain_throughput.py            # tiny and small: 2 rounds, >= 6 steps and 5 s
    python benchmarks/pretrain_throughput.py --quick    # tiny only, 1 round of 1 + 2 steps (a smoke run)

Prints a markdown table and, unless --quick, writes docs/benchmarks/pretrain_throughput.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# Run as a script, this folder is on sys.path: the shared helpers import without a package.
from _common import machine_line

REPO = Path(__file__).resolve().parents[1]
OBJECTIVE_SETS = {
    "encoder alone": (),
    "voco": ("voco",),
    "clip": ("clip",),
    "phenotype": ("phenotype",),
    "tte": ("tte",),
    "all four": ("voco", "clip", "phenotype", "tte"),
    "encoder, all four's views": ("voco", "clip", "phenotype", "tte"),
}
# Cases that time the encoder on their objectives' views with a trivial loss (no objectives).
ENCODER_ONLY = {"encoder alone", "encoder, all four's views"}
IMAGE = (32, 64, 64)
CROP = (32, 32, 32)
BASES, CROPS, PHENOTYPES, TASKS = 4, 2, 10, 8
REPORTS = [
    "small nodule in the right upper lobe",
    "no acute findings in the chest or abdomen",
    "hepatic steatosis and a simple renal cyst",
    "moderate pleural effusion on the left with atelectasis",
]


def make_batch(batch_size: int, generator: torch.Generator) -> dict:
    """A contract batch (ARCHITECTURE.md) with random volumes and labels."""
    overlap = torch.rand(batch_size, CROPS, BASES, generator=generator)
    return {
        "image": torch.randn(batch_size, 1, *IMAGE, generator=generator),
        "study_id": [f"s{i}" for i in range(batch_size)],
        "voco_bases": torch.randn(batch_size, BASES, 1, *CROP, generator=generator),
        "voco_crops": torch.randn(batch_size, CROPS, 1, *CROP, generator=generator),
        "voco_labels": overlap / overlap.sum(-1, keepdim=True),
        "report": [REPORTS[i % len(REPORTS)] for i in range(batch_size)],
        "has_report": torch.ones(batch_size, dtype=torch.bool),
        "phenotype": (torch.rand(batch_size, PHENOTYPES, generator=generator) > 0.7).float(),
        "has_ehr": torch.ones(batch_size, dtype=torch.bool),
        "tte_time": torch.rand(batch_size, TASKS, generator=generator) * 1500,
        "tte_event": torch.rand(batch_size, TASKS, generator=generator) > 0.6,
    }


def objective_factories(names: tuple[str, ...], text_model: Path) -> dict:
    from pretrain.objectives.clip import ClipObjective
    from pretrain.objectives.phenotype import PhenotypeObjective
    from pretrain.objectives.tte import TimeToEventObjective
    from pretrain.objectives.voco import VoCoObjective

    available = {
        "voco": functools.partial(VoCoObjective, version="v2"),
        "clip": functools.partial(ClipObjective, text_model=str(text_model), proj_dim=64, max_length=64),
        "phenotype": functools.partial(PhenotypeObjective, num_phenotypes=PHENOTYPES),
        "tte": functools.partial(TimeToEventObjective, num_tasks=TASKS, num_bins=6, rank=16),
    }
    return {name: available[name] for name in names}


def run_case(
    encoder: str,
    objectives: tuple[str, ...],
    encoder_only: bool,
    batch_size: int,
    warmup: int,
    steps: int,
    min_seconds: float,
    text_model: Path,
) -> dict:
    """Time training steps after `warmup` in this process; returns samples/s and peak RSS."""
    import fm3d
    from pretrain.module import PretrainModule
    from pretrain.optim import OptimizerSettings, build_optimizer

    torch.manual_seed(0)
    overrides = {"image_size": list(IMAGE), "patch_size": [16, 16, 16]}
    if not objectives:
        module = fm3d.create_encoder(encoder, **overrides)

        def loss_of(batch: dict) -> torch.Tensor:
            return module(batch["image"]).pooled.float().pow(2).mean()

    elif encoder_only:
        module = PretrainModule(encoder, overrides, objective_factories(objectives, text_model))

        def loss_of(batch: dict) -> torch.Tensor:
            return sum(out.pooled.float().pow(2).mean() for out in module.encode(batch).values())

    else:
        module = PretrainModule(encoder, overrides, objective_factories(objectives, text_model))

        def loss_of(batch: dict) -> torch.Tensor:
            encoded = module.encode(batch)
            return sum(module.loss_weights[n] * o(batch, encoded)[0] for n, o in module.objectives.items())

    def after_step() -> None:
        if objectives and not encoder_only:
            for objective in module.objectives.values():
                objective.on_train_batch_end()

    module.train()
    optimizer, _ = build_optimizer(module, OptimizerSettings(), max_steps=warmup + steps)
    generator = torch.Generator().manual_seed(0)
    batches = [make_batch(batch_size, generator) for _ in range(2)]

    def train_step(step: int) -> None:
        loss = loss_of(batches[step % 2])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        after_step()

    for step in range(warmup):
        train_step(step)
    # At least `steps` timed steps and at least `min_seconds`: a tiny model's step takes
    # milliseconds, and a handful of them measures scheduler jitter, not the model.
    start, timed = time.perf_counter(), 0
    while timed < steps or time.perf_counter() - start < min_seconds:
        train_step(warmup + timed)
        timed += 1
    elapsed = time.perf_counter() - start
    return {
        "samples_per_s": timed * batch_size / elapsed,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny only, 1 warm-up + 2 timed steps")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="round-robin passes over the cases")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="timed seconds per case, at least")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args()
    if args.case:
        case = json.loads(args.case)
        result = run_case(
            case["encoder"],
            tuple(case["objectives"]),
            case["encoder_only"],
            case["batch_size"],
            case["warmup"],
            case["steps"],
            case["min_seconds"],
            Path(case["text_model"]),
        )
        print(json.dumps(result))
        return

    from tqdm import tqdm

    from fm3d.text import init_text_model

    encoders = ["vit3d_tiny"] if args.quick else ["vit3d_tiny", "vit3d_small"]
    warmup, steps = (1, 2) if args.quick else (2, 6)
    rounds = 1 if args.quick else args.rounds
    min_seconds = 0.0 if args.quick else args.min_seconds
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        text_model = init_text_model(
            Path(tmp) / "text",
            REPORTS * 8,
            vocab_size=300,
            hidden_size=64,
            num_layers=2,
            num_heads=2,
            max_length=128,
        )
        cases = [(e, label, names) for e in encoders for label, names in OBJECTIVE_SETS.items()]
        runs = [case for _ in range(rounds) for case in cases]
        for encoder, label, names in tqdm(runs, desc="cases", unit="case"):
            spec = {
                "encoder": encoder,
                "objectives": list(names),
                "encoder_only": label in ENCODER_ONLY,
                "batch_size": args.batch_size,
                "warmup": warmup,
                "steps": steps,
                "min_seconds": min_seconds,
                "text_model": str(text_model),
            }
            done = subprocess.run(
                [sys.executable, __file__, "--case", json.dumps(spec)],
                capture_output=True,
                text=True,
                cwd=REPO,
            )
            if done.returncode != 0:
                raise RuntimeError(f"case {encoder} / {label} failed:\n{done.stderr[-3000:]}")
            results.setdefault((encoder, label), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    table = [
        "| encoder | objectives | batch | params (M) | samples/s (median) | samples/s per round | "
        "time vs encoder on the same views | peak RSS (MiB) |",
        "|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for encoder in encoders:
        median = {label: statistics.median(r["samples_per_s"] for r in results[(encoder, label)])
                  for label in OBJECTIVE_SETS}  # fmt: skip
        reference = median["encoder, all four's views"]
        for label in OBJECTIVE_SETS:
            runs_of_case = results[(encoder, label)]
            per_round = ", ".join(f"{r['samples_per_s']:.2f}" for r in runs_of_case)
            relative = f"{reference / median[label]:.2f}x" if label == "all four" else ""
            table.append(
                f"| {encoder} | {label} | {args.batch_size} | {runs_of_case[0]['params_m']:.1f} | "
                f"{median[label]:.2f} | {per_round} | "
                f"{relative} | {max(r['peak_rss_mib'] for r in runs_of_case):.0f} |"
            )
    text = "\n".join(table)
    print(text)
    if not args.quick:
        out = REPO / "docs" / "benchmarks" / "pretrain_throughput.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            "# Pretraining throughput on CPU\n\n"
            "`python benchmarks/pretrain_throughput.py` (training steps: encode, losses, backward, AdamW, "
            f"EMA; global view {IMAGE[0]}x{IMAGE[1]}x{IMAGE[2]}, VoCo tiny crops, {warmup} warm-up steps, "
            f"then at least {steps} timed steps and {min_seconds:g} s; each case in its own process, "
            f"{rounds} round-robin rounds). 'time vs encoder on the same views' is the step time of all "
            "four objectives over that of the encoder on the views they need (global view, VoCo bases "
            "and crops) with a trivial loss: the objectives' cost.\n\n"
            f"{machine_line()}\n\n{text}\n"
        )
        print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
