"""CT-report contrastive pretraining (CLIP / SigLIP) with embeddings gathered across ranks.

Each rank scores its own images against every rank's reports (and its reports against every
rank's images): the "local loss" of open_clip's `ClipLoss(local_loss=True,
gather_with_grad=True)`. The target of local row i on rank r is global column
`offset_r + i` (offset_r = rows held by lower ranks); M3D's local loss used `arange(B)` on
every rank, which points rank r > 0 at another rank's reports. Gathering keeps gradients
(`torch.distributed.nn.functional.all_gather`), and every per-rank loss is divided by
(valid rows in the global batch) / (world size), so the mean of the per-rank losses, the
objective DDP's gradient averaging optimises, is exactly the single-process loss of the
concatenated batch, also when ranks hold different numbers of rows.

Studies without a report (`has_report` False) still go through both towers; their rows
contribute 0 and their columns are excluded from every softmax / sigmoid sum.

The text tower trains "full", with "lora" adapters, or not at all ("frozen"): then the batch
carries each report's embedding from the data module's text-embedding cache
(`data.text_embeddings`, built by `fm3d text-cache build`), the tower is never loaded, and the
run refuses a cache built with other settings (`text_settings`, checked by
`pretrain.data_contract`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from fm3d.clip import ClipConfig, ClipModel
from fm3d.metrics.retrieval import recall_at_k, retrieval_metrics
from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.base import Objective, ObjectiveError, masked_mean, require, row_mask
from pretrain.objectives.gather import gather_rows, rank_and_world_size


def infonce_loss(
    image: torch.Tensor,
    text: torch.Tensor,
    all_image: torch.Tensor,
    all_text: torch.Tensor,
    offset: int,
    valid: torch.Tensor,
    all_valid: torch.Tensor,
    scale: torch.Tensor,
    world_size: int = 1,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows against the gathered batch (CLIP's loss).

    Args:
        image, text: this rank's normalised embeddings [B, P].
        all_image, all_text: every rank's embeddings [N, P] (this rank's at `offset`).
        valid, all_valid: bool [B] / [N], rows that have a report.
        scale: exp(logit_scale), a scalar.
    Returns (cross-entropy image->text + text->image) / 2, averaged over the valid rows of
    the global batch as explained in the module docstring.
    """
    targets = torch.arange(image.shape[0], device=image.device) + offset
    excluded = ~all_valid[None, :]
    lowest = torch.finfo(image.dtype).min
    logits_i2t = (scale * image @ all_text.T).masked_fill(excluded, lowest)  # [B, N]
    logits_t2i = (scale * text @ all_image.T).masked_fill(excluded, lowest)  # [B, N]
    per_row = (
        F.cross_entropy(logits_i2t, targets, reduction="none")
        + F.cross_entropy(logits_t2i, targets, reduction="none")
    ) / 2
    return masked_mean(per_row, valid, all_valid.sum().clamp_min(1) / world_size)


