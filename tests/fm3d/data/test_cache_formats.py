"""The compressed chunked cache format (.b2nd): the arrays and crops of .npy, chunk-local reads, convert."""

from __future__ import annotations

import json
import os
from pathlib import Path

import blosc2
import numpy as np
import polars as pl
import pytest
import torch

from fm3d.data.base import LoaderSettings
from fm3d.data.cache import PreparedCache
from fm3d.data.cache_formats import (
    CHUNK_SHAPE,
    CompressedVolume,
    array_intact,
    format_of,
    open_array,
    save_array,
)
from fm3d.data.convert import _convert_study, convert_cache
from fm3d.data.datamodule import CTDataModule
from fm3d.data.datasets import CTDataset, SampleSpec
from fm3d.data.errors import CacheError
from fm3d.data.multicrop import MultiCropView
from fm3d.data.prepare import prepare_cache
from fm3d.data.prepare_shards import SHARDS_DIR
from fm3d.data.regions import crop_or_pad, read_region
from fm3d.data.views import VoCoView
from fm3d.demo import generate_demo_cohort
from fm3d.sharding import Shard

# Array-dependent columns; every other index column must not change with the format.
FILE_COLUMNS = ["image_file", "label_file", "output_stat"]


@pytest.fixture
def manifest(shared_data: Path, tmp_path: Path) -> Path:
    """The real TotalSegmentator CT with its segmentation, once more without it, and a label-name map."""
    ts = shared_data / "ct" / "totalsegmentator"
    folder = tmp_path / "raw"
    folder.mkdir()
    (folder / "labels.json").write_text(json.dumps({"1": "spleen"}))
    path = folder / "manifest.csv"
    pl.DataFrame(
        {
            "study_id": ["ts", "ts_nolabel"],
            "image_path": [str(ts / "example_ct_sm.nii.gz")] * 2,
            "label_path": [str(ts / "example_seg.nii.gz"), None],
            "report": ["Liver normal.", None],
        }
    ).write_csv(path)
    return path


def _arrays(cache: Path) -> dict[str, np.ndarray]:
    """Every array of a cache by its name without suffix, read through the cache's own interface."""
    opened = PreparedCache(cache)
    arrays = {}
    for sid in opened.study_ids:
        arrays[f"studies/{sid}"] = np.asarray(opened.image(sid))
        label = opened.label(sid)
        if label is not None:
            arrays[f"labels/{sid}"] = np.asarray(label)
    return arrays


def _same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def _suffixes(cache: Path) -> set[str]:
    return {p.suffix for folder in ("studies", "labels") for p in (cache / folder).iterdir()}


def test_both_formats_give_bit_identical_arrays_crops_and_samples(manifest: Path, tmp_path: Path) -> None:
    for name, cache_format in (("npy", "npy"), ("b2nd", "blosc2")):
        prepare_cache(manifest, tmp_path / name, progress=False, cache_format=cache_format)
    assert _suffixes(tmp_path / "npy") == {".npy"} and _suffixes(tmp_path / "b2nd") == {".b2nd"}
    plain, packed = PreparedCache(tmp_path / "npy"), PreparedCache(tmp_path / "b2nd")
    a, b = (pl.read_parquet(c / "index.parquet").drop(FILE_COLUMNS) for c in (plain.root, packed.root))
    assert a.equals(b)  # shape, spacing, HU percentiles, record: the same study
    assert _same_arrays(_arrays(plain.root), _arrays(packed.root))

    image, volume = plain.image("ts"), packed.image("ts")
    assert isinstance(volume, CompressedVolume) and isinstance(image, np.memmap)
    assert (
        volume.shape == image.shape and volume.dtype == image.dtype == np.int16 and len(volume) == len(image)
    )
    assert np.array_equal(np.asarray(volume, dtype=np.float32), np.asarray(image, dtype=np.float32))
    rng = np.random.default_rng(0)
    for _ in range(20):  # boxes anywhere, crossing chunk borders and the volume's edges
        start = [int(rng.integers(-8, n)) for n in image.shape]
        size = [int(rng.integers(1, 70)) for _ in image.shape]
        assert np.array_equal(
            read_region(volume, start, size, (-175, 250)), read_region(image, start, size, (-175, 250))
        )
        assert np.array_equal(crop_or_pad(volume, start, size, -1024), crop_or_pad(image, start, size, -1024))
    label = packed.label("ts")
    assert isinstance(label, CompressedVolume) and np.array_equal(
        label[3:9, 40:90, 7:70], plain.label("ts")[3:9, 40:90, 7:70]
    )
    assert packed.label("ts_nolabel") is None

    # The training read path: VoCo-v2 and multi-crop samples are the same tensors from either cache.
    views = (VoCoView("v2"), MultiCropView((32, 32, 32), (16, 16, 16), num_local=2, patch_size=8))
    for train in (False, True):
        datasets = [
            CTDataset(c, None, SampleSpec(views=views, augment=None), train=train) for c in (plain, packed)
        ]
        for index in range(2):
            torch.manual_seed(index)
            expected = datasets[0][index]
            torch.manual_seed(index)
            got = datasets[1][index]
            assert expected.keys() == got.keys()
            for key, value in expected.items():
                assert torch.equal(got[key], value) if isinstance(value, torch.Tensor) else got[key] == value


