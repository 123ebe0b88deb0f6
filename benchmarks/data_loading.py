"""Data-loading throughput: fm3d's prepared cache vs VoCo/Merlin's on-the-fly MONAI pipeline.

The real TotalSegmentator CT (../shared/data) is listed N times in a manifest and prepared
with `fm3d prepare` at VoCo's 1.5 mm isotropic spacing. Then one process with one torch
thread (what a DataLoader worker gets) produces VoCo-v2 training samples (9 bases + 2
random crops of 64^3 and their overlap labels, augmented, batches of 2) three ways:

  (a) fm3d: `CTDataset` over the prepared cache (memmap, crop before copy) + collate;
  (b) MONAI on the fly, as VoCo-v2's `get_abdomen_trans_without_label` + `VoCoAugmentation`
      and Merlin's loaders do: LoadImaged -> EnsureChannelFirstd -> Orientationd(RAS) ->
      Spacingd(1.5 mm) -> ScaleIntensityRanged -> CropForegroundd -> SpatialPadd ->
      RandSpatialCropd(192x192x64) -> per-crop SpatialCropd + RandFlipd x3 + RandRotate90d +
      RandShiftIntensityd, stacked in fm3d's [D, H, W] layout;
  (c) the floor: reading the same random int16 region from the memmap, nothing else.

Prints a markdown table (samples/s, CPU-seconds per sample, ratios) and writes it to
docs/benchmarks/data_loading.md. `--quick` runs a small version.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import torch

from fm3d.data.cache import PreparedCache
from fm3d.data.collate import collate_samples
from fm3d.data.crops import VOCO_V2
from fm3d.data.datasets import CTDataset, SampleSpec
from fm3d.data.prepare import prepare_cache
from fm3d.data.regions import region_start
from fm3d.data.views import VoCoView
from fm3d.spec import InputSpec

REPO = Path(__file__).resolve().parents[1]
CT = REPO.parent / "shared" / "data" / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
HU_WINDOW = (-175.0, 250.0)  # VoCo's a_min / a_max
SPACING = (1.5, 1.5, 1.5)
BATCH = 2


def _monai_pipeline(seed: int) -> Callable[[dict], dict]:
    from monai import transforms as T

    g = VOCO_V2
    region_xyz = (g.region_size[2], g.region_size[1], g.region_size[0])  # (192, 192, 64)
    b = g.base_size
    load = T.Compose(
        [
            T.LoadImaged(keys=["image"]),
            T.EnsureChannelFirstd(keys=["image"]),
            T.Orientationd(keys=["image"], axcodes="RAS"),
            T.Spacingd(keys=["image"], pixdim=SPACING, mode="bilinear"),
            T.ScaleIntensityRanged(
                keys=["image"], a_min=HU_WINDOW[0], a_max=HU_WINDOW[1], b_min=0.0, b_max=1.0, clip=True
            ),
            T.CropForegroundd(keys=["image"], source_key="image"),
            T.SpatialPadd(keys=["image"], spatial_size=region_xyz, mode="constant"),
            T.RandSpatialCropd(keys=["image"], roi_size=region_xyz, random_size=False),
        ]
    )  # fmt: skip
    load.set_random_state(seed)

    def augment() -> T.Compose:
        chain = T.Compose(
            [
                T.RandFlipd(keys=["image"], prob=0.2, spatial_axis=0),
                T.RandFlipd(keys=["image"], prob=0.2, spatial_axis=1),
                T.RandFlipd(keys=["image"], prob=0.2, spatial_axis=2),
                T.RandRotate90d(keys=["image"], prob=0.2, max_k=3),
                T.RandShiftIntensityd(keys=["image"], offsets=0.1, prob=0.5),
            ]
        )
        chain.set_random_state(int(rng.integers(2**31)))
        return chain

    rng = np.random.default_rng(seed)

    def sample(item: dict) -> dict:
        region = load(dict(item))
        bases, crops = [], []
        for k, (h0, w0) in enumerate(g.base_starts()):
            centre = [w0 + b // 2, h0 + b // 2, b // 2]  # (x, y, z), as VoCo's get_crop_transform
            crop = T.SpatialCropd(keys=["image"], roi_center=centre, roi_size=[b, b, b])(dict(region))
            bases.append(augment()(crop)["image"])
            del k
        centres = g.draw_random_centres(rng)
        for h, w in centres:
            crop = T.SpatialCropd(keys=["image"], roi_center=[w, h, b // 2], roi_size=[b, b, b])(dict(region))
            crops.append(augment()(crop)["image"])
        to_dhw = lambda xs: torch.stack([torch.as_tensor(x).permute(0, 3, 2, 1) for x in xs])  # noqa: E731
        return {
            "voco_bases": to_dhw(bases),
            "voco_crops": to_dhw(crops),
            "voco_labels": torch.from_numpy(g.overlap_labels(centres).astype(np.float32)),
        }

    return sample


def _measure(produce: Callable[[int], object], samples: int) -> tuple[float, float]:
    """(samples per second, CPU seconds per sample) over `samples` calls, after one warm-up."""
    produce(0)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(samples):
        produce(i)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return samples / wall, cpu / samples


def run(studies: int, samples: int, workdir: Path) -> str:
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    manifest = workdir / "manifest.parquet"
    pl.DataFrame(
        {"study_id": [f"ts{i:03d}" for i in range(studies)], "image_path": [str(CT)] * studies}
    ).write_parquet(manifest)
    spec = InputSpec(target_spacing_mm=SPACING, hu_window=(-1000.0, 1000.0))
    start = time.perf_counter()
    prepare_cache(manifest, workdir / "cache", spec=spec, workers=1, progress=False)
    prepare_s = time.perf_counter() - start
    cache = PreparedCache(workdir / "cache")
    shape = cache.shape(cache.study_ids[0])

    dataset = CTDataset(cache, None, SampleSpec(views=(VoCoView("v2"),), hu_window=HU_WINDOW), train=True)

    def fm3d_batch(i: int) -> dict:
        """What a DataLoader worker calls for one batch: CTDataset.__getitems__ + collate."""
        return collate_samples(dataset.__getitems__([(BATCH * i + j) % len(dataset) for j in range(BATCH)]))

    monai_sample = _monai_pipeline(seed=0)
    items = [{"image": str(CT)}] * studies

    def monai_batch(i: int) -> dict:
        return collate_samples([monai_sample(items[(BATCH * i + j) % studies]) for j in range(BATCH)])

    rng = np.random.default_rng(0)
    files = [cache.root / cache.row(s)["image_file"] for s in cache.study_ids]

    def bare_batch(i: int) -> list[np.ndarray]:
        out = []
        for j in range(BATCH):
            volume = np.load(files[(BATCH * i + j) % len(files)], mmap_mode="r")
            d0, h0, w0 = (max(s, 0) for s in region_start(volume.shape, VOCO_V2.region_size, rng))
            d, h, w = VOCO_V2.region_size
            out.append(np.array(volume[d0 : d0 + d, h0 : h0 + h, w0 : w0 + w]))
        return out

    batches = max(samples // BATCH, 1)
    results = {}
    for name, produce, count in [
        ("(a) fm3d prepared cache, CTDataset", fm3d_batch, batches),
        ("(b) MONAI on the fly (VoCo/Merlin)", monai_batch, max(batches // 8, 2)),
        ("(c) bare int16 memmap region read", bare_batch, batches),
    ]:
        per_s, cpu = _measure(produce, count)
        results[name] = (per_s * BATCH, cpu / BATCH)
    a, b, c = (results[k] for k in results)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    cpu_name = next(
        (ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?"
    )
    lines = [
        "# Data loading: VoCo-v2 training samples",
        "",
        f"Machine: {cpu_name}, {torch.get_num_threads()} torch thread, {platform.system()} "
        f"{platform.machine()}, Python {platform.python_version()}, torch {torch.__version__}.",
        f"Data: the TotalSegmentator example CT listed {studies} times, prepared by `fm3d prepare` at 1.5 mm "
        f"isotropic to {shape} (D, H, W) voxels in {prepare_s:.1f} s ({studies / prepare_s:.1f} studies/s, "
        "1 worker). Each sample: 9 base + 2 random 64^3 crops of a (64, 192, 192) region, VoCo-v2 "
        f"augmentation, HU window {HU_WINDOW}; batches of {BATCH}.",
        "",
        "| pipeline | samples/s | CPU-s per sample | (a) speed-up, wall | (a) speed-up, CPU |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, (per_s, cpu) in results.items():
        lines.append(f"| {name} | {per_s:.1f} | {cpu:.4f} | {a[0] / per_s:.2f}x | {cpu / a[1]:.2f}x |")
    lines += [
        "",
        f"(a) vs (b): {a[0] / b[0]:.0f}x the samples/s, {b[1] / a[1]:.0f}x less CPU per sample "
        "(target >= 50x).",
        f"(a) vs (c): {c[0] / a[0]:.1f}x slower by wall clock, {a[1] / c[1]:.1f}x the CPU per sample "
        "(target within 3x).",
        "",
        "Reproduce: `python benchmarks/data_loading.py` (`--quick` for a small run).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 studies, 16 samples")
    parser.add_argument("--studies", type=int, default=32)
    parser.add_argument("--samples", type=int, default=64, help="samples timed for (a) and (c); (b) gets 1/8")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "data_loading.md")
    args = parser.parse_args(argv)
    if not CT.is_file():
        parser.error(f"{CT} is absent: this benchmark needs ../shared/data (see its README)")
    studies, samples = (8, 16) if args.quick else (args.studies, args.samples)
    with tempfile.TemporaryDirectory(prefix="fm3d-data-loading-") as tmp:
        table = run(studies, samples, Path(tmp))
    print(table)
    if not args.quick:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
