"""Sliding-window segmentation inference throughput on CPU: volumes/s for tiny/small encoders.

Builds the segmentation task (`downstream.tasks.segmentation.SegmentationTask`: encoder +
UNETR / SwinUNETR decoder) for each encoder and times `task.infer` — MONAI's
`sliding_window_inference` with gaussian blending — over a whole CT-sized volume, as
`fm3d evaluate` and `fm3d finetune predict` run it. One warm-up call, then the median of the
timed repeats. Prints a markdown table and writes it to docs/benchmarks/segmentation_inference.md.

    python benchmarks/segmentation_inference.py           # 96 x 192 x 192 volume (Merlin's 3 x 1.5 x 1.5 mm
                                              # chest-abdomen field of view), ROI 64^3, 3 repeats
    python benchmarks/segmentation_inference.py --quick   # 48 x 96 x 96 volume, ROI 32 x 64 x 64, 1 repeat
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import _common
import torch

from downstream.tasks.segmentation import SegmentationTask

REPO = _common.REPO
OUT = REPO / "docs" / "benchmarks" / "segmentation_inference.md"
ENCODERS = ("vit3d_tiny", "vit3d_small", "swin3d_tiny")


def time_inference(encoder: str, volume: tuple[int, int, int], roi: tuple[int, int, int], overlap: float,
                   repeats: int) -> dict[str, float]:  # fmt: skip
    """Seconds per whole-volume sliding-window inference (median of `repeats`) and the model size."""
    torch.manual_seed(0)
    classes = ["organ_1", "organ_2", "organ_3", "organ_4"]
    task = SegmentationTask(encoder, classes, image_size=roi, overlap=overlap, sw_batch_size=2).eval()
    image = torch.rand(1, 1, *volume) * 2000 - 1000  # HU
    times = []
    with torch.inference_mode():
        task.infer(image)  # warm-up: allocator, MONAI's gaussian importance map
        for _ in range(repeats):
            start = time.perf_counter()
            task.infer(image)
            times.append(time.perf_counter() - start)
    params = sum(p.numel() for p in task.parameters()) / 1e6
    return {"seconds": _common.median(times), "params_m": params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small volume and one repeat (a smoke run)")
    parser.add_argument(
        "--encoders", nargs="+", default=list(ENCODERS), help=f"default: {' '.join(ENCODERS)}"
    )
    parser.add_argument("--overlap", type=float, default=0.25, help="sliding-window overlap (default 0.25)")
    parser.add_argument(
        "--out", type=Path, default=OUT, help=f"markdown output (default {OUT.relative_to(REPO)})"
    )
    args = parser.parse_args(argv)
    volume, roi, repeats = (
        ((48, 96, 96), (32, 64, 64), 1) if args.quick else ((96, 192, 192), (64, 64, 64), 3)
    )
    rows = []
    for encoder in args.encoders:
        result = time_inference(encoder, volume, roi, args.overlap, repeats)
        rows.append([
            encoder, f"{result['params_m']:.1f}", "x".join(map(str, volume)), "x".join(map(str, roi)),
            args.overlap, f"{result['seconds']:.2f}", f"{1.0 / result['seconds']:.3f}",
        ])  # fmt: skip
        print(f"{encoder}: {result['seconds']:.2f} s per volume", file=sys.stderr)
    headers = [
        "encoder + decoder",
        "params (M)",
        "volume D x H x W",
        "ROI",
        "overlap",
        "s / volume",
        "volumes / s",
    ]
    table = _common.markdown_table(headers, rows, numeric=[False, True, False, False, True, True, True])
    text = (
        "# Downstream benchmark: sliding-window segmentation inference on CPU\n\n"
        f"`python benchmarks/segmentation_inference.py{' --quick' if args.quick else ''}` — whole-volume "
        "`SegmentationTask.infer` (MONAI sliding_window_inference, gaussian blending, sw_batch_size 2, "
        f"4 organ classes), median of {repeats} after one warm-up.\n\n{table}\n\n{_common.machine_line()}\n"
    )
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
