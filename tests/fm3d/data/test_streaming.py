"""Streaming packs: `fm3d stream pack` shards, reading them through fsspec, rank/worker shares, resumption.

Every cache here is written by the real `fm3d prepare` from real NIfTI files (tiny synthetic CTs,
and the TotalSegmentator CT with its label map from ../shared/data); packs are read from local
files and from fsspec's in-memory filesystem (`memory://`). The reference for every sample is the
memmap path: `CTDataset` over the `PreparedCache` the pack was made from.
"""

from __future__ import annotations

import itertools
import json
import tarfile
from pathlib import Path

import fsspec
import lightning as L
import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch

from fm3d.data.cache import PreparedCache
from fm3d.data.datasets import CTDataset, SampleSpec
from fm3d.data.prepare import prepare_cache
from fm3d.data.stream_cli import main as stream_main
from fm3d.data.streaming import PackedCache, PackError, pack_cache
from fm3d.data.streaming_loader import (
    ShardStream,
    StreamingLoader,
    StreamLayoutError,
    plan_epoch,
    resume_point,
)
from fm3d.data.views import build_views

from .conftest import write_nifti_cohort

STUDIES = 12
VIEWS = build_views({"image": {"size": [8, 16, 16]}})


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A real prepared cache of 12 tiny NIfTI CTs, every third with a label map."""
    folder = tmp_path_factory.mktemp("cohort")
    manifest = write_nifti_cohort(folder, studies=STUDIES)
    rows = pl.read_csv(manifest)
    labels = []
    for i, image in enumerate(rows["image_path"]):
        if i % 3:
            labels.append(None)
            continue
        ct = nib.load(image)
        label = folder / f"label{i}.nii.gz"
        nib.save(nib.Nifti1Image((np.asarray(ct.dataobj) > 0).astype(np.uint8), ct.affine), label)
        labels.append(str(label))
    rows.with_columns(pl.Series("label_path", labels)).write_csv(manifest)
    prepare_cache(manifest, folder / "cache", progress=False)
    return folder / "cache"


@pytest.fixture(scope="module", params=["local", "memory"])
def pack_url(request, cache, tmp_path_factory) -> str:
    """The cache packed into 4 shards (3 studies each), on local disk or in fsspec's memory filesystem."""
    url = (
        str(tmp_path_factory.mktemp("pack") / "pack")
        if request.param == "local"
        else f"memory://test-streaming/{request.node.name}"
    )
    pack_cache(cache, url, 4, progress=False)
    return url


def _stream(url: str, train: bool, batch_size: int, seed: int = 0) -> ShardStream:
    spec = SampleSpec(views=VIEWS)
    return ShardStream(CTDataset(PackedCache(url), spec=spec, train=train, seed=seed), batch_size)


def _epoch(loader: StreamingLoader) -> list[dict]:
    return list(loader)


def test_pack_holds_each_study_once_with_its_row_and_arrays(cache, pack_url):
    prepared, pack = PreparedCache(cache), PackedCache(pack_url)
    fs, root = fsspec.core.url_to_fs(pack_url)
    described = json.loads(fs.cat_file(f"{root}/pack.json"))
    assert [s["studies"] for s in described["shards"]] == [3, 3, 3, 3]
    seen = []
    for shard in described["shards"]:
        with fs.open(f"{root}/{shard['file']}", "rb") as f, tarfile.open(fileobj=f) as tar:
            names = tar.getnames()
            rows = [pl.read_parquet(tar.extractfile(name)) for name in names if name.endswith(".row.parquet")]
        assert fs.size(f"{root}/{shard['file']}") == shard["bytes"]
        for row in rows:
            study_id = row["study_id"].item()
            key = f"s{prepared.study_ids.index(study_id):06d}"
            # WebDataset's layout: members grouped by key, in order, the index row's columns all kept.
            assert f"{key}.image.npy" in names
            assert (f"{key}.label.npy" in names) == (prepared.row(study_id)["label_file"] is not None)
            assert row.columns == prepared.index.columns
            assert row.to_dicts()[0] == prepared.row(study_id)
            seen.append(study_id)
    assert sorted(seen) == sorted(prepared.study_ids)
    for study_id in prepared.study_ids:
        assert np.array_equal(pack.image(study_id), np.asarray(prepared.image(study_id)))
        label = prepared.label(study_id)
        assert (pack.label(study_id) is None) == (label is None)
        if label is not None:
            assert np.array_equal(pack.label(study_id), np.asarray(label))
    assert pack.input_spec == prepared.input_spec


