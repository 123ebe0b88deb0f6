"""Zero-shot protocol: its AUROCs are sklearn's of its probabilities and equal what the downstream
zero-shot task computes on the same studies with the same encoder, CLIP and prompts."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import f1_score, roc_auc_score

from downstream.data import ClassificationDataModule
from downstream.evaluation.encoders import load_entry
from downstream.evaluation.protocol import EvalContext, ProtocolError, build_protocol
from downstream.evaluation.protocols.zero_shot import NO_TEXT_SIDE, ZeroShot
from downstream.tasks.zero_shot import ZeroShotTask
from fm3d.data.base import LoaderSettings

# conftest.protocol_context: (encoder folder, work dir[, fractions, label]) -> EvalContext.
ContextFactory = Callable[..., EvalContext]


def task_outputs(encoder: Path, cohort: Path, names: list[str], test: list[str]) -> tuple[dict, dict]:
    """The downstream zero-shot task's collected outputs and summary on the studies `test`."""
    task = ZeroShotTask(str(encoder), str(encoder.parent / "clip"), names, prompt_set="demo").eval()
    loader = LoaderSettings(batch_size=4, fixed_splits={"test": test})
    # The whole demo volume (48 x 96 x 96), as the features see it: no crop.
    data = ClassificationDataModule(
        cohort / "cache", cohort / "findings.parquet", names, (48, 96, 96), loader
    )
    data.setup("test")
    steps = [task.step(batch, "test").collect for batch in data.test_dataloader()]
    collected = {k: torch.cat([s[k] for s in steps]) for k in ("probs", "labels", "mask")}
    collected["study_id"] = [s for step in steps for s in step["study_id"]]
    evaluation = task.summarize(collected, "test")
    return collected, {**evaluation.metrics, "per_class": evaluation.tables["per_class"]}


def test_zero_shot_equals_sklearn_and_the_downstream_task(
    protocol_context: ContextFactory, eval_cohort: Path, clip_export: Path, tmp_path: Path
) -> None:
    context = protocol_context(clip_export, tmp_path, (0.25, 0.25, 0.5), "clip")
    protocol = build_protocol(
        "zero_shot", {"labels": str(eval_cohort / "findings.parquet"), "prompts": "demo"}
    )
    result = protocol.run(context)
    test = context.studies.ids("test")
    assert result.study_ids == test
    names = protocol.table.names
    collected, task = task_outputs(clip_export, eval_cohort, names, test)
    assert collected["study_id"] == test
    labels, probs = collected["labels"].numpy(), collected["probs"].double().numpy()
    # The cached features through CLIP's image side are what the task computes from the volumes.
    np.testing.assert_allclose(result.score.probabilities, probs, atol=1e-5)

    got = result.score(np.arange(len(test)))
    defined = 0
    for k, name in enumerate(names):
        y, p = labels[:, k], probs[:, k]
        if len(np.unique(y)) == 2:
            defined += 1
            assert got[f"auroc/{name}"] == pytest.approx(roc_auc_score(y, p), abs=1e-9)
            assert got[f"auroc/{name}"] == pytest.approx(task[f"auroc_{name}"], abs=1e-9)
            assert got[f"f1/{name}"] == pytest.approx(f1_score(y, p >= 0.5, zero_division=0.0), abs=1e-9)
            assert got[f"f1/{name}"] == pytest.approx(task["per_class"]["f1"][k], abs=1e-9)
        else:
            assert math.isnan(got[f"auroc/{name}"]) and math.isnan(task[f"auroc_{name}"])
    assert defined >= 3
    assert got["auroc_macro"] == pytest.approx(task["auroc_macro"], abs=1e-9)
    assert result.tables["per_label"].filter(pl.col("label") == "lung_nodule")["prompt"].item() == (
        "Pulmonary nodule is present."
    )

    # A bootstrap resample with repeats: sklearn on the resampled probabilities.
    rows = np.random.default_rng(0).integers(0, len(test), size=len(test))
    resampled = result.score(rows)
    for k, name in enumerate(names):
        y = labels[rows, k]
        if len(np.unique(y)) == 2:
            assert resampled[f"auroc/{name}"] == pytest.approx(roc_auc_score(y, probs[rows, k]), abs=1e-9)


def test_zero_shot_needs_a_text_side_and_says_which_setting_is_wrong(
    eval_cohort: Path, tiny_encoder_dir: Path, clip_export: Path
) -> None:
    labels = str(eval_cohort / "findings.parquet")
    assert ZeroShot(labels).unavailable(load_entry(str(tiny_encoder_dir), seed=0)) == NO_TEXT_SIDE
    assert ZeroShot(labels).unavailable(load_entry(str(clip_export), seed=0)) is None
    # The task's default prompts: each column read as its own phrase.
    protocol = ZeroShot(labels, label_columns=["kidney_cyst"])
    assert protocol.prompt_set.prompts(protocol.table.names) == [
        [("Kidney cyst is present.", "Kidney cyst is not present.")]
    ]
    with pytest.raises(ProtocolError, match=r"protocols.zero_shot.prompts: .*no_such_set"):
        ZeroShot(labels, prompts="no_such_set")
    with pytest.raises(ProtocolError, match=r"no label column\(s\) \['renal_mass'\].*protocols.zero_shot"):
        ZeroShot(labels, label_columns=["renal_mass"])