def siglip_loss(
    image: torch.Tensor,
    all_text: torch.Tensor,
    offset: int,
    valid: torch.Tensor,
    all_valid: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor,
    world_size: int = 1,
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss of this rank's images against every rank's reports.

    `-sum_ij log sigmoid(z_ij (t x_i . y_j + b)) / |valid images|` with z_ij = 1 for the
    matching pair and -1 otherwise (Zhai et al., 2023, Algorithm 1), over valid pairs only.
    """
    logits = scale * image @ all_text.T + bias  # [B, N]
    signs = -torch.ones_like(logits)
    rows = torch.arange(image.shape[0], device=image.device)
    signs[rows, rows + offset] = 1.0
    pair_valid = valid[:, None] & all_valid[None, :]
    return -masked_mean(F.logsigmoid(signs * logits), pair_valid, all_valid.sum().clamp_min(1) / world_size)


class ClipObjective(Objective):
    """Contrastive CT-report pretraining: CLIP's symmetric InfoNCE or SigLIP's sigmoid loss.

    Args:
        embed_dim: the encoder's pooled width.
        text_model: Hugging Face model folder or hub name for the report tower.
        proj_dim: joint embedding width.
        max_length: report tokens per input (per chunk with `long_reports: chunks`).
        pooling: "auto" (the model's own, else "cls"), "cls", "mean" or "last".
        lowercase: lowercase reports before tokenising.
        loss: "infonce" (learnable log temperature, init log(1/0.07), exp clamped at 100) or
            "siglip" (learnable t' and b, init log 10 and -10).
        trust_remote_code: let the text model run its own code (see `fm3d.text.TextTower`).
        prefix, long_reports, normalize: `fm3d.text.TextTower`'s (None: the model's own).
        text_mode: "full" (the tower trains), "lora" (adapters of `lora_rank`, `lora_alpha`,
            `lora_dropout` on `lora_targets`, None: every projection) or "frozen" (cached
            embeddings, see the module docstring).
    Metric: `i2t_recall_at_1`, image->report recall@1 within the global (gathered) batch, valid rows only.
    Validation: `i2t_/t2i_recall_at_{1,5,10}` and `mAP` over the whole validation set.
    The trained heads are `self.clip` (save with `fm3d.clip.save_clip`).
    """

    name = "clip"
    views = ("image",)

    def __init__(
        self,
        embed_dim: int,
        text_model: str,
        proj_dim: int = 512,
        max_length: int = 256,
        pooling: str = "auto",
        lowercase: bool = False,
        loss: str = "infonce",
        trust_remote_code: bool = False,
        prefix: str | None = None,
        long_reports: str = "truncate",
        normalize: bool | None = None,
        text_mode: str = "full",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_dropout: float = 0.05,
        lora_targets: list[str] | None = None,
    ) -> None:
        super().__init__()
        config = ClipConfig(
            image_embed_dim=embed_dim,
            text_model=text_model,
            proj_dim=proj_dim,
            pooling=pooling,
            max_length=max_length,
            lowercase=lowercase,
            loss=loss,
            trust_remote_code=trust_remote_code,
            prefix=prefix,
            long_reports=long_reports,
            normalize=normalize,
            text_mode=text_mode,
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            lora_targets=lora_targets,
        )
        self.clip = ClipModel(config)
        self.frozen_text = text_mode == "frozen"
        self.batch_keys = ("image", "report_embedding") if self.frozen_text else ("image", "report")
        self.loss_kind = loss
        self._val_image: list[torch.Tensor] = []
        self._val_text: list[torch.Tensor] = []

    @property
    def text_settings(self) -> dict | None:
        """What the cached report embeddings must have been made with ("frozen"; else None)."""
        return self.clip.text_settings.to_dict() if self.frozen_text else None

    def _embed(self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]):
        pooled = encoded["image"].pooled  # [B, C]
        key = "report_embedding" if self.frozen_text else "report"
        reports = require(batch, key, self.name)
        if len(reports) != pooled.shape[0]:
            raise ObjectiveError(f"batch[{key!r}] has {len(reports)} rows for {pooled.shape[0]} images")
        valid = row_mask(batch, "has_report", pooled.shape[0], pooled.device)
        image = self.clip.encode_image(pooled)  # [B, P]
        if self.frozen_text:
            text = self.clip.project_text(reports.to(image.dtype))  # [B, P] from cached [B, hidden]
        else:
            text = self.clip.encode_text(list(reports)).to(image.dtype)  # [B, P]
        return image, text, valid

    def forward(
        self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        image, text, valid = self._embed(batch, encoded)
        _, world_size = rank_and_world_size()
        all_image, offset = gather_rows(image, with_grad=True)
        all_text, _ = gather_rows(text, with_grad=True)
        all_valid, _ = gather_rows(valid, with_grad=False)
        scale = self.clip.scale()
        if self.loss_kind == "siglip":
            loss = siglip_loss(
                image, all_text, offset, valid, all_valid, scale, self.clip.logit_bias, world_size
            )
        else:
            loss = infonce_loss(image, text, all_image, all_text, offset, valid, all_valid, scale, world_size)
            # Keep the (unused) SigLIP bias in the graph so DDP sees every parameter used.
            loss = loss + 0.0 * self.clip.logit_bias
        with torch.no_grad():
            scores = (all_image @ all_text.T)[all_valid][:, all_valid]
            recall = recall_at_k(scores, ks=(1,))[1] if scores.numel() else 0.0
        metrics = {
            "i2t_recall_at_1": torch.tensor(recall, dtype=torch.float32),
            "temperature": (1.0 / scale).detach(),
            "valid_fraction": all_valid.float().mean(),
        }
        return loss, metrics

    def reset_validation(self) -> None:
        self._val_image, self._val_text = [], []

    @torch.no_grad()
    def update_validation(self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]) -> None:
        image, text, valid = self._embed(batch, encoded)
        self._val_image.append(image[valid].float())
        self._val_text.append(text[valid].float())

    @torch.no_grad()
    def compute_validation(self) -> dict[str, float]:
        """Retrieval over every validation study with a report, gathered from all ranks."""
        width = self.clip.config.proj_dim
        device = self.clip.logit_scale.device
        image = torch.cat(self._val_image) if self._val_image else torch.zeros(0, width, device=device)
        text = torch.cat(self._val_text) if self._val_text else torch.zeros(0, width, device=device)
        image, _ = gather_rows(image, with_grad=False)
        text, _ = gather_rows(text, with_grad=False)
        if image.shape[0] == 0:
            return {}
        return retrieval_metrics(image @ text.T, ks=(1, 5, 10))
