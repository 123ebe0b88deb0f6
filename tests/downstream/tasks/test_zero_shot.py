"""Zero-shot: pair-softmax arithmetic by hand, prompt sets (CT-RATE's 18 names), and the task through
`fm3d finetune test` / `fm3d evaluate` on the demo cohort with a CLIP export."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from sklearn.metrics import roc_auc_score

from downstream.cli import build_cli
from downstream.cli import main as finetune
from downstream.evaluate import main as evaluate
from downstream.language.clip_eval import LanguageTaskError
from downstream.language.prompts import (
    PromptSetError,
    encode_prompts,
    list_prompt_sets,
    load_prompt_set,
    pair_probabilities,
)
from fm3d.clip import load_clip

# CT-CLIP scripts/zero_shot.py `pathologies`, in its order.
CT_RATE_18 = [
    "Medical material", "Arterial wall calcification", "Cardiomegaly", "Pericardial effusion",
    "Coronary artery wall calcification", "Hiatal hernia", "Lymphadenopathy", "Emphysema", "Atelectasis",
    "Lung nodule", "Lung opacity", "Pulmonary fibrotic sequela", "Pleural effusion",
    "Mosaic attenuation pattern", "Peribronchial thickening", "Consolidation", "Bronchiectasis",
    "Interlobular septal thickening",
]  # fmt: skip


def test_pair_softmax_matches_a_hand_computed_case() -> None:
    image = torch.tensor([[1.0, 0.0]])
    # one finding, two templates: (present, absent) embeddings, already unit length
    prompts = torch.tensor([[[[0.6, 0.8], [1.0, 0.0]], [[0.0, 1.0], [0.8, 0.6]]]])
    scale = 2.0
    # template 1: logits 1.2 vs 2.0; template 2: 0.0 vs 1.6
    p1 = math.exp(1.2) / (math.exp(1.2) + math.exp(2.0))
    p2 = 1.0 / (1.0 + math.exp(1.6))
    got = pair_probabilities(image, prompts, scale)
    assert got.shape == (1, 1)
    assert got.item() == pytest.approx((p1 + p2) / 2, abs=1e-6)
    assert pair_probabilities(image, prompts[:, :1], scale).item() == pytest.approx(p1, abs=1e-6)


def test_ct_rate_prompt_set_has_ct_clips_18_abnormalities() -> None:
    assert {"ct_rate", "demo"} <= set(list_prompt_sets())
    ct_rate = load_prompt_set("ct_rate")
    assert list(ct_rate.findings) == CT_RATE_18
    prompts = ct_rate.prompts(["Lung nodule"])
    assert prompts[0][0] == ("Lung nodule is present.", "Lung nodule is not present.")
    assert len(prompts[0]) == len(ct_rate.templates) > 1
    # a column outside the set is read as its own phrase; templates can be replaced
    custom = load_prompt_set("ct_rate", templates=[["{finding} seen.", "no {finding} seen."]])
    assert custom.prompts(["kidney_cyst"]) == [[("Kidney cyst seen.", "No kidney cyst seen.")]]
    with pytest.raises(PromptSetError, match="ct_rate"):
        load_prompt_set("no_such_set")
    with pytest.raises(PromptSetError, match="pair"):
        load_prompt_set(None, templates=[["{finding} is present."]])


def test_zero_shot_through_the_cli(language_kit: SimpleNamespace, cli_kit: SimpleNamespace, tmp_path) -> None:
    cohort, run = language_kit.cohort, tmp_path / "run"
    args = [
        "--config", str(cli_kit.conf / "zero_shot.yaml"), "--model.encoder", str(language_kit.encoder),
        "--model.clip", str(language_kit.clip), "--data.cache_dir", str(language_kit.cache),
        "--data.labels", str(cohort / "findings.parquet"), "--data.image_size", "[16, 32, 32]",
        "--data.loader.num_workers", "0", "--data.loader.batch_size", "3",
        "--data.loader.fixed_splits", f"{{val: {language_kit.studies}, test: {language_kit.studies}}}",
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    assert finetune(["validate", *args]) == 0
    out = tmp_path / "evaluation"
    assert evaluate([*args, "--out", str(out)]) == 0
    per_class = pl.read_csv(out / "per_class.csv")
    findings = pl.read_parquet(cohort / "findings.parquet")
    names = [c for c, t in findings.schema.items() if t == pl.Boolean]
    assert per_class["class"].to_list() == names
    assert per_class["prompt"][0] == "Pulmonary nodule is present."  # demo prompt set: lung_nodule
    assert (out / "roc_curves.png").stat().st_size > 0
    assert "eval/auroc_macro" in cli_kit.runs(run)[-1].data.metrics

    # The same probabilities by hand: encoder -> CLIP image side; prompts through CLIP's text side.
    cli = build_cli(args, run=False)  # no subcommand: instantiate only
    task = cli.model.eval()
    cli.datamodule.setup("test")
    batch = next(iter(cli.datamodule.test_dataloader()))
    clip = load_clip(language_kit.clip).eval()
    with torch.no_grad():
        image = clip.encode_image(task.encoder(task.prepare_image(batch["image"])).pooled)
        prompt_set = load_prompt_set("demo")
        sentences = prompt_set.prompts(names)
        text = torch.stack(
            [torch.stack([clip.encode_text(list(pair)) for pair in per_finding]) for per_finding in sentences]
        )  # [K, M, 2, P]
        logits = clip.scale() * torch.einsum("bp,kmsp->bkms", image, text)
        expected = (logits[..., 0].exp() / logits.exp().sum(-1)).mean(-1)
        assert torch.allclose(task(batch["image"]), expected, atol=1e-5)
        assert torch.allclose(encode_prompts(clip, sentences), text, atol=1e-6)

    # AUROC per class as sklearn computes it from the collected probabilities
    labels, probs = task_probabilities(cli)
    for k, name in enumerate(names):
        y = labels[:, k]
        auroc = per_class.filter(pl.col("class") == name)["auroc"][0]
        if len(np.unique(y)) == 2:
            assert auroc == pytest.approx(roc_auc_score(y, probs[:, k]), abs=1e-6)
        else:
            assert auroc is None or math.isnan(auroc)


def task_probabilities(cli) -> tuple[np.ndarray, np.ndarray]:
    """Labels and zero-shot probabilities of the whole test split."""
    labels, probs = [], []
    with torch.no_grad():
        for batch in cli.datamodule.test_dataloader():
            labels.append(batch["labels"].numpy())
            probs.append(cli.model(batch["image"]).numpy())
    return np.concatenate(labels), np.concatenate(probs)


def test_zero_shot_refuses_to_train(
    language_kit: SimpleNamespace, cli_kit: SimpleNamespace, tmp_path, capsys: pytest.CaptureFixture
) -> None:
    args = [
        "fit", "--config", str(cli_kit.conf / "zero_shot.yaml"), "--model.encoder", str(language_kit.encoder),
        "--model.clip", str(language_kit.clip), "--data.cache_dir", str(language_kit.cache),
        "--data.labels", str(language_kit.cohort / "findings.parquet"), "--data.image_size", "[16, 32, 32]",
        "--data.loader.num_workers", "0", "--trainer.default_root_dir", str(tmp_path / "run"),
        "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    # A user error: raised, or printed as one line once the CLI lists it among its user errors.
    try:
        status, message = finetune(args), capsys.readouterr().err
    except LanguageTaskError as exc:
        status, message = 2, str(exc)
    assert status == 2 and "does not train" in message


def test_mismatched_clip_and_encoder_are_refused(language_kit: SimpleNamespace) -> None:
    from downstream.tasks.zero_shot import ZeroShotTask

    with pytest.raises(LanguageTaskError, match="32-d image embeddings but the encoder gives"):
        ZeroShotTask(
            "vit3d_tiny",
            str(language_kit.clip),
            ["emphysema"],
            encoder_overrides={
                "embed_dim": 48,
                "depth": 1,
                "num_heads": 2,
                "image_size": [16, 32, 32],
                "patch_size": 8,
            },
        )
