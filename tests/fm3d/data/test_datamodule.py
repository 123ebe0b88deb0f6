"""CTDataModule with a real Trainer and LightningCLI over a prepared demo cohort."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import polars as pl
import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from fm3d.data.base import LoaderSettings
from fm3d.data.datamodule import CTDataModule
from fm3d.data.prepare import prepare_cache
from fm3d.demo import generate_demo_cohort

VIEWS = {"image": {"size": (8, 32, 32)}, "voco": {"geometry": "tiny"}}
SMALL_LOADER = dict(batch_size=2, split_fractions=(0.5, 0.25, 0.25))


def _data(demo, labels: bool = False, **loader) -> CTDataModule:
    """A small module over the demo cache: tiny views, batches of 2, half the patients training."""
    return CTDataModule(
        demo["cache"],
        labels=demo["labels"] if labels else None,
        views=VIEWS,
        loader=LoaderSettings(**{**SMALL_LOADER, **loader}),
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("demo")
    manifest = generate_demo_cohort(root, num_studies=12, seed=0, progress=False)
    prepare_cache(manifest, root / "cache", progress=False)
    ids = pl.read_parquet(manifest)["study_id"].to_list()
    labels = pl.DataFrame(
        {
            "study_id": ids[:8],
            "phenotype": [[float(i % 2)] * 5 for i in range(8)],
            "tte_time": [[100.0 + i, 50.0, 7.0] for i in range(8)],
            "tte_event": [[i % 2 == 0, False, True] for i in range(8)],
        }
    )
    labels.write_parquet(root / "labels.parquet")
    return {"root": root, "cache": root / "cache", "labels": root / "labels.parquet"}


def test_model_facing_properties_before_setup(demo):
    dm = _data(demo, labels=True)
    assert (dm.num_phenotypes, dm.num_tasks) == (5, 3)
    assert _data(demo).num_phenotypes == 0


def test_patient_level_splits_and_reports_from_the_index(demo):
    dm = _data(demo, labels=True)
    dm.setup("fit")
    index = pl.read_parquet(demo["cache"] / "index.parquet").select("study_id", "patient_id")
    owner = dict(index.iter_rows())
    seen: dict[str, str] = {}
    for split in ("train", "val", "test"):
        assert len(dm.dataset(split)) > 0
        for sid in dm.dataset(split).study_ids:
            assert seen.setdefault(owner[sid], split) == split
    assert sum(len(dm.dataset(s)) for s in ("train", "val", "test")) == index.height
    assert len(dm.dataset("predict")) == index.height
    batch = next(iter(dm.predict_dataloader()))
    assert batch["has_report"].all() and "IMPRESSION" not in batch["report"][0]
    assert "\n" in batch["report"][0]  # findings + impression joined
    assert batch["voco_labels"].shape == (2, 2, 4) and batch["phenotype"].shape == (2, 5)


def _epoch(dm: CTDataModule, epoch: int) -> list[dict]:
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)  # what Lightning does at every epoch start
    return list(iter(loader))


def _module(demo, seed: int = 0, workers: int = 0) -> CTDataModule:
    dm = _data(demo, num_workers=workers, seed=seed, persistent_workers=False)
    dm.setup("fit")
    return dm


def _same(a: list[dict], b: list[dict]) -> bool:
    return all(
        x["study_id"] == y["study_id"]
        and torch.equal(x["voco_crops"], y["voco_crops"])
        and torch.equal(x["image"], y["image"])
        for x, y in zip(a, b, strict=True)
    )


def test_draws_depend_on_seed_and_epoch_only(demo):
    """Same (seed, epoch) -> same batches, with or without workers; epochs and seeds differ."""
    in_process = [_epoch(_module(demo), e) for e in (0, 1)]
    assert _same(in_process[0], _epoch(_module(demo, workers=2), 0))
    assert _same(in_process[1], _epoch(_module(demo, workers=2), 1))
    assert not _same(in_process[0], in_process[1])
    assert not _same(in_process[0], _epoch(_module(demo, seed=1), 0))


def test_a_resumed_run_draws_what_the_uninterrupted_run_draws(demo):
    """Loaders re-created any number of times (as resuming does) replay the epoch exactly."""
    uninterrupted = _module(demo)
    _epoch(uninterrupted, 0)
    expected = _epoch(uninterrupted, 1)
    resumed = _module(demo)
    next(iter(resumed.train_dataloader()))  # an iterator drawn from and dropped
    assert _same(expected, _epoch(resumed, 1))


class _TinyModel(L.LightningModule):
    """Consumes the batch contract: image, VoCo crops and phenotypes (masked by has_ehr)."""

    def __init__(self, num_phenotypes: int = 1) -> None:
        super().__init__()
        self.num_phenotypes = num_phenotypes
        self.head = torch.nn.Linear(2, num_phenotypes)

    def _loss(self, batch):
        features = torch.stack(
            [batch["image"].mean((1, 2, 3, 4)), batch["voco_crops"].mean((1, 2, 3, 4, 5))], 1
        )
        logits = self.head(features)
        per_study = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, batch["phenotype"], reduction="none"
        ).mean(1)
        return (per_study * batch["has_ehr"]).sum() / batch["has_ehr"].sum().clamp(min=1)

    def training_step(self, batch, batch_idx):
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", self._loss(batch), batch_size=len(batch["study_id"]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_fit_with_a_real_trainer(demo, tmp_path):
    dm = _data(demo, labels=True)
    model = _TinyModel(dm.num_phenotypes)
    trainer = L.Trainer(
        max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step > 0 and "val_loss" in trainer.callback_metrics


class _LinkedCLI(LightningCLI):
    def add_arguments_to_parser(self, parser):
        parser.link_arguments("data.num_phenotypes", "model.num_phenotypes", apply_on="instantiate")


def test_lightning_cli_fills_the_datamodule_from_yaml(demo, tmp_path):
    config = tmp_path / "data.yaml"
    config.write_text(
        "data:\n"
        f"  cache_dir: {demo['cache']}\n"
        f"  labels: {demo['labels']}\n"
        "  views: {image: {size: [8, 32, 32]}, voco: {geometry: tiny}}\n  report_columns: [impression]\n"
        "  loader: {batch_size: 2, num_workers: 0, split_fractions: [0.5, 0.25, 0.25], seed: 3}\n"
    )
    cli = _LinkedCLI(_TinyModel, CTDataModule, run=False, args=["--config", str(config)])
    assert isinstance(cli.datamodule, CTDataModule)
    data = cli.datamodule
    assert data.input_spec.image_size == (8, 32, 32) and data.report_columns == ("impression",)
    assert data.loader_settings.seed == 3 and data.loader_settings.split_fractions == (0.5, 0.25, 0.25)
    assert cli.model.num_phenotypes == 5


def test_cached_report_embeddings_go_into_the_batch(demo, tmp_path):
    from fm3d.data.errors import DataError
    from fm3d.text import TextTower, init_text_model
    from fm3d.text_cache import build_text_cache

    dm = _data(demo)
    dm.setup("fit")
    reports = {sid: dm.reports.get(sid) for sid in dm.cache.study_ids}
    model = init_text_model(tmp_path / "model", list(reports.values()), vocab_size=100, hidden_size=16)
    tower = TextTower(model, pooling="mean", max_length=64)
    build_text_cache(tower, list(reports.values()), tmp_path / "cache", progress=False)

    dm = CTDataModule(demo["cache"], views=VIEWS, text_embeddings=tmp_path / "cache",
                      loader=LoaderSettings(**SMALL_LOADER))  # fmt: skip
    dm.setup("fit")
    assert "report_embedding" in dm.batch_keys
    batch = next(iter(dm.predict_dataloader()))
    expected = tower.embed([reports[sid] for sid in batch["study_id"]])
    torch.testing.assert_close(batch["report_embedding"], expected, atol=1e-6, rtol=0)

    # Reports the cache lacks (the table changed, other columns) stop the run at setup.
    partial = tmp_path / "partial"
    build_text_cache(tower, list(reports.values())[:5], partial, progress=False)
    dm = CTDataModule(
        demo["cache"], views=VIEWS, text_embeddings=partial, loader=LoaderSettings(**SMALL_LOADER)
    )
    with pytest.raises(DataError, match=r"has no embedding for the reports of 7 of 12 studies .*--out"):
        dm.setup("fit")
