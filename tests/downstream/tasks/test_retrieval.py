"""Retrieval: the task through `fm3d finetune test` / `fm3d evaluate` on the demo cohort (metrics vs a
direct ranking and sklearn), the on-disk embedding cache, and report-CSV plumbing on CT-RATE's reports."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file
from sklearn.metrics import label_ranking_average_precision_score

from downstream.cli import build_cli
from downstream.evaluate import main as evaluate
from downstream.tasks.retrieval import embed_texts
from fm3d.clip import ClipConfig, ClipModel, load_clip
from fm3d.data.tables import ReportTable, study_id_from_name
from fm3d.metrics.retrieval import retrieval_metrics
from fm3d.text import TextTower, init_text_model

CT_RATE = "reports/ct_rate/validation_reports_subset.csv"


def recall_by_ranking(scores: np.ndarray, k: int) -> float:
    """Share of queries whose own item (the diagonal) is among the k best (no ties in float scores)."""
    order = np.argsort(-scores, axis=1)[:, :k]
    return float(np.mean([i in order[i] for i in range(len(scores))]))


def cli_args(kit: SimpleNamespace, conf, run, cache) -> list[str]:
    return [
        "--config", str(conf / "retrieval.yaml"), "--model.encoder", str(kit.encoder),
        "--model.clip", str(kit.clip), "--model.embedding_cache", str(cache),
        "--data.cache_dir", str(kit.cache), "--data.image_size", "[16, 32, 32]",
        "--data.loader.num_workers", "0",
        "--data.loader.batch_size", "3", "--data.loader.fixed_splits", f"{{test: {kit.studies}}}",
        "--data.report_columns", "[findings, impression]",  # the kit's CLIP text (the YAML reads impressions)
        "--trainer.default_root_dir", str(run), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def test_retrieval_through_the_cli(language_kit: SimpleNamespace, cli_kit: SimpleNamespace, tmp_path) -> None:
    run, cache = tmp_path / "run", tmp_path / "embeddings"
    args = cli_args(language_kit, cli_kit.conf, run, cache)
    out = tmp_path / "evaluation"
    assert evaluate([*args, "--out", str(out)]) == 0
    metrics = dict(pl.read_csv(out / "metrics.csv").select("metric", "value").iter_rows())
    assert (out / "recall_at_k.png").stat().st_size > 0
    assert pl.read_csv(out / "recall_at_k.csv").height == 8  # 2 directions x K in 1, 5, 10, 50
    assert "eval/image_to_report_mAP" in cli_kit.runs(run)[-1].data.metrics

    # Independent reference: embed every study ourselves, rank by cosine, compare.
    folders = list(cache.iterdir())
    assert len(folders) == 1
    image = load_file(str(folders[0] / "image.safetensors"))
    text = load_file(str(folders[0] / "text.safetensors"))
    assert sorted(image) == sorted(text) == sorted(language_kit.studies)  # keyed by study_id
    clip = load_clip(language_kit.clip).eval()
    reports = [language_kit.reports[s] for s in language_kit.studies]
    assert torch.allclose(
        torch.stack([text[s] for s in language_kit.studies]), embed_texts(clip, reports), atol=1e-5
    )
    scores = (torch.stack([image[s] for s in language_kit.studies]) @ embed_texts(clip, reports).T).numpy()
    for k in (1, 5):
        assert metrics[f"image_to_report_recall_at_{k}"] == pytest.approx(recall_by_ranking(scores, k))
        assert metrics[f"report_to_image_recall_at_{k}"] == pytest.approx(recall_by_ranking(scores.T, k))
    assert metrics["image_to_report_recall_at_50"] == 1.0  # 8 studies: K beyond the gallery finds everything
    eye = np.eye(len(scores), dtype=bool)
    assert metrics["image_to_report_mAP"] == pytest.approx(label_ranking_average_precision_score(eye, scores))
    assert metrics["report_to_image_mAP"] == pytest.approx(
        label_ranking_average_precision_score(eye, scores.T)
    )

    # The image embeddings are the encoder's pooled output through CLIP's image projection.
    cli = build_cli(args, run=False)
    cli.datamodule.setup("test")
    batch = next(iter(cli.datamodule.test_dataloader()))
    task = cli.model.eval()
    with torch.no_grad():
        pooled = task.encoder(task.prepare_image(batch["image"])).pooled
        expected = clip.encode_image(pooled)
    assert torch.allclose(torch.stack([image[s] for s in batch["study_id"]]), expected, atol=1e-5)


def test_embedding_cache_is_reused_and_invalidated(
    language_kit: SimpleNamespace, cli_kit: SimpleNamespace, tmp_path
) -> None:
    cache = tmp_path / "embeddings"
    clip_copy = tmp_path / "clip"
    shutil.copytree(language_kit.clip, clip_copy)
    kit = SimpleNamespace(**{**vars(language_kit), "clip": clip_copy})

    def run_test(name: str):
        cli = build_cli(["test", *cli_args(kit, cli_kit.conf, tmp_path / name, cache)])
        return cli.model

    first = run_test("first")
    assert first.computed == {"image": 8, "text": 8}
    second = run_test("second")
    assert second.computed == {"image": 0, "text": 0}  # everything read back from disk
    assert second.evaluation.metrics == first.evaluation.metrics

    # Changing the CLIP files (new heads) gives a new fingerprint: everything is recomputed.
    clip = load_clip(clip_copy)
    with torch.no_grad():
        clip.image_projection.weight.mul_(-1)
    from fm3d.clip import save_clip

    save_clip(clip, clip_copy)
    third = run_test("third")
    assert third.computed == {"image": 8, "text": 8}
    assert len(list(cache.iterdir())) == 2


def test_report_csv_tokenisation_and_text_retrieval_on_ct_rate(shared_data, tmp_path) -> None:
    path = shared_data / CT_RATE
    raw = pl.read_csv(path)
    findings, impressions, both = (
        {s: table.get(s) for s in table.study_ids_with_text()}
        for table in (
            ReportTable.read(path, columns, id_column="VolumeName")
            for columns in (["Findings_EN"], ["Impressions_EN"], ["Findings_EN", "Impressions_EN"])
        )
    )
    assert study_id_from_name("valid_1_a_1.nii.gz") == "valid_1_a_1"
    assert set(both) == {study_id_from_name(v) for v in raw["VolumeName"]}
    first = raw.row(0, named=True)
    assert both["valid_1_a_1"] == f"{first['Findings_EN'].strip()}\n{first['Impressions_EN'].strip()}"

    ids = [s for s in findings if s in impressions][:200]
    text_model = init_text_model(
        tmp_path / "text", [findings[s] for s in ids], vocab_size=600, hidden_size=32, num_layers=1,
        num_heads=2, max_length=512,
    )  # fmt: skip
    tower = TextTower(text_model, pooling="mean", max_length=512)
    tokens = tower.tokenize([findings[ids[0]]])
    decoded = tower.tokenizer.decode(tokens["input_ids"][0], skip_special_tokens=True)
    # the WordPiece round trip gives the (lowercased) report back
    assert decoded.startswith("trachea, both main bronchi are open.")
    assert tower.tokenizer.convert_ids_to_tokens(tokens["input_ids"][0])[:3] == ["[CLS]", "trachea", ","]
    long = max(ids, key=lambda s: len(findings[s]))
    assert tower.tokenize([findings[long]])["input_ids"].shape[1] <= 512  # truncated to max_length

    torch.manual_seed(0)
    clip = ClipModel(
        ClipConfig(image_embed_dim=8, text_model=str(text_model), proj_dim=32, pooling="mean")
    ).eval()
    f = embed_texts(clip, [findings[s] for s in ids])
    i = embed_texts(clip, [impressions[s] for s in ids])
    # findings -> findings: every report finds itself (identical reports count as relevant)
    texts = [findings[s] for s in ids]
    same = torch.tensor([[a == b for b in texts] for a in texts])
    itself = retrieval_metrics(f @ f.T, same, ks=(1,), prefixes=("a", "b"))
    assert itself["a_recall_at_1"] == pytest.approx(1.0) and itself["a_mAP"] == pytest.approx(1.0, abs=1e-6)
    # findings -> impression of the same study: metrics as sklearn / a direct ranking compute them
    scores = (f @ i.T).numpy()
    metrics = retrieval_metrics(f @ i.T, ks=(1, 10, 50), prefixes=("f2i", "i2f"))
    eye = np.eye(len(ids), dtype=bool)
    assert metrics["f2i_mAP"] == pytest.approx(label_ranking_average_precision_score(eye, scores))
    assert metrics["i2f_recall_at_10"] == pytest.approx(recall_by_ranking(scores.T, 10))


def test_retrieval_reads_a_ct_rate_style_report_csv(
    language_kit: SimpleNamespace, cli_kit: SimpleNamespace, tmp_path
) -> None:
    manifest = pl.read_parquet(language_kit.cohort / "manifest.parquet")
    csv = tmp_path / "reports.csv"
    manifest.select(
        pl.concat_str(pl.col("study_id"), pl.lit(".nii.gz")).alias("VolumeName"),
        pl.col("findings").alias("Findings_EN"),
        pl.col("impression").alias("Impressions_EN"),
    ).head(6).write_csv(csv)  # two studies without a report row: left out
    args = cli_args(language_kit, cli_kit.conf, tmp_path / "run", tmp_path / "embeddings")
    args += ["--data.reports", str(csv), "--data.id_column", "VolumeName"]
    args += ["--data.report_columns", "[Findings_EN, Impressions_EN]"]
    args += ["--data.loader.fixed_splits", f"{{test: {language_kit.studies[:6]}}}"]
    task = build_cli(["test", *args]).model
    assert "gallery_size" not in task.evaluation.metrics  # a count: in the table, not a metric
    assert set(task.evaluation.tables["recall_at_k"]["gallery_size"].to_list()) == {6}
    text = load_file(str(next((tmp_path / "embeddings").iterdir()) / "text.safetensors"))
    clip = load_clip(language_kit.clip).eval()
    ids = language_kit.studies[:6]
    expected = embed_texts(clip, [language_kit.reports[s] for s in ids])  # findings + "\n" + impression
    assert torch.allclose(torch.stack([text[s] for s in ids]), expected, atol=1e-5)
