"""Report generation: loss on report tokens only (vs cross-entropy by hand), greedy generation vs an
argmax loop by hand, projector training, and stage 1 -> stage 2 (LoRA) -> evaluate through the CLI
with text metrics and the CLIP-read finding F1, on tiny GPT-2 / LLaMA models built offline."""

from __future__ import annotations

from types import SimpleNamespace

import polars as pl
import pytest
import torch
import torch.nn.functional as F

from downstream.cli import main as finetune
from downstream.evaluate import main as evaluate
from downstream.heads.projector import ProjectorConfig
from downstream.language.clip_eval import LanguageTaskError
from downstream.language.prompts import encode_prompts, load_prompt_set, read_findings
from downstream.tasks.report_generation import ReportGenerationTask
from fm3d.clip import load_clip
from fm3d.metrics.report_text import finding_f1, text_metrics

QUICK = ["--trainer.limit_val_batches", "0"]  # the CLI fits skip validation; evaluate generates


def make_task(kit: SimpleNamespace, family: str, **kwargs) -> ReportGenerationTask:
    torch.manual_seed(0)
    return ReportGenerationTask(
        str(kit.encoder),
        str(kit.lm[family]),
        projector=ProjectorConfig(pool_grid=(1, 2, 2)),
        prompt="Findings:",
        **kwargs,
    )


