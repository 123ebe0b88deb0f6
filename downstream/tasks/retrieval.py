"""Cross-modal retrieval with a pretrained CLIP: image -> report and report -> image, no training.

Every study of the split contributes its CT (gallery/query) and its report; study i's report is
the only correct match for its CT and vice versa. Metrics (`fm3d.metrics.retrieval`, ties scored
at chance): Recall@K for K in `ks` (default 1, 5, 10, 50) in both directions and mean average
precision, as `image_to_report_recall_at_K`, `report_to_image_mAP`, ...; the recall@K curve is a figure.

Embeddings are cached on disk by study_id (`embedding_cache`, default
`<trainer.default_root_dir>/embeddings`; see `downstream.language.embedding_cache`), so a second
evaluation with the same encoder/CLIP files and crop size skips the encoder. `embed_texts` and
`fm3d.data.tables.ReportTable` (a CT-RATE style CSV) serve text-only retrieval, e.g. findings vs
impressions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import polars as pl
import torch
import torch.nn.functional as F
from torch import nn

from downstream.base import Evaluation, StepOutput
from downstream.data import ReportDataModule
from downstream.language.clip_eval import ClipEvalTask
from downstream.language.embedding_cache import EmbeddingCache, fingerprint
from downstream.registry import register_task
from fm3d.clip import ClipModel
from fm3d.metrics.retrieval import retrieval_metrics

DIRECTIONS = ("image_to_report", "report_to_image")


@torch.no_grad()
def embed_texts(clip: ClipModel, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """Normalised joint-space embeddings [N, P] of report texts, in batches."""
    out = [
        clip.encode_text(list(texts[i : i + batch_size])).float().cpu()
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, clip.config.proj_dim)


@register_task("retrieval")
class RetrievalTask(ClipEvalTask):
    """CT <-> report retrieval (see the module docstring).

    Args:
        encoder: the image encoder CLIP was trained with (export folder, .ckpt, module).
        clip: the CLIP folder (`<run>/export/clip`).
        ks: the K of Recall@K (K beyond the gallery size counts every item: recall 1).
        embedding_cache: folder of cached embeddings; None = `<trainer.default_root_dir>/embeddings`.
        cache_embeddings: False recomputes everything and writes nothing.
        encoder_overrides: config overrides for a freshly created encoder (registry name only).
    """

    datamodule_class = ReportDataModule

    def __init__(
        self,
        encoder: str | nn.Module,
        clip: str | ClipModel,
        ks: list[int] = (1, 5, 10, 50),
        embedding_cache: str | None = None,
        cache_embeddings: bool = True,
        encoder_overrides: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(encoder, clip, encoder_overrides)
        self.ks = [int(k) for k in ks]
        self.embedding_cache = embedding_cache
        self.cache_embeddings = cache_embeddings
        self._cache: EmbeddingCache | None = None
        self._sources = [
            encoder if isinstance(encoder, str) and Path(encoder).exists() else self.encoder,
            clip if isinstance(clip, str) else self.clip,
        ]
        self.computed = {"image": 0, "text": 0}  # embeddings computed (not read from the cache)

    def _open_cache(self) -> EmbeddingCache | None:
        if not self.cache_embeddings:
            return None
        if self._cache is None:
            datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
            settings = {
                "image_size": list(getattr(datamodule, "image_size", ()) or ()),
                "hu_window": list(self.hu_window),
                "intensity_range": list(self.intensity_range),
                "report_columns": list(getattr(datamodule, "report_columns", ()) or ()),
            }
            root = self.embedding_cache or Path(self.trainer.default_root_dir) / "embeddings"
            self._cache = EmbeddingCache(root, fingerprint(self._sources, settings))
        return self._cache

    def embed(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image and report embeddings [B, P] of a batch, from the cache where it has them."""
        cache, ids, texts = self._open_cache(), list(batch["study_id"]), list(batch["report"])
        image = cache.get("image", ids) if cache else None
        if image is None:
            image = self.image_embeddings(batch["image"]).cpu()
            self.computed["image"] += len(ids)
            if cache:
                cache.put("image", ids, image)
        text = cache.get("text", ids, texts) if cache else None
        if text is None:
            text = embed_texts(self.clip, texts)
            self.computed["text"] += len(ids)
            if cache:
                cache.put("text", ids, text, texts)
        return image.to(self.device), text.to(self.device)

    def forward(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.embed(batch)

    def step(self, batch: dict[str, Any], stage: str) -> StepOutput:
        image, text = self.embed(batch)
        # Logged only: the batch's symmetric InfoNCE, as CLIP pretraining computes it.
        logits = self.clip.scale() * image @ text.T
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return StepOutput(
            loss, {"image_embedding": image, "text_embedding": text, "study_id": list(batch["study_id"])}
        )

    def on_validation_epoch_end(self) -> None:
        super().on_validation_epoch_end()
        self._save_cache()

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        self._save_cache()

    def on_predict_epoch_end(self) -> None:
        self._save_cache()

    def _save_cache(self) -> None:
        if self._cache is not None and self.global_rank == 0:
            self._cache.save()

    def summarize(self, collected: dict[str, Any], stage: str) -> Evaluation:
        image, text = collected["image_embedding"].float(), collected["text_embedding"].float()
        scores = image @ text.T  # [N images, N reports], cosine similarities
        metrics = retrieval_metrics(scores, ks=self.ks, prefixes=DIRECTIONS)
        # The gallery size (a count, not a metric) goes with the recall table it explains.
        rows = [
            {"direction": d, "k": k, "recall": metrics[f"{d}_recall_at_{k}"], "gallery_size": len(scores)}
            for d in DIRECTIONS
            for k in self.ks
        ]
        return Evaluation(self.task_name, metrics, {"recall_at_k": pl.DataFrame(rows)})

    def figures(self, collected: dict[str, Any], evaluation: Evaluation) -> dict[str, Any]:
        from downstream.plots import recall_at_k_figure

        curves = {d: {k: evaluation.metrics[f"{d}_recall_at_{k}"] for k in self.ks} for d in DIRECTIONS}
        return {"recall_at_k": recall_at_k_figure(curves)}

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Image and report embeddings per study (e.g. to build a search index)."""
        image, text = self.embed(batch)
        return {"study_id": list(batch["study_id"]), "image_embedding": image, "text_embedding": text}
