"""Per-sample cost of the multi-crop view: cropping alone, the default augmentation, each transform alone.

One sample is what `conf/pretrain/dino.yaml`'s view cuts by default (2 global 96^3 and 8 local
48^3 crops, iBOT masks) from a prepared CT, read through `CTDataset` as training reads it, with
one torch and one SimpleITK thread (a DataLoader worker's share). Rows:

  crop + resize          no augmentation at all
  + fm3d flips/turns     fm3d's own flips, quarter turns and intensity shift (no TorchIO)
  defaults               `MultiCropAugment()`: what a run gets
  <transform> on every crop   one transform at probability 1, the others off
  TorchIO RandomBiasField     TorchIO's own bias field on the same ten crops, timed on its own:
                              what fm3d's torch `bias_field` replaced (the same field, tested)

The input is the TotalSegmentator CT of ../shared/data prepared at 1.5 mm (the demo
generator's first volume when that folder is missing: the table says which).

    python benchmarks/multicrop_view.py               # 30 samples per row (~1 min)
    python benchmarks/multicrop_view.py --quick       # 3 samples per row, 48^3 / 24^3 crops
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

from _common import machine_line, markdown_table, median

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"


def prepared_cache(root: Path) -> tuple[Path, str]:
    """A one-study cache at 1.5 mm of the shared CT (or a demo volume), and what it holds."""
    import polars as pl

    from fm3d.data.prepare import prepare_cache
    from fm3d.spec import InputSpec

    if SHARED_CT.is_file():
        image, source = SHARED_CT, "TotalSegmentator example CT (../shared/data)"
    else:
        from fm3d.cli import main as fm3d_main

        fm3d_main(["demo-data", "--out", str(root / "demo"), "--studies", "1", "--seed", "0"])
        image = Path(pl.read_parquet(root / "demo" / "manifest.parquet")["image_path"][0])
        source = "the demo generator's first volume (../shared/data missing)"
    pl.DataFrame([{"study_id": "ct", "patient_id": "p", "image_path": str(image)}]).write_csv(root / "m.csv")
    prepare_cache(root / "m.csv", root / "cache", spec=InputSpec((1.5, 1.5, 1.5)), progress=False)
    return root / "cache", source


def time_samples(cache: Path, view_settings: dict, augment, fm3d_augment, samples: int) -> float:
    """Median seconds to draw one training sample of the multicrop view with these settings."""
    from fm3d.data.datasets import CTDataset, SampleSpec
    from fm3d.data.multicrop import MultiCropView

    view = MultiCropView(**view_settings, augment=augment)
    dataset = CTDataset(cache, None, SampleSpec(views=(view,), augment=fm3d_augment), train=True)
    dataset[0]  # warm-up: the memory map, TorchIO's imports
    times = []
    for index in range(1, samples + 1):
        start = time.perf_counter()
        dataset[index]
        times.append(time.perf_counter() - start)
    return median(times)


def time_torchio_bias_field(view_settings: dict, samples: int) -> float:
    """Median seconds of TorchIO's RandomBiasField on one sample's crops (the step fm3d replaced)."""
    import numpy as np
    import torch
    import torchio as tio

    crops = [torch.rand(1, *view_settings["global_size"]) for _ in range(2)]
    crops += [torch.rand(1, *view_settings["local_size"]) for _ in range(8)]
    transform = tio.RandomBiasField(coefficients=0.2)
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for crop in crops:
            transform(tio.ScalarImage(tensor=crop, affine=np.eye(4)))
        times.append(time.perf_counter() - start)
    return median(times)


def run(args: argparse.Namespace) -> str:
    import SimpleITK as sitk
    import torch

    from fm3d.data.augment import AugmentConfig
    from fm3d.data.multicrop_augment import MultiCropAugment

    torch.set_num_threads(1)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    sizes = ([48] * 3, [24] * 3) if args.quick else ([96] * 3, [48] * 3)
    view = {
        "global_size": sizes[0],
        "local_size": sizes[1],
        "num_local": 8,
        "patch_size": 8 if args.quick else 16,
    }
    off = MultiCropAugment(affine_prob=0, bias_field_prob=0, gamma_prob=0, blur_probs=(0, 0, 0), noise_prob=0)
    no_fm3d = AugmentConfig(flip_prob=0, rot90_prob=0, shift_prob=0)
    alone = {
        "affine": {"affine_prob": 1.0},
        "torch bias field": {"bias_field_prob": 1.0},
        "gamma": {"gamma_prob": 1.0},
        "blur": {"blur_probs": (1.0, 1.0, 1.0)},
        "noise": {"noise_prob": 1.0},
    }
    cases = [("crop + resize", off, no_fm3d), ("+ fm3d flips/turns/shift", off, AugmentConfig()),
             ("defaults", MultiCropAugment(), AugmentConfig())]  # fmt: skip
    cases += [
        (f"{name} on every crop", dataclasses.replace(off, **kw), no_fm3d) for name, kw in alone.items()
    ]
    with tempfile.TemporaryDirectory() as tmp:
        cache, source = prepared_cache(Path(tmp))
        seconds = {name: time_samples(cache, view, aug, base, args.samples) for name, aug, base in cases}
    seconds["TorchIO RandomBiasField on every crop (alone)"] = time_torchio_bias_field(view, args.samples)
    reference = seconds["crop + resize"]
    rows = [(name, f"{1000 * s:.1f}", f"{s / reference:.2f}x") for name, s in seconds.items()]
    table = markdown_table(("setting", "ms / sample (median)", "vs crop + resize"), rows, (False, True, True))
    notes = (
        f"One sample: 2 global {'x'.join(map(str, sizes[0]))} + 8 local {'x'.join(map(str, sizes[1]))} "
        f"crops with iBOT masks, from {source} prepared at 1.5 mm; one torch and one SimpleITK thread; "
        f"median of {args.samples} samples per row.\n\n{machine_line()}"
    )
    return f"{table}\n\n{notes}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 samples per row, 48^3 / 24^3 crops")
    parser.add_argument("--samples", type=int, default=None, help="samples per row (default 30, quick 3)")
    args = parser.parse_args(argv)
    args.samples = args.samples or (3 if args.quick else 30)
    print(run(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