def test_a_crop_decompresses_only_the_chunks_it_touches(tmp_path: Path) -> None:
    array = np.arange(64 * 96 * 96, dtype=np.int16).reshape(64, 96, 96)
    save_array(tmp_path / "x.b2nd", array)
    volume = open_array(tmp_path / "x.b2nd")
    stored = volume.array
    assert stored.chunks == CHUNK_SHAPE and stored.blocks == CHUNK_SHAPE  # one block per chunk
    grid = [n // c for n, c in zip(array.shape, CHUNK_SHAPE, strict=True)]  # (2, 3, 3) chunks
    items_per_chunk = int(np.prod(CHUNK_SHAPE))
    decompressed: list[int] = []

    # blosc2 calls a postfilter once per block it decompresses, with the block's first item in the array.
    @stored.schunk.postfilter(np.int16)
    def count(source: np.ndarray, output: np.ndarray, offset: int) -> None:
        output[:] = source
        decompressed.append(offset // items_per_chunk)

    box = (slice(5, 30), slice(40, 70), slice(0, 20))  # z chunk 0, y chunks 1 and 2, x chunk 0
    assert np.array_equal(volume[box], array[box])
    expected = {int(np.ravel_multi_index((0, cy, 0), grid)) for cy in (1, 2)}
    assert set(decompressed) == expected and len(decompressed) == 2
    decompressed.clear()
    assert np.array_equal(volume[40:41, 95:96, 95:96], array[40:41, 95:96, 95:96])
    assert decompressed == [int(np.ravel_multi_index((1, 2, 2), grid))]
    decompressed.clear()
    assert np.array_equal(np.asarray(volume), array) and sorted(decompressed) == list(
        range(int(np.prod(grid)))
    )


def test_convert_round_trips_and_prepare_skips_converted_studies(manifest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    prepare_cache(manifest, cache, progress=False)
    original = {p.relative_to(cache): p.read_bytes() for p in sorted(cache.glob("*/*.npy"))}
    arrays = _arrays(cache)
    assert len(original) == 3  # two images, one label map

    assert convert_cache(cache, "blosc2", progress=False) == {"converted": 2, "skipped": 0, "failed": 0}
    assert _suffixes(cache) == {".b2nd"} and _same_arrays(_arrays(cache), arrays)
    index = pl.read_parquet(cache / "index.parquet")
    assert index["image_file"].to_list() == ["studies/ts.b2nd", "studies/ts_nolabel.b2nd"]
    assert index["label_file"].to_list() == ["labels/ts.b2nd", None]
    assert index["report"].to_list() == ["Liver normal.", None]  # manifest columns kept, in order
    assert sum(p.stat().st_size for p in cache.glob("*/*.b2nd")) < 0.45 * sum(map(len, original.values()))

    rerun = prepare_cache(manifest, cache, progress=False)  # the default format: converted studies stay
    assert rerun == {"prepared": 0, "skipped": 2, "failed": 0} and _suffixes(cache) == {".b2nd"}
    assert convert_cache(cache, "blosc2", progress=False) == {"converted": 0, "skipped": 2, "failed": 0}

    copy = tmp_path / "copy"  # into a new folder: the source stays as it is
    assert convert_cache(cache, "npy", copy, progress=False)["converted"] == 2
    assert (
        _suffixes(cache) == {".b2nd"}
        and (copy / "labels.json").read_bytes() == (cache / "labels.json").read_bytes()
    )
    assert prepare_cache(manifest, copy, progress=False)["skipped"] == 2

    assert convert_cache(cache, "npy", progress=False)["converted"] == 2  # back in place: the same bytes
    assert {p.relative_to(cache): p.read_bytes() for p in sorted(cache.glob("*/*.npy"))} == original
    assert _suffixes(cache) == {".npy"}


def test_a_killed_conversion_resumes(manifest: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    prepare_cache(manifest, cache, progress=False)
    arrays = _arrays(cache)
    row = pl.read_parquet(cache / "index.parquet").row(0, named=True)
    # What a conversion killed after its first study leaves: that study journaled, the index untouched.
    _convert_study(row, cache, cache, "blosc2", in_place=True)
    (cache / "studies" / ".ts_nolabel.b2nd.tmp-1").write_bytes(b"half")  # and a temporary of the second
    assert pl.read_parquet(cache / "index.parquet")["image_file"][0] == "studies/ts.npy"
    assert convert_cache(cache, "blosc2", progress=False) == {"converted": 1, "skipped": 1, "failed": 0}
    assert _suffixes(cache) == {".b2nd"} and _same_arrays(_arrays(cache), arrays)
    assert not list((cache / "studies").glob(".*")) and not list((cache / ".journal").iterdir())


def test_a_damaged_b2nd_is_detected_and_prepared_again(manifest: Path, tmp_path: Path, prepare_main) -> None:
    cache = tmp_path / "cache"
    assert prepare_main("--manifest", manifest, "--out", cache, "--format", "blosc2").returncode == 0
    arrays = _arrays(cache)
    path = cache / "studies" / "ts.b2nd"
    shape = PreparedCache(cache).shape("ts")
    assert array_intact(path, shape) and not array_intact(path, (1, *shape[1:]))
    data = path.read_bytes()
    stat = path.stat()
    path.write_bytes(data[: len(data) // 2])
    assert not array_intact(path, shape)
    with pytest.raises(CacheError, match=r"ts\.b2nd: is not a readable \.b2nd file"):
        PreparedCache(cache).image("ts")
    # Overwritten with garbage of the same size and mtime: the fingerprint passes, the frame does not open.
    path.write_bytes(bytes(len(data)))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert not array_intact(path, shape)
    rerun = prepare_main("--manifest", manifest, "--out", cache, "--format", "blosc2")
    assert "1 prepared, 1 skipped (up to date), 0 failed" in rerun.stdout
    assert path.read_bytes() == data and _same_arrays(_arrays(cache), arrays)

    # A chunk damaged inside an intact frame is found when read, naming the file and what to do.
    flipped = bytearray(data)
    flipped[len(data) // 2 : len(data) // 2 + 4096] = bytes(4096)
    path.write_bytes(bytes(flipped))
    volume = PreparedCache(cache).image("ts")
    with pytest.raises(CacheError, match=r"ts\.b2nd: cannot be decompressed .* Delete it and re-run"):
        np.asarray(volume)


def test_prepare_format_flag_and_convert_cli(manifest: Path, tmp_path: Path, prepare_main) -> None:
    cache = tmp_path / "cache"
    ran = prepare_main("--manifest", manifest, "--out", cache, "--format", "blosc2")
    assert ran.returncode == 0 and _suffixes(cache) == {".b2nd"}
    ran = prepare_main("--convert", "npy", "--out", cache)
    assert ran.returncode == 0 and "2 studies converted to npy, 0 already npy, 0 failed" in ran.stdout
    ran = prepare_main("--convert", "blosc2", "--source", cache, "--out", tmp_path / "copy")
    assert ran.returncode == 0 and _suffixes(tmp_path / "copy") == {".b2nd"} and _suffixes(cache) == {".npy"}

    assert prepare_main("--out", cache).stderr == (
        "fm3d prepare: --manifest is required (only --convert works without one)\n"
    )
    missing = prepare_main("--convert", "blosc2", "--out", tmp_path / "nothing")
    assert missing.returncode == 2 and "nothing: has no index.parquet" in missing.stderr
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(SystemExit):  # argparse names the valid choices
        prepare_main("--convert", "zarr", "--out", cache)
    with pytest.raises(CacheError, match=r"'\.zarr', which is no prepared-cache format"):
        format_of("studies/x.zarr")


def test_shards_in_blosc2_merge_into_one_cache(manifest: Path, tmp_path: Path, prepare_main) -> None:
    owners = [[sid for sid in ("ts", "ts_nolabel") if Shard(i, 2).owns(sid)] for i in range(2)]
    sharded, single = tmp_path / "sharded", tmp_path / "single"
    prepare_cache(manifest, single, progress=False, cache_format="blosc2")
    for i in range(2):
        assert (
            prepare_main(
                "--manifest", manifest, "--out", sharded, "--shard", f"{i}/2", "--format", "blosc2"
            ).returncode
            == 0
        )
    assert prepare_main("--manifest", manifest, "--out", sharded, "--merge").returncode == 0
    assert not (sharded / SHARDS_DIR).exists() and _suffixes(sharded) == {".b2nd"}
    assert sorted(owners[0] + owners[1]) == ["ts", "ts_nolabel"]
    for name in (
        "studies/ts.b2nd",
        "labels/ts.b2nd",
        "studies/ts_nolabel.b2nd",
    ):  # blosc2 writes are repeatable
        assert (sharded / name).read_bytes() == (single / name).read_bytes()
    assert prepare_main("--manifest", manifest, "--out", sharded).stdout.startswith(
        "fm3d prepare: 0 prepared, 2 skipped"
    )


def test_a_data_module_trains_from_a_converted_cache(tmp_path: Path) -> None:
    manifest = generate_demo_cohort(tmp_path / "demo", num_studies=6, seed=0, progress=False)
    prepare_cache(manifest, tmp_path / "npy", progress=False)
    convert_cache(tmp_path / "npy", "blosc2", tmp_path / "b2nd", progress=False)
    assert _suffixes(tmp_path / "b2nd") == {".b2nd"}
    views = {"image": {"size": (8, 32, 32)}, "voco": {"geometry": "tiny"}}
    epochs = []
    for name, workers in (("npy", 0), ("b2nd", 1)):  # the converted cache read in a DataLoader worker
        loader = LoaderSettings(batch_size=2, num_workers=workers, split_fractions=(0.5, 0.25, 0.25),
                                persistent_workers=False)  # fmt: skip
        module = CTDataModule(tmp_path / name, views=views, loader=loader)
        module.setup("fit")
        epochs.append(list(module.train_dataloader()))
    assert len(epochs[0]) == len(epochs[1]) > 0
    for a, b in zip(*epochs, strict=True):
        assert a["study_id"] == b["study_id"]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["voco_crops"], b["voco_crops"])


def test_blosc2_files_are_blosc2_ndarrays_with_the_fixed_codec(tmp_path: Path) -> None:
    """Other tools read the cache with plain python-blosc2: the file is a standard NDArray frame."""
    array = np.random.default_rng(0).integers(-1000, 1000, (40, 50, 60), dtype=np.int16)
    save_array(tmp_path / "a.b2nd", array)
    stored = blosc2.open(str(tmp_path / "a.b2nd"))
    assert np.array_equal(stored[...], array)
    assert stored.cparams.codec == blosc2.Codec.ZSTD and stored.cparams.clevel == 5
    assert stored.cparams.filters[:2] == [blosc2.Filter.SHUFFLE, blosc2.Filter.BYTEDELTA]