def test_packing_twice_writes_the_same_bytes(cache, tmp_path):
    for name in ("a", "b"):
        pack_cache(cache, str(tmp_path / name), 3, progress=False)
    for shard in sorted((tmp_path / "a" / "shards").iterdir()):
        assert shard.read_bytes() == (tmp_path / "b" / "shards" / shard.name).read_bytes()


def test_repacking_into_fewer_shards_removes_the_old_ones(cache, tmp_path):
    pack_cache(cache, str(tmp_path / "p"), 4, progress=False)
    pack_cache(cache, str(tmp_path / "p"), 2, progress=False)
    assert sorted(p.name for p in (tmp_path / "p" / "shards").iterdir()) == [
        "000000-of-000002.tar",
        "000001-of-000002.tar",
    ]
    assert len(PackedCache(str(tmp_path / "p"))) == STUDIES


def test_two_ranks_of_two_workers_read_disjoint_shards_covering_every_study(pack_url):
    pack = PackedCache(pack_url)
    positions = pack.shard_positions()
    per_rank = []
    for rank in range(2):
        stream = _stream(pack_url, train=True, batch_size=2)
        loader = StreamingLoader(stream, num_workers=2, rank=rank, world_size=2)
        batches = _epoch(loader)
        assert len(batches) == len(loader) == 4  # 2 workers x 3 studies in batches of 2: 2 + 1 each
        plan = stream.plan(2)
        shards = [shard for worker in plan.shards[rank] for shard in worker]
        read = [study_id for batch in batches for study_id in batch["study_id"]]
        # Each worker reads one shard of its own; the rank reads exactly those shards' studies, once.
        assert all(len(worker) == 1 for worker in plan.shards[rank])
        assert sorted(read) == sorted(pack.study_ids[p] for s in shards for p in positions[s])
        per_rank.append((set(shards), read))
    assert per_rank[0][0].isdisjoint(per_rank[1][0]) and per_rank[0][0] | per_rank[1][0] == {0, 1, 2, 3}
    every = per_rank[0][1] + per_rank[1][1]
    assert sorted(every) == sorted(pack.study_ids)  # each study once per epoch


@pytest.mark.parametrize("train", [True, False])
def test_streamed_samples_equal_the_memmap_paths(cache, pack_url, train):
    memmap = CTDataset(PreparedCache(cache), spec=SampleSpec(views=VIEWS), train=train, seed=3)
    loader = StreamingLoader(_stream(pack_url, train, batch_size=3, seed=3), num_workers=2)
    for epoch in (0, 1):
        batches = _epoch(loader)
        assert loader.epoch == epoch
        assert sorted(s for b in batches for s in b["study_id"]) == sorted(memmap.study_ids)
        for batch in batches:
            for j, study_id in enumerate(batch["study_id"]):
                index = (epoch if train else 0) * len(memmap) + memmap.study_ids.index(study_id)
                assert torch.equal(batch["image"][j], memmap[index]["image"])


def test_training_order_changes_with_the_epoch(pack_url):
    loader = StreamingLoader(_stream(pack_url, train=True, batch_size=3))
    first, second = ([s for b in _epoch(loader) for s in b["study_id"]] for _ in range(2))
    assert first != second and sorted(first) == sorted(second)


@pytest.mark.parametrize("shards, batch_size, workers", [(4, 2, 2), (5, 3, 2), (4, 3, 0)])
def test_resuming_after_k_batches_continues_the_uninterrupted_epoch(
    cache, tmp_path, shards, batch_size, workers
):
    url = str(tmp_path / "pack")
    pack_cache(cache, url, shards, progress=False)

    def loader() -> StreamingLoader:
        return StreamingLoader(_stream(url, train=True, batch_size=batch_size), num_workers=workers)

    whole = loader()
    whole.set_epoch(1)
    reference = [(b["study_id"], b["image"]) for b in whole]
    if (shards, workers) == (5, 2):  # shards of 3, 3, 2, 2, 2: the workers make 3 and 2 batches
        assert sorted(len(b) for b in whole.dataset.plan(2).batches[0]) == [2, 3]
    for k in range(len(reference) + 1):
        first = loader()
        first.set_epoch(1)
        taken = [batch["study_id"] for batch in itertools.islice(first, k)]
        state = first.state_dict()
        assert state["epoch"] == 1 and state["batches"] == k
        resumed = loader()
        resumed.load_state_dict(state)
        rest = list(resumed)
        if k == len(reference):  # taken at the epoch's end: the next epoch follows
            assert resumed.epoch == 2 and len(rest) == len(reference)
            continue
        assert taken + [b["study_id"] for b in rest] == [ids for ids, _ in reference]
        for batch, (_, image) in zip(rest, reference[k:], strict=True):
            assert torch.equal(batch["image"], image)


