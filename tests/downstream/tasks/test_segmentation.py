"""Segmentation through the real CLI on the real TotalSegmentator CT: loss falls, Dice is reported,
and the predicted NIfTI overlays the source CT (same shape and affine)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import polars as pl
import pytest
import torch
import yaml

import fm3d
from downstream.cli import main as finetune
from downstream.data import SegmentationDataModule
from downstream.data.label_names import LabelNamesError
from downstream.evaluate import main as evaluate
from downstream.tasks.segmentation import SegmentationTask
from fm3d.data.cache import PreparedCache
from fm3d.data.prepare import prepare_cache
from fm3d.metrics.segmentation import dice_per_class
from fm3d.spec import InputSpec

# spleen, kidney_right, kidney_left, liver in TotalSegmentator's label map
ORGANS = "[1, 2, 3, 5]"
NAMES = "[spleen, kidney_right, kidney_left, liver]"


@pytest.fixture(scope="module")
def totalseg_cache(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    source = shared_data / "ct" / "totalsegmentator"
    root = tmp_path_factory.mktemp("totalseg")
    manifest = root / "manifest.csv"
    pl.DataFrame(
        {
            "study_id": ["ts0"],
            "patient_id": ["p0"],
            "image_path": [str(source / "example_ct_sm.nii.gz")],
            "label_path": [str(source / "example_seg.nii.gz")],
        }
    ).write_csv(manifest)
    # 6 mm keeps the run small; the predicted map must still come back on the 3 mm source grid.
    prepare_cache(manifest, root / "cache", spec=InputSpec((6.0, 6.0, 6.0)), progress=False)
    return source / "example_ct_sm.nii.gz", root / "cache"


def _args(kit: SimpleNamespace, cache: Path, run: Path) -> list[str]:
    return [
        "--config", str(kit.conf / "segmentation.yaml"),
        "--model.encoder", "vit3d_tiny", "--model.encoder_overrides", kit.tiny_vit,
        "--model.strategy.name", "full", "--model.lr", "3e-3", "--model.warmup_steps", "0",
        "--model.feature_size", "8", "--model.sw_batch_size", "4",
        "--data.cache_dir", str(cache), "--data.label_values", ORGANS, "--data.class_names", NAMES,
        "--data.image_size", "[16, 32, 32]",
        "--data.loader.batch_size", "2", "--data.loader.num_workers", "0",
        "--data.samples_per_volume", "2", "--data.foreground_ratio", "1.0",
        "--data.loader.fixed_splits", "{train: [ts0], val: [ts0], test: [ts0], predict: [ts0]}",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
    ]  # fmt: skip


def test_segmentation_fit_evaluate_predict_on_totalsegmentator(
    totalseg_cache: tuple[Path, Path], tmp_path: Path, cli_kit: SimpleNamespace
) -> None:
    source_ct, cache = totalseg_cache
    run = tmp_path / "run"
    fit = ["fit", *_args(cli_kit, cache, run), "--trainer.max_steps", "12",
           "--trainer.log_every_n_steps", "1", "--trainer.val_check_interval", "12"]  # fmt: skip
    assert finetune(fit) == 0
    fit_run = cli_kit.runs(run)[0]
    losses = cli_kit.history(run, fit_run.info.run_id, "train/loss")
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses

    checkpoint = next(run.rglob("*.ckpt"))
    # A frozen/full checkpoint is also an fm3d encoder.
    assert fm3d.load_encoder(checkpoint).config.embed_dim == 32

    out = tmp_path / "evaluation"
    assert evaluate([*_args(cli_kit, cache, run), "--ckpt_path", str(checkpoint), "--out", str(out)]) == 0
    table = pl.read_csv(out / "dice_per_class.csv")
    assert table["class"].to_list() == ["spleen", "kidney_right", "kidney_left", "liver"]
    assert (out / "dice_per_class.png").stat().st_size > 0 and "dice_mean" in (out / "metrics.md").read_text()
    eval_run = cli_kit.runs(run)[-1]
    assert "eval/dice_mean" in eval_run.data.metrics

    assert finetune(["predict", *_args(cli_kit, cache, run), "--ckpt_path", str(checkpoint)]) == 0
    predicted = nib.load(run / "predictions" / "ts0_seg.nii.gz")
    source = nib.load(source_ct)
    assert predicted.shape == source.shape
    np.testing.assert_allclose(predicted.affine, source.affine, atol=1e-4)
    labels = np.asarray(predicted.dataobj)
    assert labels.dtype == np.uint8 and set(np.unique(labels)) <= {0, 1, 2, 3, 4}


def test_sliding_window_dice_matches_the_metric_on_the_full_volume(totalseg_cache: tuple[Path, Path]) -> None:
    _, cache = totalseg_cache
    task = SegmentationTask(
        "vit3d_tiny", ["liver"], image_size=(16, 32, 32), feature_size=8,
        encoder_overrides={"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8},
    ).eval()  # fmt: skip
    prepared = PreparedCache(cache)
    image = torch.from_numpy(np.asarray(prepared.image("ts0"), dtype=np.float32))[None, None]
    label = torch.from_numpy((np.asarray(prepared.label("ts0")) == 5).astype(np.int64))[None, None]
    with torch.no_grad():
        logits = task.infer(image)
        out = task.step({"image": image, "label": label, "study_id": ["ts0"]}, "test")
    assert logits.shape == (1, 2, *image.shape[2:])  # whole volume, windows blended back
    assert torch.allclose(
        out.collect["dice"], dice_per_class(logits.argmax(1, keepdim=True), label, 2), equal_nan=True
    )


# ---- class names from the data's labels.json (the demo: 1 = liver, 2 = spleen, ...) ---------------


def _demo_args(kit: SimpleNamespace, cache: Path, run: Path, *extra: str) -> list[str]:
    """The shipped segmentation.yaml on the demo cache, with a tiny encoder and crops."""
    return [
        "--config", str(kit.conf / "segmentation.yaml"), "--data.cache_dir", str(cache),
        "--model.encoder", "vit3d_tiny", "--model.encoder_overrides", kit.tiny_vit,
        "--model.strategy.name", "full", "--model.feature_size", "8", "--model.sw_batch_size", "4",
        "--data.image_size", "[16, 32, 32]", "--data.loader.num_workers", "0",
        "--data.samples_per_volume", "1",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", *extra,
    ]  # fmt: skip


def test_prepare_carries_the_label_names_and_the_data_module_maps_names_to_their_values(
    demo_cohort: Path,
) -> None:
    cache = demo_cohort / "cache"
    assert json.loads((cache / "labels.json").read_text()) == json.loads(
        (demo_cohort / "labels.json").read_text()
    )
    data = SegmentationDataModule(str(cache), class_names=["spleen", "liver"])
    assert data.label_values == [2, 1]
    study = PreparedCache(cache).index["study_id"][0]
    raw = np.asarray(PreparedCache(cache).label(study))
    data.setup("fit")
    mapped = data.class_map(study)
    assert (raw == 2).any() and (raw == 1).any()
    np.testing.assert_array_equal(mapped == 1, raw == 2)  # class 1 is the spleen, label value 2
    np.testing.assert_array_equal(mapped == 2, raw == 1)  # class 2 is the liver, label value 1
    every = SegmentationDataModule(str(cache))
    assert every.class_names[:4] == ["liver", "spleen", "kidney_right", "kidney_left"]
    assert every.label_values == sorted(every.label_values) and 0 not in every.label_values
    named = SegmentationDataModule(str(cache), label_values=[4, 1])
    assert named.class_names == ["kidney_left", "liver"]


def test_shipped_config_segments_the_organs_the_demo_labels_name(
    demo_cohort: Path, tmp_path: Path, cli_kit: SimpleNamespace
) -> None:
    run = tmp_path / "run"
    fit = ["fit", *_demo_args(cli_kit, demo_cohort / "cache", run), "--trainer.max_steps", "2",
           "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "1"]  # fmt: skip
    assert finetune(fit) == 0
    checkpoint = next(run.rglob("*.ckpt"))
    out = tmp_path / "evaluation"
    args = _demo_args(cli_kit, demo_cohort / "cache", run, "--trainer.limit_test_batches", "1")
    assert evaluate([*args, "--ckpt_path", str(checkpoint), "--out", str(out)]) == 0
    shipped = yaml.safe_load((cli_kit.conf / "segmentation.yaml").read_text())["data"]["class_names"]
    assert pl.read_csv(out / "dice_per_class.csv")["class"].to_list() == shipped


def test_class_names_that_contradict_the_labels_json_are_refused_naming_both(
    demo_cohort: Path, tmp_path: Path, cli_kit: SimpleNamespace, capsys: pytest.CaptureFixture[str]
) -> None:
    # TotalSegmentator's values and names on the demo cache, where 1 is the liver, not the spleen.
    args = _demo_args(cli_kit, demo_cohort / "cache", tmp_path / "run",
                      "--data.label_values", ORGANS, "--data.class_names", NAMES)  # fmt: skip
    assert finetune(["fit", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("fm3d finetune: ")
    assert str(demo_cohort / "cache" / "labels.json") in err
    assert "1 = 'liver' there but 'spleen' in class_names" in err
    assert "5 = 'lung_right' there but 'liver' in class_names" in err
    assert "data.class_names to null" in err
    assert not list((tmp_path / "run").rglob("*.ckpt"))

    with pytest.raises(LabelNamesError, match=r"\['pancreas'\] are not label names of .*labels.json; "
                       r"its names are \[.*'liver'.*\]"):  # fmt: skip
        SegmentationDataModule(str(demo_cohort / "cache"), class_names=["liver", "pancreas"])
    with pytest.raises(LabelNamesError, match=r"label_values \[99\] have no name in .*labels.json"):
        SegmentationDataModule(str(demo_cohort / "cache"), label_values=[1, 99])


def test_a_cache_without_label_names_needs_both_lists(totalseg_cache: tuple[Path, Path]) -> None:
    _, cache = totalseg_cache
    assert not (cache / "labels.json").exists()
    both = r"no labels.json .* both data.label_values and data.class_names"
    with pytest.raises(LabelNamesError, match=both):
        SegmentationDataModule(str(cache), class_names=["liver"])
    with pytest.raises(LabelNamesError, match="2 label_values but 1 class_names"):
        SegmentationDataModule(str(cache), label_values=[1, 5], class_names=["liver"])
    assert SegmentationDataModule(str(cache), label_values=[5], class_names=["liver"]).label_values == [5]


def test_a_damaged_label_names_file_is_refused_naming_it(demo_cohort: Path, tmp_path: Path) -> None:
    bad = tmp_path / "names.json"
    bad.write_text('["liver", "spleen"]')
    with pytest.raises(LabelNamesError, match=rf"{bad} must map integer label values to names"):
        SegmentationDataModule(str(demo_cohort / "cache"), label_names=str(bad))
    with pytest.raises(LabelNamesError, match=rf"cannot read the label names {tmp_path / 'none.json'}"):
        SegmentationDataModule(str(demo_cohort / "cache"), label_names=str(tmp_path / "none.json"))
