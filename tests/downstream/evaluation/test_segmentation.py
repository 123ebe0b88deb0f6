"""The segmentation protocol: a decoder trained over the frozen encoder, scored with per-class Dice.

Every Dice figure is checked against MONAI's `DiceMetric` (include_background=False, per class)
computed here from the predicted and true label maps. MONAI's `ignore_empty=False` gives 1 where a
class is absent from both maps, fm3d's convention NaN (nothing to score, left out of the means):
the reference sets those entries to NaN, and agrees with fm3d's everywhere else.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

import fm3d
from downstream.base import safe_name
from downstream.evaluation.encoders import EncoderEntry, load_entry
from downstream.evaluation.protocol import (
    EvalContext,
    ProtocolError,
    ProtocolResult,
    build_protocol,
    one_thread,
)
from downstream.evaluation.protocols.segmentation import PREDICTIONS_DIR, Segmentation, dice_score
from downstream.evaluation.studies import Studies
from fm3d.cli import main as fm3d_main
from fm3d.data.cache import PreparedCache
from fm3d.data.prepare import prepare_cache
from fm3d.metrics.segmentation import dice_per_class
from fm3d.spec import InputSpec

CPU = torch.device("cpu")
# 6 mm keeps every run small: the demo's 48 x 96 x 96 voxels become 24 a side, the real CT's
# 30 x 101 x 122 (3 mm) 15 x 50 x 61. A patch of 8 gives UNETR three levels over two blocks.
SPACING_MM = (6.0, 6.0, 6.0)
TINY_SEG_VIT = dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, target_spacing_mm=SPACING_MM)
# The TotalSegmentator organs the real-data test segments (values from labels_total_v2.tsv).
ORGANS = ("spleen", "kidney_right", "kidney_left", "liver")
# The tiny decoder finds the liver after ~100 steps on the real CT (seconds of CPU); the smaller
# organs need more and are scored as they come out.
REAL_STEPS = 150


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Each test on one torch thread: tiny convolutions gain nothing from two, and on a busy 2-core
    machine each parallel region waits for a time slice (measured at load ~7: this file took 498 s
    with two threads, 15 s with one)."""
    with one_thread():
        yield


def _tiny_encoder(folder: Path, image_size: tuple[int, int, int]) -> Path:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        encoder = fm3d.create_encoder("vit3d_tiny", **TINY_SEG_VIT, image_size=image_size)
    return fm3d.save_encoder(encoder, folder / "encoder")