def test_resuming_with_another_layout_restarts_the_epoch(pack_url, caplog):
    first = StreamingLoader(_stream(pack_url, train=True, batch_size=2), num_workers=2)
    next(iter(first))
    resumed = StreamingLoader(_stream(pack_url, train=True, batch_size=2), num_workers=0)
    resumed.load_state_dict(first.state_dict())
    assert len(list(resumed)) == len(resumed)
    assert "restarts from its first batch" in caplog.text


def test_plan_pads_short_ranks_and_keeps_its_length_every_epoch():
    shards = [list(range(start, start + size)) for start, size in ((0, 5), (5, 1), (6, 2), (8, 4), (12, 3))]
    lengths = set()
    for epoch in range(4):
        plan = plan_epoch(shards, epoch, seed=0, world_size=2, num_workers=2, batch_size=2, shuffle=True)
        lengths.add(plan.length)
        dealt = sorted(s for rank in plan.shards for worker in rank for s in worker)
        assert dealt == [0, 1, 2, 3, 4]
        for rank, rank_shards in zip(plan.batches, plan.shards, strict=True):
            assert sum(len(worker) for worker in rank) == plan.length
            for batches, mine in zip(rank, rank_shards, strict=True):
                owned = {p for s in mine for p in shards[s]}
                read = [p for batch in batches for p in batch]
                assert set(read) == owned  # its own studies only, each at least once
        first_pass = sorted(p for r in plan.batches for w in r for b in w for p in b)
        assert set(first_pass) == set(range(15))
    assert len(lengths) == 1


def test_resume_point_follows_the_round_robin_past_a_finished_worker():
    # Workers with 1, 3 and 2 batches hand out w0 w1 w2 | w1 w2 | w1.
    assert resume_point([1, 3, 2], 0) == ([0, 0, 0], 0)
    assert resume_point([1, 3, 2], 4) == ([1, 2, 1], 2)
    assert resume_point([1, 3, 2], 5) == ([1, 2, 2], 0)


def test_more_readers_than_shards_is_refused(pack_url):
    loader = StreamingLoader(_stream(pack_url, train=True, batch_size=2), num_workers=2, rank=0, world_size=3)
    with pytest.raises(StreamLayoutError, match=r"4 shards hold studies.*3 ranks x 2 workers"):
        len(loader)


