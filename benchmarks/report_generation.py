"""Report-generation throughput: generated tokens/s of the report-generation task on this machine.

Builds `downstream.tasks.report_generation.ReportGenerationTask` around a vit3d_tiny encoder
(32 x 64 x 64 input, patch 8: 256 tokens, pooled to 32 image tokens by the M3D spatial-pool
projector) and randomly initialised GPT-2 / LLaMA LMs written offline by
`downstream.language.causal_lm.init_causal_lm` (byte-level BPE learned on demo reports), and times
`task.generate` — encoder, projector and HF `generate` from `inputs_embeds` — greedy and with
beam search. Every call is forced to produce exactly `--new-tokens` tokens (`min_new_tokens`),
so tokens/s = batch x new tokens / wall time (for beams: tokens of the returned reports, not of
every beam). One warm-up call, then the median of the repeats. Prints a markdown table and
writes it to docs/benchmarks/report_generation.md (--no-save to skip).

    python benchmarks/report_generation.py [--new-tokens 64] [--repeats 3] [--quick] [--no-save]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path = [p for p in sys.path if Path(p or ".").resolve() != HERE]
_spec = importlib.util.spec_from_file_location("_common", HERE / "_common.py")
_common = sys.modules["_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_common)

from downstream.heads.projector import ProjectorConfig  # noqa: E402
from downstream.language.causal_lm import init_causal_lm  # noqa: E402
from downstream.tasks.report_generation import ReportGenerationTask  # noqa: E402
from fm3d.demo.cohort import sample_cohort  # noqa: E402
from fm3d.demo.reports import write_report  # noqa: E402

OUT = HERE.parent / "docs" / "benchmarks" / "report_generation.md"
# (name, family, hidden size, layers, heads)
LMS = (
    ("gpt2 tiny", "gpt2", 64, 2, 2),
    ("gpt2 small", "gpt2", 256, 4, 4),
    ("llama tiny", "llama", 64, 2, 2),
    ("llama small", "llama", 256, 4, 4),
)


def demo_reports(n: int = 200) -> list[str]:
    """Demo-cohort report texts to learn the LM vocabulary from."""
    rng = np.random.default_rng(0)
    studies = [s for patient in sample_cohort(n, rng) for s in patient.studies][:n]
    return ["\n".join(write_report(study.findings, rng)) for study in studies]


def time_generation(
    task: ReportGenerationTask, batch: int, beams: int, new_tokens: int, repeats: int
) -> float:
    """Median tokens/s of `task.generate` on random HU volumes."""
    image = torch.rand(batch, 1, 32, 64, 64) * 2000 - 1000
    options = {"num_beams": beams, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
    task.generate(image, **options)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        task.generate(image, **options)
        times.append(time.perf_counter() - start)
    return batch * new_tokens / _common.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--quick", action="store_true", help="tiny LMs only, 1 repeat, nothing saved (smoke run)"
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)
    lms = LMS[::2] if args.quick else LMS
    repeats = 1 if args.quick else args.repeats
    texts = demo_reports()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        encoder = "vit3d_tiny"
        overrides = {"image_size": [32, 64, 64], "patch_size": [8, 8, 8]}
        for name, family, hidden, layers, heads in lms:
            path = init_causal_lm(
                Path(tmp) / name.replace(" ", "_"), texts, family=family, vocab_size=2000, hidden_size=hidden,
                num_layers=layers, num_heads=heads, max_length=512,
            )  # fmt: skip
            task = ReportGenerationTask(
                encoder,
                str(path),
                projector=ProjectorConfig(pool_grid=(2, 4, 4)),
                encoder_overrides=overrides,
            ).eval()
            params = sum(p.numel() for p in task.language_model.parameters()) / 1e6
            for batch, beams in ((1, 1), (4, 1), (1, 3)):
                rate = time_generation(task, batch, beams, args.new_tokens, repeats)
                decoding = "greedy" if beams == 1 else f"beam {beams}"
                rows.append([name, f"{params:.2f}", batch, decoding, args.new_tokens, f"{rate:.0f}"])
                print(rows[-1], file=sys.stderr)
    headers = ["LM", "LM params (M)", "batch", "decoding", "new tokens", "tokens/s"]
    table = _common.markdown_table(headers, rows, [False, True, True, False, True, True])
    text = (
        "# Report generation: generated tokens/s\n\n"
        "`python benchmarks/report_generation.py` — vit3d_tiny encoder (32x64x64 input, 256 tokens) -> "
        "M3D spatial-pool projector (32 image tokens, no prompt) -> random-weight "
        "causal LM, HF `generate` from `inputs_embeds`, exactly the listed new tokens per report; "
        "median of the repeats after a warm-up.\n\n" + table + "\n\n" + _common.machine_line() + "\n"
    )
    print(text)
    if not (args.no_save or args.quick):
        OUT.write_text(text)
        print(f"wrote {OUT}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
