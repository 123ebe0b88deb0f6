"""Streaming packs: pack time, and training samples/s read from tar shards against the `.npy` memory map.

Data: the demo cohort (`make demo`'s demo/cache, read only; a small generated cohort where it is
missing or with --quick) and the TotalSegmentator example CT (../shared/data) prepared at 1.5 mm
and listed N times. Each is packed into local shards (`fm3d stream pack`: pack time, MiB/s) and
into fsspec's in-memory filesystem (the floor of a pack's read cost: no file system under it).

Speed: samples/s of one training epoch's batches (batches of 4, one process, one torch thread: a
DataLoader worker's share) read three ways from the same cache: the memmap path (`CTDataset` over
the `PreparedCache`, in `EpochSampler`'s shuffled order), and `StreamingLoader` over the local
pack and over the in-memory pack, for two views:
  image 32 x 96 x 96   a cheap crop, so the read is most of a sample's cost;
  VoCo-v2              9 base + 2 random 64^3 crops of a (64, 192, 192) region.
The memory map crops only the slab a view reads; a pack reads each study whole (one ranged read)
and crops that. Paths are timed in alternating rounds (the median round per path).

    python benchmarks/streaming.py            # saves docs/benchmarks/streaming.md
    python benchmarks/streaming.py --quick    # small, prints only
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import polars as pl
from _common import machine_line, markdown_table, median

REPO = Path(__file__).resolve().parents[1]
SHARED_CT = REPO.parent / "shared" / "data" / "ct" / "totalsegmentator" / "example_ct_sm.nii.gz"
DEMO_CACHE = REPO / "demo" / "cache"
VOCO_HU_WINDOW = (-175.0, 250.0)
BATCH = 4
PATHS = (".npy memmap", "pack, local files", "pack, memory://")


def _demo_cohort(root: Path, quick: bool) -> tuple[Path, str]:
    if DEMO_CACHE.is_dir() and not quick:
        return DEMO_CACHE, f"demo/cache ({len(pl.read_parquet(DEMO_CACHE / 'index.parquet'))} studies)"
    from fm3d.data.prepare import prepare_cache
    from fm3d.demo import generate_demo_cohort

    studies = 8 if quick else 64
    manifest = generate_demo_cohort(root / "cohort", num_studies=studies, seed=0, progress=False)
    prepare_cache(manifest, root / "cohort-cache", progress=False)
    return root / "cohort-cache", f"a generated demo cohort ({studies} studies)"


def _real_ct(root: Path, copies: int) -> tuple[Path, str]:
    from fm3d.data.prepare import prepare_cache
    from fm3d.spec import InputSpec

    manifest = root / "ct-manifest.csv"
    pl.DataFrame(
        {"study_id": [f"ct{i:03d}" for i in range(copies)], "image_path": [str(SHARED_CT)] * copies}
    ).write_csv(manifest)
    prepare_cache(manifest, root / "ct-cache", spec=InputSpec((1.5, 1.5, 1.5)), progress=False)
    return root / "ct-cache", f"the TotalSegmentator CT at 1.5 mm x {copies}"


def _views(name: str):
    from fm3d.data.datasets import SampleSpec
    from fm3d.data.views import build_views

    if name == "VoCo-v2":
        return SampleSpec(views=build_views({"voco": {"geometry": "v2"}}), hu_window=VOCO_HU_WINDOW)
    return SampleSpec(views=build_views({"image": {"size": [32, 96, 96]}}))


def _memmap_batches(cache: Path, spec, epoch: int):
    from torch.utils.data import DataLoader

    from fm3d.data.base import EpochSampler
    from fm3d.data.collate import collate_samples
    from fm3d.data.datasets import CTDataset

    dataset = CTDataset(cache, spec=spec, train=True)
    sampler = EpochSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0, epoch_in_index=True)
    sampler.set_epoch(epoch)
    return iter(DataLoader(dataset, batch_size=BATCH, sampler=sampler, collate_fn=collate_samples))


def _stream_batches(url: str, spec, epoch: int):
    from fm3d.data.datasets import CTDataset
    from fm3d.data.streaming import PackedCache
    from fm3d.data.streaming_loader import ShardStream, StreamingLoader

    loader = StreamingLoader(ShardStream(CTDataset(PackedCache(url), spec=spec, train=True), BATCH))
    loader.set_epoch(epoch)
    return iter(loader)


def speed_rows(name: str, cache: Path, urls: dict[str, str], samples: int, rounds: int) -> list[tuple]:
    """Rows (data, view, path, samples/s, x memmap) from alternating rounds of `samples` samples each."""
    import torch

    rows = []
    for view in ("image 32 x 96 x 96", "VoCo-v2"):
        spec = _views(view)
        makers = {
            PATHS[0]: lambda epoch, spec=spec: _memmap_batches(cache, spec, epoch),
            PATHS[1]: lambda epoch, spec=spec: _stream_batches(urls["local"], spec, epoch),
            PATHS[2]: lambda epoch, spec=spec: _stream_batches(urls["memory"], spec, epoch),
        }
        rates: dict[str, list[float]] = {path: [] for path in makers}
        for r in range(rounds):
            for path, make in makers.items():
                torch.manual_seed(r)
                next(make(rounds + r))  # warm-up of another epoch: imports, page cache
                count, start = 0, time.perf_counter()
                for batch in itertools.islice(make(r), max(1, samples // BATCH)):
                    count += len(batch["study_id"])
                rates[path].append(count / (time.perf_counter() - start))
        reference = median(rates[PATHS[0]])
        for path in PATHS:
            rate = median(rates[path])
            rows.append((name, view, path, f"{rate:.1f}", f"{rate / reference:.2f}x"))
    return rows


def run(args: argparse.Namespace) -> str:
    import blosc2
    import torch

    from fm3d.data.streaming import pack_cache

    torch.set_num_threads(1)
    blosc2.set_nthreads(1)
    pack_rows, speeds = [], []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = [_demo_cohort(root, args.quick)]
        if SHARED_CT.is_file():
            data.append(_real_ct(root, args.copies))
        for i, (cache, described) in enumerate(data):
            studies = len(pl.read_parquet(cache / "index.parquet").filter(pl.col("status") == "ok"))
            shards = max(1, min(args.shards, studies // 2))
            urls = {"local": str(root / f"pack-{i}"), "memory": f"memory://benchmark-streaming/pack-{i}"}
            for where, url in urls.items():
                stats = pack_cache(cache, url, shards, progress=False)
                mib = stats.bytes / 2**20
                pack_rows.append((described, where, str(shards), f"{mib:.1f}", f"{stats.seconds:.2f}",
                                  f"{mib / stats.seconds:.0f}"))  # fmt: skip
            samples = min(args.samples, studies)
            speeds += speed_rows(described, cache, urls, samples, args.rounds)
    pack_table = markdown_table(
        ("data", "to", "shards", "MiB", "pack s", "MiB/s"), pack_rows, (False, False, True, True, True, True)
    )
    speed_table = markdown_table(
        ("data", "view", "path", "samples/s", "x memmap"), speeds, (False, False, False, True, True)
    )
    return (
        f"Pack time (`fm3d stream pack`, arrays copied as stored, plus each study's index row):\n\n"
        f"{pack_table}\n\nTraining read speed: batches of {BATCH}, one process and one torch thread, "
        f"median of {args.rounds} alternating rounds of up to {args.samples} samples per path.\n\n"
        f"{speed_table}\n\n{machine_line()}"
    )


FINDINGS = """Produced by `python benchmarks/streaming.py` (`--quick` for a smoke run). Both caches sit in
the page cache, so these figures compare CPU cost, not storage: the memory map's best case. A pack
reads each study whole and a view then crops it, where the memory map copies only the slab it
crops; the ratio therefore tracks how much of a study a view reads. Over object storage the
reads are network transfers of whole studies (one ranged GET each), which this machine cannot
measure (no network)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small: 8 studies, 1 round; prints only")
    parser.add_argument("--copies", type=int, default=None, help="copies of the real CT (default 16)")
    parser.add_argument("--shards", type=int, default=None, help="shards per pack (default 16)")
    parser.add_argument("--samples", type=int, default=None, help="samples per round and path (default 64)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating rounds (default 5)")
    args = parser.parse_args(argv)
    args.copies = args.copies or (4 if args.quick else 16)
    args.shards = args.shards or (2 if args.quick else 16)
    args.samples = args.samples or (8 if args.quick else 64)
    args.rounds = args.rounds or (1 if args.quick else 5)
    report = run(args)
    print(report)
    if not args.quick:
        doc = REPO / "docs" / "benchmarks" / "streaming.md"
        doc.write_text(f"# Streaming packs against the .npy memory map\n\n{FINDINGS}\n\n{report}\n")
        print(f"saved {doc}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