def _shard_file(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, root = fsspec.core.url_to_fs(url)
    return fs, f"{root}/shards/000001-of-000004.tar"


def test_a_missing_shard_is_named(cache, tmp_path):
    for url in (str(tmp_path / "pack"), "memory://test-streaming/missing"):
        pack_cache(cache, url, 4, progress=False)
        fs, shard = _shard_file(url)
        fs.rm(shard)
        with pytest.raises(PackError, match=r"000001-of-000004\.tar: is listed in pack\.json but missing"):
            list(StreamingLoader(_stream(url, train=False, batch_size=2)))


def test_a_cut_short_or_overwritten_shard_is_named(cache, tmp_path):
    url = str(tmp_path / "pack")
    pack_cache(cache, url, 4, progress=False)
    _, shard = _shard_file(url)
    data = Path(shard).read_bytes()
    Path(shard).write_bytes(data[:-1024])
    with pytest.raises(PackError, match=r"000001-of-000004\.tar: holds \d+ bytes where pack\.json lists"):
        list(StreamingLoader(_stream(url, train=False, batch_size=2)))
    # Same size, a member's header overwritten: named too, also from inside a DataLoader worker.
    index = pl.read_parquet(Path(url) / "pack.parquet").filter(pl.col("pack_shard") == 1)
    header = index["image_offset"][0] - 512
    Path(shard).write_bytes(data[:header] + b"\0" * 512 + data[header + 512 :])
    with pytest.raises(RuntimeError, match=r"000001-of-000004\.tar: does not hold s\d{6}\.\w+\.npy"):
        list(StreamingLoader(_stream(url, train=False, batch_size=2), num_workers=2))


def test_a_prepared_cache_is_not_a_pack(cache):
    with pytest.raises(PackError, match=r"is a prepared cache \(index\.parquet\), not a pack"):
        PackedCache(str(cache))
    with pytest.raises(PackError, match="not a pack: ShardStream reads shards"):
        ShardStream(CTDataset(PreparedCache(cache), spec=SampleSpec(views=VIEWS)), 2)


def test_stream_command_packs_and_describes(cache, tmp_path, capsys):
    out = tmp_path / "pack"
    assert stream_main(["pack", str(cache), "--to", str(out), "--shards", "3", "--no-progress"]) == 0
    assert f"packed {STUDIES} studies into 3 shards" in capsys.readouterr().out
    assert stream_main(["info", str(out)]) == 0
    assert f"{STUDIES} studies in 3 shards" in capsys.readouterr().out
    assert stream_main(["pack", str(cache), "--to", str(out), "--shards", "13", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Choose --shards between 1 and 12" in err
    assert stream_main(["info", str(tmp_path / "nowhere")]) == 2
    assert "has no pack.json" in capsys.readouterr().err


def test_real_ct_and_label_map_stream_as_the_memmap_path_reads_them(shared_data, tmp_path):
    """The TotalSegmentator CT with its label map, listed twice, VoCo-v2's view streamed and memory-mapped."""
    ct = shared_data / "ct" / "totalsegmentator"
    manifest = tmp_path / "manifest.csv"
    pl.DataFrame(
        {
            "study_id": ["1.2.840.1", "1.2.840.2"],  # DICOM-like ids with dots: members are keyed by position
            "image_path": [str(ct / "example_ct_sm.nii.gz")] * 2,
            "label_path": [str(ct / "example_seg.nii.gz")] * 2,
        }
    ).write_csv(manifest)
    prepare_cache(manifest, tmp_path / "cache", progress=False)
    pack_cache(tmp_path / "cache", str(tmp_path / "pack"), 2, progress=False)
    spec = SampleSpec(views=build_views({"voco": {"geometry": "v2"}}), hu_window=(-175.0, 250.0))
    memmap = CTDataset(tmp_path / "cache", spec=spec, train=True)
    pack = PackedCache(str(tmp_path / "pack"))
    loader = StreamingLoader(ShardStream(CTDataset(pack, spec=spec, train=True), batch_size=1))
    batches = list(loader)
    assert sorted(b["study_id"][0] for b in batches) == ["1.2.840.1", "1.2.840.2"]
    for batch in batches:
        expected = memmap[memmap.study_ids.index(batch["study_id"][0])]
        for key in ("voco_bases", "voco_crops", "voco_labels"):
            assert torch.equal(batch[key][0], expected[key])
    label = PreparedCache(tmp_path / "cache").label("1.2.840.1")
    assert np.array_equal(pack.label("1.2.840.1"), np.asarray(label)) and np.asarray(label).max() > 0


class _Recorder(L.LightningModule):
    """Records the studies of every training batch; its loss trains one weight."""

    def __init__(self, loader: StreamingLoader) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.loader, self.seen = loader, []

    def train_dataloader(self) -> StreamingLoader:
        return self.loader

    def training_step(self, batch, _):
        self.seen.append(list(batch["study_id"]))
        return (self.weight * batch["image"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(url: str, max_steps: int, tmp_path: Path, ckpt: Path | None = None) -> _Recorder:
    model = _Recorder(StreamingLoader(_stream(url, train=True, batch_size=2), num_workers=2))
    trainer = L.Trainer(
        max_steps=max_steps, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, ckpt_path=ckpt)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    return model


def test_lightning_resumes_a_mid_epoch_checkpoint_at_the_next_batch(cache, tmp_path):
    url = str(tmp_path / "pack")
    pack_cache(cache, url, 4, progress=False)
    # 12 studies, 2 workers with 2 shards each, batches of 2: 6 batches an epoch. Stopped after
    # batch 2 of epoch 1 (step 8), the checkpoint resumes at its batch 3.
    whole = _fit(url, 11, tmp_path / "whole").seen
    first = _fit(url, 8, tmp_path / "first").seen
    resumed = _fit(url, 11, tmp_path / "resumed", ckpt=tmp_path / "first" / "last.ckpt").seen
    assert len(resumed) == 3 and first + resumed == whole
    assert sorted(s for b in whole[:6] for s in b) == sorted(PackedCache(url).study_ids)
    assert [s for b in whole[6:] for s in b] != [s for b in whole[:5] for s in b]  # another order