@pytest.fixture(scope="module")
def demo6(eval_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[PreparedCache, Path]:
    """The eval cohort's studies prepared again at 6 mm (labels.json carried), and a tiny vit3d for it."""
    root = tmp_path_factory.mktemp("segmentation_demo")
    prepare_cache(
        eval_cohort / "manifest.parquet", root / "cache", spec=InputSpec(SPACING_MM), progress=False
    )
    return PreparedCache(root / "cache"), _tiny_encoder(root, (24, 24, 24))


def _context(
    entry: EncoderEntry, cache: PreparedCache, studies: Studies, work_dir: Path, seed: int = 0
) -> EvalContext:
    def no_features() -> None:
        raise AssertionError("the segmentation protocol trains on images, not pooled features")

    return EvalContext(entry, cache, studies, no_features, seed, CPU, work_dir)


def _class_maps(cache: PreparedCache, study_id: str) -> np.ndarray:
    """The study's label map with the labels.json values, ascending, as classes 1..K (others 0)."""
    values = sorted(int(v) for v in json.loads((cache.root / "labels.json").read_text()))
    label = np.asarray(cache.label(study_id))
    classes = np.zeros(label.shape, dtype=np.int64)
    for k, value in enumerate(values, start=1):
        classes[label == value] = k
    return classes


def _monai_dice(prediction: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """[K - 1] Dice of one study by MONAI, NaN where a class is absent from both maps."""
    pred = one_hot(torch.as_tensor(prediction, dtype=torch.long)[None, None], num_classes)
    true = one_hot(torch.as_tensor(truth, dtype=torch.long)[None, None], num_classes)
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)(pred, true)[0]
    both_empty = (pred[0, 1:].flatten(1).sum(1) == 0) & (true[0, 1:].flatten(1).sum(1) == 0)
    return torch.where(both_empty, torch.nan, dice).numpy()


def _reference_score(per_study: np.ndarray, rows: np.ndarray, names: list[str]) -> dict[str, float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a class scored in none of the rows: NaN
        per_class = np.nanmean(per_study[rows], axis=0)
        return {**{f"dice/{n}": v for n, v in zip(names, per_class, strict=True)},
                "dice_macro": np.nanmean(per_class)}  # fmt: skip


def _assert_scores_match(result: ProtocolResult, reference: np.ndarray, names: list[str]) -> None:
    """The result's score equals MONAI's on all rows and on resamples with repeats."""
    n = len(result.study_ids)
    for rows in (np.arange(n), *np.random.default_rng(0).integers(0, n, size=(5, n))):
        got, expected = result.score(rows), _reference_score(reference, rows, names)
        assert got.keys() == expected.keys()
        np.testing.assert_allclose([got[k] for k in expected], list(expected.values()), atol=1e-9)


def _assert_predictions_match_monai(
    result: ProtocolResult, cache: PreparedCache, work_dir: Path
) -> np.ndarray:
    """The saved predictions, scored by MONAI against the cache's labels, give the result's figures."""
    names = result.tables["per_class"]["class"].to_list()
    reference = []
    for study_id in result.study_ids:
        with np.load(work_dir / PREDICTIONS_DIR / f"{safe_name(study_id)}.npz") as saved:
            prediction = saved["classes"]
        truth = _class_maps(cache, study_id)
        assert prediction.shape == truth.shape == cache.shape(study_id)
        reference.append(_monai_dice(prediction, truth, len(names) + 1))
    reference = np.stack(reference)
    _assert_scores_match(result, reference, names)
    per_study = result.tables["per_study"]
    assert per_study["study_id"].to_list() == result.study_ids
    np.testing.assert_allclose(per_study.select(names).to_numpy(), reference, atol=1e-9)
    return reference


def test_score_is_monai_dice_per_class_on_any_resample() -> None:
    rng = np.random.default_rng(0)
    names = ["liver", "spleen", "kidney"]
    truth = rng.integers(0, 4, size=(6, 8, 8, 8))
    prediction = np.where(rng.random(truth.shape) < 0.7, truth, rng.integers(0, 4, size=truth.shape))
    # Study 0: spleen in neither map (NaN, left out); study 1: kidney predicted but absent (Dice 0).
    truth[0][truth[0] == 2], prediction[0][prediction[0] == 2] = 0, 0
    truth[1][truth[1] == 3] = 0
    per_study = dice_per_class(torch.as_tensor(prediction), torch.as_tensor(truth), 4).numpy()
    reference = np.stack([_monai_dice(p, t, 4) for p, t in zip(prediction, truth, strict=True)])
    assert np.isnan(reference[0, 1]) and reference[1, 2] == 0.0
    score = dice_score(per_study, names)
    result = ProtocolResult([f"s{i}" for i in range(6)], score)
    _assert_scores_match(result, reference, names)
    only_study_0 = score(np.array([0, 0]))  # spleen unscored in this resample: NaN, not in the macro
    assert np.isnan(only_study_0["dice/spleen"])
    assert only_study_0["dice_macro"] == pytest.approx(np.mean([reference[0, 0], reference[0, 2]]))


def test_end_to_end_on_the_demo_cohort(
    demo6: tuple[PreparedCache, Path], tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    cache, encoder_dir = demo6
    studies = Studies.from_cache(cache, (0.6, 0.2, 0.2), seed=0)
    entry = load_entry(f"tiny={encoder_dir}", seed=0)
    weights = {k: v.clone() for k, v in entry.module.state_dict().items()}
    rng_state = torch.get_rng_state()
    protocol = build_protocol("segmentation", {"max_steps": 20, "feature_size": 8, "lr": 3e-3})
    assert protocol.unavailable(entry) is None

    result = protocol.run(_context(entry, cache, studies, tmp_path))

    assert result.study_ids == studies.ids("test") and len(result.study_ids) >= 2
    names = json.loads((cache.root / "labels.json").read_text())
    assert result.tables["per_class"]["class"].to_list() == [names[v] for v in sorted(names, key=int)]
    assert result.selected == {"decoder": "unetr", "image_size": [24, 24, 24], "max_steps": 20}
    _assert_predictions_match_monai(result, cache, tmp_path)
    # The encoder is the suite's: frozen, in eval mode and unchanged; the global RNG is left alone.
    assert not entry.module.training and not any(p.requires_grad for p in entry.module.parameters())
    assert all(torch.equal(v, weights[k]) for k, v in entry.module.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng_state)
    # Lightning stays quiet and logs the 20 steps under the work folder.
    printed = "".join(capfd.readouterr())
    assert "GPU available" not in printed and "Trainable params" not in printed and "LeafSpec" not in printed
    (log,) = tmp_path.rglob("metrics.csv")
    assert pl.read_csv(log)["train/loss"].drop_nulls().len() == 20


def test_the_seed_decides_the_decoder(demo6: tuple[PreparedCache, Path], tmp_path: Path) -> None:
    cache, encoder_dir = demo6
    studies = Studies.from_cache(cache, (0.6, 0.2, 0.2), seed=0)
    entry = load_entry(str(encoder_dir), seed=0)
    protocol = Segmentation(max_steps=1, feature_size=4)
    runs = [
        protocol.run(_context(entry, cache, studies, tmp_path / str(i), seed)).tables["per_study"]
        for i, seed in enumerate((0, 0, 1))
    ]
    assert runs[0].equals(runs[1])
    assert not runs[0].equals(runs[2])


def test_encoders_the_decoder_cannot_follow_are_skipped_with_the_reason(tiny_encoder_dir: Path) -> None:
    protocol = Segmentation()
    # The shared tiny vit3d has 2 blocks and a 32-voxel patch: UNETR needs 4 skips, from 4 blocks.
    reason = protocol.unavailable(load_entry(str(tiny_encoder_dir), seed=0))
    assert reason is not None and "too few blocks" in reason
    xyz = load_entry("vit3d_tiny", seed=0)
    xyz.module = fm3d.create_encoder("vit3d_tiny", axis_order="xyz")
    assert "'xyz'" in protocol.unavailable(xyz)


def test_data_that_does_not_fit_is_refused_naming_the_fix(
    demo6: tuple[PreparedCache, Path], eval_cohort: Path, tmp_path: Path
) -> None:
    cache, encoder_dir = demo6
    entry = load_entry(str(encoder_dir), seed=0)
    original = PreparedCache(eval_cohort / "cache")  # 3 x 1.5 x 1.5 mm, the encoder expects 6 mm
    studies = Studies.from_cache(original, (0.6, 0.2, 0.2), seed=0)
    with pytest.raises(ProtocolError, match=r"expects \[6.0, 6.0, 6.0\] mm.*fm3d prepare --spacing"):
        Segmentation().run(_context(entry, original, studies, tmp_path))
    studies = Studies.from_cache(cache, (0.6, 0.2, 0.2), seed=0)
    with pytest.raises(ProtocolError, match=r"protocols.segmentation.class_names.*\['pancreas'\]"):
        Segmentation(class_names=["liver", "pancreas"]).run(_context(entry, cache, studies, tmp_path))
    with pytest.raises(ProtocolError, match="max_steps"):
        build_protocol("segmentation", {"max_steps": -1})


@pytest.fixture(scope="module")
def totalseg(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> PreparedCache:
    """The real TotalSegmentator CT and its label map through `fm3d prepare`, naming four organs."""
    source = shared_data / "ct" / "totalsegmentator"
    names = pl.read_csv(source / "labels_total_v2.tsv", separator="\t")
    organs = names.filter(pl.col("name").is_in(ORGANS))
    root = tmp_path_factory.mktemp("segmentation_totalseg")
    # labels.json beside the manifest names the organs to segment; fm3d prepare copies it into the cache.
    (root / "labels.json").write_text(json.dumps({str(v): n for v, n in organs.iter_rows()}))
    pl.DataFrame(
        {
            "study_id": ["ts0"],
            "patient_id": ["p0"],
            "image_path": [str(source / "example_ct_sm.nii.gz")],
            "label_path": [str(source / "example_seg.nii.gz")],
        }
    ).write_csv(root / "manifest.csv")
    spacing = [str(s) for s in SPACING_MM]
    argv = ["prepare", "--manifest", str(root / "manifest.csv"), "--out", str(root / "cache"),
            "--spacing", *spacing, "--no-progress"]  # fmt: skip
    assert fm3d_main(argv) == 0
    return PreparedCache(root / "cache")


def test_real_ct_trained_decoder_beats_the_untrained_one(totalseg: PreparedCache, tmp_path: Path) -> None:
    """On the one real CT, prepared by `fm3d prepare` at 6 mm (15 x 50 x 61 voxels).

    There is only one real CT with a label map, so it is both the train and the test study:
    the Dice here measures how well the decoder fits the study it was trained on, not how it
    generalises. What that can check: the figures are MONAI's Dice of the saved predictions,
    and training (same seed, so the same initial decoder) beats the untrained decoder.
    """
    studies = Studies(pl.DataFrame({"study_id": ["ts0", "ts0"], "patient_id": ["p0", "p0"],
                                    "split": ["train", "test"]}))  # fmt: skip
    entry = load_entry(str(_tiny_encoder(tmp_path, (16, 32, 32))), seed=0)
    settings = {"feature_size": 8, "lr": 1e-2, "batch_size": 2}
    results = {}
    for steps in (0, REAL_STEPS):
        work_dir = tmp_path / f"steps_{steps}"
        result = Segmentation(max_steps=steps, **settings).run(_context(entry, totalseg, studies, work_dir))
        assert result.study_ids == ["ts0"]
        assert result.tables["per_class"]["class"].to_list() == list(ORGANS)
        _assert_predictions_match_monai(result, totalseg, work_dir)
        results[steps] = result.score(np.array([0]))
    untrained, trained = results[0], results[REAL_STEPS]
    assert trained["dice_macro"] > untrained["dice_macro"] + 0.1, (trained, untrained)
    assert trained["dice/liver"] > 0.5, trained
