"""Report generation: encoder tokens -> projector -> a Hugging Face causal LM (M3D-LaMed's recipe).

The LM input is [image tokens][prompt tokens][report tokens][eos]: the projector's
`num_tokens` image embeddings (`downstream.heads.projector`) and the embedded prompt are
prepended as `inputs_embeds`, and the next-token loss counts only the report tokens and the
end-of-sequence token. Two stages:

- stage 1: the projector trains; encoder and LM are frozen (the LM also stays in eval mode).
- stage 2: LoRA adapters (peft) on the LM train with the projector; `init_from` loads the
  projector of a stage-1 checkpoint.

The encoder follows `strategy` (frozen by default). Generation (validation when
`generate_on_val`, test, predict) is HF `generate` from the prefix embeddings, greedy
(`num_beams: 1`) or beam search. Metrics (`fm3d.metrics.report_text`, offline): BLEU-1..4,
ROUGE-L, METEOR only where nltk's WordNet data is installed (the evaluation's `metric_notes`
table says when it is skipped), and the clinical-finding F1: with `finding_reader` set to a
CLIP folder, the findings of generated and reference reports are read by CLIP's text side with
the zero-shot prompt pairs of `finding_prompt_set` (P(present) >= 0.5 by
`downstream.language.prompts.read_findings`), and the generated ones are scored against the
reference ones. Checkpoints hold the projector, LoRA adapters and encoder, not the frozen LM or
the reader (both reloaded from their paths).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from downstream.base import DownstreamTask, Evaluation, StepOutput
from downstream.data import ReportDataModule
from downstream.heads.projector import ProjectorConfig, build_projector
from downstream.language.causal_lm import add_lora, load_causal_lm
from downstream.language.clip_eval import LanguageTaskError
from downstream.language.prompts import encode_prompts, load_prompt_set, read_findings
from downstream.registry import register_task
from fm3d.clip import load_clip
from fm3d.metrics.report_text import finding_f1, meteor_unavailable, text_metrics
from fm3d.text import clean_report

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value the HF loss skips
EXAMPLES_IN_REPORT = 20


@register_task("report_generation")
class ReportGenerationTask(DownstreamTask):
    """CT report generation (see the module docstring).

    Args:
        encoder: image encoder (export folder, .ckpt, registry name, module).
        language_model: HF causal LM folder or hub name (GPT-2, LLaMA, Phi, ...).
        projector: spatial pooling (M3D) or perceiver resampler, and its size.
        stage: 1 trains the projector only; 2 adds LoRA adapters to the LM.
        init_from: a stage-1 checkpoint whose projector weights start stage 2.
        prompt: text between the image tokens and the report (e.g. "Findings:"); "" for none.
        max_report_tokens: reports are truncated to this many tokens for training.
        max_new_tokens, num_beams: generation length and beam width (1 = greedy).
        generate_on_val: also generate (and score text) at every validation epoch.
        lora_rank, lora_alpha, lora_dropout, lora_targets: stage-2 adapters (targets None: peft's
            default projections for the LM's architecture).
        finding_reader: CLIP folder whose text side reads findings for the clinical F1; None skips it.
        finding_prompt_set: prompt set naming the findings the reader looks for.
        lm_dtype: LM weights' dtype (e.g. "bfloat16" on a GPU); None keeps the saved dtype.
        lr, weight_decay: as in DownstreamTask, with the defaults of M3D-LaMed's projector training.
        kwargs: strategy, warmup_steps, encoder_overrides (see DownstreamTask).
    """

    datamodule_class = ReportDataModule

    def __init__(
        self,
        encoder: str | nn.Module,
        language_model: str,
        projector: ProjectorConfig | None = None,
        stage: int = 1,
        init_from: str | None = None,
        prompt: str = "",
        max_report_tokens: int = 256,
        max_new_tokens: int = 128,
        num_beams: int = 1,
        generate_on_val: bool = True,
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
        finding_reader: str | None = None,
        finding_prompt_set: str | None = "demo",
        lm_dtype: str | None = None,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(encoder, lr=lr, weight_decay=weight_decay, **kwargs)
        if stage not in (1, 2):
            raise LanguageTaskError(f"report generation stage must be 1 or 2, got {stage}")
        self.stage = stage
        self.projector_config = projector or ProjectorConfig()
        lm, self.tokenizer = load_causal_lm(language_model, lm_dtype)
        lm.requires_grad_(False)
        self.language_model = (
            add_lora(lm, lora_rank, lora_alpha, lora_dropout, lora_targets) if stage == 2 else lm
        )
        self.lm_width = int(lm.get_input_embeddings().embedding_dim)
        self.projector = build_projector(self.projector_config, self.encoder.embed_dim, self.lm_width)
        if init_from:
            self._load_projector(init_from)
        self.prompt = prompt
        self.max_report_tokens, self.max_new_tokens = max_report_tokens, max_new_tokens
        self._check_positions(lm, language_model)
        self.num_beams, self.generate_on_val = num_beams, generate_on_val
        self.finding_reader = (
            load_clip(finding_reader).requires_grad_(False).eval() if finding_reader else None
        )
        self.reader_prompt_set = load_prompt_set(finding_prompt_set)
        self.finding_names = list(self.reader_prompt_set.findings)
        self._reader_prompts: torch.Tensor | None = None
        # The frozen LM and the reader are not stored in checkpoints (see on_save_checkpoint).
        self.strict_loading = False

    def _check_positions(self, lm: nn.Module, source: str | Path) -> None:
        """Refuse an LM whose positions cannot hold image tokens + prompt + a whole report.

        Past its last position a GPT-2 fails deep inside the forward pass with a bare IndexError.
        """
        config = lm.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        image = self.projector_config.num_tokens
        prompt = len(self.tokenizer(self.prompt, add_special_tokens=False)["input_ids"]) if self.prompt else 0
        report = max(self.max_report_tokens + 1, self.max_new_tokens)  # + 1: the end-of-report token
        if positions is not None and image + prompt + report > positions:
            raise LanguageTaskError(
                f"the language model {source} has {positions} positions, but {image} image tokens + "
                f"{prompt} prompt tokens + {report} report tokens need {image + prompt + report}: lower "
                "model.max_report_tokens / model.max_new_tokens, use fewer image tokens, or an LM with "
                "more positions (`fm3d causal-lm --max-length N`)"
            )

    # ---- model ----------------------------------------------------------------------------
    def train(self, mode: bool = True) -> ReportGenerationTask:
        super().train(mode)
        if self.stage == 1:
            self.language_model.eval()  # frozen: no dropout
        if self.finding_reader is not None:
            self.finding_reader.eval()
        return self

    def _load_projector(self, path: str) -> None:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        state = {
            k[len("projector.") :]: v
            for k, v in checkpoint.get("state_dict", {}).items()
            if k.startswith("projector.")
        }
        if not state:
            raise LanguageTaskError(
                f"{path} holds no projector weights; pass a report_generation (stage 1) checkpoint"
            )
        try:
            self.projector.load_state_dict(state)
        except RuntimeError as exc:
            raise LanguageTaskError(f"the projector in {path} does not match model.projector: {exc}") from exc
        logger.info("projector loaded from %s", path)

    def _embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.language_model.get_input_embeddings()(ids)

    def prefix(self, image: torch.Tensor) -> torch.Tensor:
        """LM input embeddings [B, T, W] of the image tokens followed by the prompt."""
        out = self.encoder(self.prepare_image(image))
        embed_dtype = self.language_model.get_input_embeddings().weight.dtype
        prefix = self.projector(out.tokens, out.grid).to(embed_dtype)  # [B, num_tokens, W]
        if self.prompt:
            ids = self.tokenizer(self.prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            prompt = self._embed_tokens(ids.to(self.device)).expand(len(prefix), -1, -1)
            prefix = torch.cat([prefix, prompt], dim=1)
        return prefix

    def loss(self, image: torch.Tensor, reports: list[str]) -> torch.Tensor:
        """Next-token cross-entropy over the report tokens (and eos) given the image prefix."""
        prefix = self.prefix(image)
        tokens = self.tokenizer(
            [r + self.tokenizer.eos_token for r in reports],
            add_special_tokens=False,
            truncation=True,
            max_length=self.max_report_tokens,
            padding=True,
            return_tensors="pt",
        ).to(self.device)
        ids, mask = tokens["input_ids"], tokens["attention_mask"]
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        b, t = prefix.shape[:2]
        inputs = torch.cat([prefix, self._embed_tokens(ids)], dim=1)
        attention = torch.cat([torch.ones(b, t, dtype=mask.dtype, device=self.device), mask], dim=1)
        labels = torch.cat(
            [torch.full((b, t), IGNORE_INDEX, dtype=labels.dtype, device=self.device), labels], dim=1
        )
        return self.language_model(inputs_embeds=inputs, attention_mask=attention, labels=labels).loss

    @torch.no_grad()
    def generate(
        self,
        image: torch.Tensor,
        num_beams: int | None = None,
        max_new_tokens: int | None = None,
        **options: Any,
    ) -> list[str]:
        """Reports for a batch of HU images [B, 1, D, H, W] (greedy when num_beams is 1).

        `options` go to HF `generate` as they are (e.g. `min_new_tokens`, `repetition_penalty`).
        """
        prefix = self.prefix(image)
        attention = torch.ones(prefix.shape[:2], dtype=torch.long, device=self.device)
        ids = self.language_model.generate(
            inputs_embeds=prefix,
            attention_mask=attention,
            max_new_tokens=max_new_tokens or self.max_new_tokens,
            num_beams=num_beams or self.num_beams,
            do_sample=False,
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
            **options,
        )
        # With inputs_embeds only, generate returns just the new tokens.
        return [text.strip() for text in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    # ---- loop -----------------------------------------------------------------------------
    def step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        reports = list(batch["report"])
        loss = self.loss(batch["image"], reports)
        collect: dict[str, Any] = {}
        if stage == "test" or (stage == "val" and self.generate_on_val):
            collect = {
                "study_id": list(batch["study_id"]),
                "reference": reports,
                "generated": self.generate(batch["image"]),
            }
        return StepOutput(loss, collect)

    def reader_prompts(self) -> torch.Tensor:
        """The finding reader's prompt-pair embeddings [K, M, 2, P]."""
        if self._reader_prompts is None or self._reader_prompts.device != self.device:
            prompts = self.reader_prompt_set.prompts(self.finding_names)
            self._reader_prompts = encode_prompts(self.finding_reader, prompts)
        return self._reader_prompts

    def read_findings(self, texts: list[str]) -> np.ndarray:
        """Findings [N, K] present in report texts, read by the CLIP text side (P >= 0.5)."""
        return read_findings(self.finding_reader, texts, self.reader_prompts()).numpy() >= 0.5

    def summarize(self, collected: dict[str, Any], stage: str) -> Evaluation:
        generated, reference = collected["generated"], collected["reference"]
        metrics = text_metrics(generated, reference)
        reason = meteor_unavailable()
        notes = [{"metric": "meteor", "note": reason or "computed with nltk"}]
        tables = {}
        if self.finding_reader is not None:
            scores = finding_f1(self.read_findings(generated), self.read_findings(reference))
            metrics.update({"finding_f1_micro": scores["micro"], "finding_f1_macro": scores["macro"]})
            tables["finding_f1"] = pl.DataFrame({"finding": self.finding_names, "f1": scores["per_finding"]})
            notes.append(
                {
                    "metric": "finding_f1",
                    "note": f"findings read by CLIP prompt pairs ({self.reader_prompt_set.name})",
                }
            )
        else:
            notes.append(
                {"metric": "finding_f1", "note": "skipped: no model.finding_reader (CLIP folder) given"}
            )
        if reason:
            logger.warning(reason)
        n = min(EXAMPLES_IN_REPORT, len(generated))
        tables["examples"] = pl.DataFrame(
            {
                "study_id": collected["study_id"][:n],
                "reference": [clean_report(t) for t in reference[:n]],  # one line per markdown cell
                "generated": [clean_report(t) for t in generated[:n]],
            }
        )
        tables["metric_notes"] = pl.DataFrame(notes)
        return Evaluation(self.task_name, metrics, tables)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """The generated report of every study."""
        return {"study_id": list(batch["study_id"]), "report": self.generate(batch["image"])}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in list(state):
            frozen_lm = key.startswith("language_model.") and "lora_" not in key
            if frozen_lm or key.startswith("finding_reader."):
                del state[key]
        checkpoint["fm3d_report_generation"] = {
            "stage": self.stage,
            "language_model": self.hparams.language_model,
        }