def images(n: int = 2) -> torch.Tensor:
    return torch.rand(n, 1, 16, 32, 32, generator=torch.Generator().manual_seed(0)) * 2000 - 1000


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_lm_too_short_for_image_prompt_and_report_is_refused(
    language_kit: SimpleNamespace, family: str
) -> None:
    # The tiny LMs have 512 positions; 4 image tokens + the prompt + 600 report tokens do not fit
    # (this was a bare IndexError inside GPT-2's forward pass).
    with pytest.raises(LanguageTaskError, match=r"has 512 positions.*max_report_tokens") as caught:
        make_task(language_kit, family, max_report_tokens=600)
    assert str(language_kit.lm[family]) in str(caught.value)
    make_task(language_kit, family, max_report_tokens=400)  # fits: no error


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_counts_only_report_tokens(language_kit: SimpleNamespace, family: str) -> None:
    task = make_task(language_kit, family).eval()
    reports = ["No pleural effusion.", "Mild emphysema. Splenomegaly."]
    image = images()
    with torch.no_grad():
        loss = task.loss(image, reports)
        # by hand: run the LM on [prefix][report][eos] and score only report + eos positions
        prefix = task.prefix(image)
        tok = task.tokenizer
        total, count = 0.0, 0
        for b, report in enumerate(reports):
            ids = tok(report + tok.eos_token, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
            inputs = torch.cat([prefix[b], task.language_model.get_input_embeddings()(ids)])[None]
            logits = task.language_model(inputs_embeds=inputs).logits[0]
            t = prefix.shape[1]
            # position j predicts token j + 1: report token i is predicted at t - 1 + i
            predicted = logits[t - 1 : t - 1 + len(ids)]
            total += F.cross_entropy(predicted, ids, reduction="sum").item()
            count += len(ids)
    assert prefix.shape[1] == 4 + len(tok("Findings:", add_special_tokens=False)["input_ids"])
    assert loss.item() == pytest.approx(total / count, rel=1e-4)


def test_greedy_generation_matches_an_argmax_loop(language_kit: SimpleNamespace) -> None:
    task = make_task(language_kit, "gpt2").eval()
    image = images(1)
    generated = task.generate(image, num_beams=1, max_new_tokens=6)
    with torch.no_grad():
        inputs = task.prefix(image)
        ids = []
        for _ in range(6):
            next_id = int(task.language_model(inputs_embeds=inputs).logits[0, -1].argmax())
            if next_id == task.tokenizer.eos_token_id:
                break
            ids.append(next_id)
            step = task.language_model.get_input_embeddings()(torch.tensor([[next_id]]))
            inputs = torch.cat([inputs, step], dim=1)
    assert generated == [task.tokenizer.decode(ids, skip_special_tokens=True).strip()]
    beams = task.generate(images(2), num_beams=3, max_new_tokens=6)
    assert len(beams) == 2 and all(isinstance(text, str) for text in beams)


def test_stage_one_trains_the_projector_only(language_kit: SimpleNamespace) -> None:
    task = make_task(language_kit, "llama")
    task.train()
    trainable = {n for n, p in task.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("projector.") for n in trainable)
    lm_before = {n: p.clone() for n, p in task.language_model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=1e-2)
    image, report = images(1), [language_kit.reports[language_kit.studies[0]][:200]]
    losses = []
    for _ in range(15):
        loss = task.loss(image, report)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    # A random tiny LM's logits are nearly flat whatever its input, so the prefix can only move the
    # loss a little; it must still go down.
    assert losses[-1] < losses[0] - 0.01
    assert all(torch.equal(p, lm_before[n]) for n, p in task.language_model.named_parameters())


def test_stage_one_two_and_evaluate_through_the_cli(
    language_kit: SimpleNamespace, cli_kit: SimpleNamespace, tmp_path
) -> None:
    studies, kit = language_kit.studies, language_kit
    base = [
        "--config", str(cli_kit.conf / "report_generation.yaml"), "--model.encoder", str(kit.encoder),
        "--model.language_model", str(kit.lm["gpt2"]), "--model.finding_reader", str(kit.clip),
        "--model.projector.pool_grid", "[1, 2, 2]", "--model.max_new_tokens", "12", "--model.lr", "0.01",
        "--model.warmup_steps", "0", "--data.cache_dir", str(kit.cache), "--data.image_size", "[16, 32, 32]",
        "--data.loader.num_workers", "0", "--data.loader.batch_size", "2",
        "--data.loader.fixed_splits", f"{{train: {studies[:6]}, val: {studies[6:]}, test: {studies[6:]}}}",
        "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1",
    ]  # fmt: skip
    stage1 = tmp_path / "stage1"
    assert (
        finetune(
            ["fit", *base, *QUICK, "--trainer.max_steps", "3", "--trainer.default_root_dir", str(stage1)]
        )
        == 0
    )
    checkpoint1 = next(stage1.rglob("*.ckpt"))
    state1 = torch.load(checkpoint1, weights_only=True)["state_dict"]
    assert not any(
        k.startswith(("language_model.", "finding_reader.")) for k in state1
    )  # reloaded from paths
    assert any(k.startswith("projector.") for k in state1)
    assert cli_kit.history(stage1, cli_kit.runs(stage1)[-1].info.run_id, "train/loss")

    stage2 = tmp_path / "stage2"
    stage2_args = [
        *base,
        "--model.stage",
        "2",
        "--model.init_from",
        str(checkpoint1),
        "--model.num_beams",
        "2",
    ]
    assert (
        finetune(
            [
                "fit",
                *stage2_args,
                *QUICK,
                "--trainer.max_steps",
                "2",
                "--trainer.default_root_dir",
                str(stage2),
            ]
        )
        == 0
    )
    checkpoint2 = next(stage2.rglob("*.ckpt"))
    state2 = torch.load(checkpoint2, weights_only=True)["state_dict"]
    lora = [k for k in state2 if k.startswith("language_model.") and "lora_" in k]
    assert lora and all("lora_" in k for k in state2 if k.startswith("language_model."))
    assert any(not torch.equal(state1[k], state2[k]) for k in state1 if k.startswith("projector."))

    out = tmp_path / "evaluation"
    eval_args = [*stage2_args, "--trainer.default_root_dir", str(stage2), "--ckpt_path", str(checkpoint2)]
    assert evaluate([*eval_args, "--out", str(out)]) == 0
    metrics = dict(pl.read_csv(out / "metrics.csv").select("metric", "value").iter_rows())
    examples = pl.read_csv(out / "examples.csv")
    assert examples["study_id"].to_list() == studies[6:]
    generated, reference = examples["generated"].fill_null("").to_list(), examples["reference"].to_list()
    # the table's metrics are those of its generated reports (reports are whitespace-normalised there)
    direct = text_metrics(generated, reference)
    for name in ("bleu1", "bleu2", "bleu3", "bleu4", "rouge_l"):
        assert metrics[name] == pytest.approx(direct[name], abs=1e-9)
    clip = load_clip(language_kit.clip).eval()
    prompt_set = load_prompt_set("demo")
    prompts = encode_prompts(clip, prompt_set.prompts(list(prompt_set.findings)))
    scores = finding_f1(
        read_findings(clip, generated, prompts) >= 0.5, read_findings(clip, reference, prompts) >= 0.5
    )
    assert metrics["finding_f1_micro"] == pytest.approx(scores["micro"], nan_ok=True)
    notes = dict(pl.read_csv(out / "metric_notes.csv").iter_rows())
    assert "meteor" in notes and ("METEOR skipped" in notes["meteor"]) == ("meteor" not in metrics)
    assert "CLIP prompt pairs" in notes["finding_f1"]
