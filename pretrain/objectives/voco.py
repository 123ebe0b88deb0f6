"""VoCo volume-contrast pretraining: predict where random crops lie from their similarity to base crops.

Reproduces the heads and losses of the two reference implementations (read for facts, the
code here is fm3d's own, vectorised over the batch):

- v2 (default): Wu et al., "Large-Scale 3D Medical Image Pre-training with Geometric Context
  Priors" (TPAMI 2025), `Luffy03/Large-Scale-Medical`, `Self-supervised/models/voco_head.py`:
  `projection_head` (hidden = out = 1024), `VoCoHead.forward` (feature dropout, student
  head on all embeddings, teacher head = EMA of the student head, intra-volume loss of the
  student crops against the teacher bases, `VoCoHead.inter_volume`, `regularization_loss`)
  and that file's `ce_loss` (both terms logarithmic).
- v1: Wu et al., "VoCo" (CVPR 2024), `Luffy03/VoCo`, `models/voco_head.py`: `projection_head`
  (hidden = out = 2048), `VoCoHead.forward` (averaged student/teacher assignments, no
  feature dropout) and its `ce_loss` (squared negative term).

Shared by both: `online_assign` (ReLU of the cosine similarity of every crop projection to
every base projection of the same volume: the predicted overlap of the crop with each base)
and `regularization_loss` (mean over base pairs i < j of ReLU(cos(b_i, stopgrad b_j))^2,
which pushes the bases of one volume apart).

Where fm3d differs, and why:
- The encoder is shared with the other objectives, so the teacher is an EMA of the
  projection head only. v2 does exactly this; v1's repository also keeps an EMA copy of the
  backbone, which an objective that does not own the encoder cannot hold (v1's teacher here
  sees the student backbone's features, detached).
- VoCo's embedding is its Swin backbone's multi-scale pooled features; here it is the
  encoder's `pooled` output (any fm3d encoder).
- VoCo updates the teacher at the start of each training forward, then uses it. fm3d updates
  in `on_train_batch_end` (after the optimizer step, with the parameters the next forward
  uses) and once at construction, which gives the identical sequence of teachers while
  keeping forward free of side effects (validation forwards never move the teacher).
- v2's feature dropout is `nn.Dropout1d(0.2)` on the [N, C] embeddings, which torch treats as
  one unbatched (C=N, L=C) sample: it zeroes whole embeddings (rows), scaled by 1/0.8. fm3d
  keeps that behaviour (`feature_dropout`), but only in training mode (VoCo builds the
  module inside forward, so it also dropped rows at evaluation).

Under DDP, VoCo's `voco_train.py` converts the heads' BatchNorm with
`convert_sync_batchnorm`; Lightning's `Trainer(sync_batchnorm=True)` does the same here.

Batch: `voco_crops` [B, R, 1, d, h, w] and `voco_bases` [B, K, 1, d, h, w] are encoded by the
caller as [B*R, ...] and [B*K, ...] (see base.py); `voco_labels` [B, R, K] are the overlap
shares from `fm3d.data.crops`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.base import Objective, ObjectiveError, require

VERSIONS = ("v1", "v2")
_HEAD_WIDTH = {"v1": 2048, "v2": 1024}  # hidden and output width of VoCo's projection_head
_FEATURE_DROPOUT = {"v1": 0.0, "v2": 0.2}
_EPS = 1e-6  # VoCo's epsilon in ce_loss (logs and normalisers)


class ProjectionHead(nn.Module):
    """VoCo's `projection_head`: two Linear-BatchNorm-ReLU blocks and a Linear read-out.

    BatchNorm has no affine parameters and no running statistics (it always normalises with
    the current batch's statistics, in training and evaluation alike), as in VoCo.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def online_assign(crops: torch.Tensor, bases: torch.Tensor) -> torch.Tensor:
    """Predicted overlaps ReLU(cos(crop r, base k)) per volume: [B, R, C] x [B, K, C] -> [B, R, K]."""
    return F.relu(F.cosine_similarity(crops[:, :, None, :], bases[:, None, :, :], dim=-1))


def regularization_loss(bases: torch.Tensor) -> torch.Tensor:
    """Per volume, mean over pairs i < j of ReLU(cos(b_i, stopgrad b_j))^2: [B, K, C] -> [B]."""
    num_bases = bases.shape[1]
    similarity = F.cosine_similarity(bases[:, :, None, :], bases.detach()[:, None, :, :], dim=-1)  # [B, K, K]
    upper = torch.triu(torch.ones(num_bases, num_bases, dtype=torch.bool, device=bases.device), diagonal=1)
    return F.relu(similarity[:, upper]).pow(2).mean(1)


def position_loss(
    labels: torch.Tensor, logits: torch.Tensor, version: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """VoCo's `ce_loss` per volume: (positive term [B], negative term [B]) from [B, R, K] inputs.

    Positive: -sum labels * log(1 - |labels - logits|) / sum labels, over the bases a crop
    overlaps. Negative, over bases it does not overlap (label exactly 0): v2 uses
    -log(1 - logits), v1 logits^2; both divided by the number of such entries.
    """
    positive = -(labels * torch.log(1 - (labels - logits).abs() + _EPS)).sum((1, 2)) / (
        labels.sum((1, 2)) + _EPS
    )
    negative_mask = (labels == 0).to(logits.dtype)
    penalty = -torch.log(1 - logits + _EPS) if version == "v2" else logits.pow(2)
    negative = (negative_mask * penalty).sum((1, 2)) / (negative_mask.sum((1, 2)) + _EPS)
    return positive, negative


class VoCoObjective(Objective):
    """VoCo's position-prediction pretraining with an EMA teacher head (v2 by default, v1 selectable).

    Args:
        embed_dim: the encoder's pooled width.
        version: "v2" (intra- and inter-volume terms, feature dropout) or "v1".
        momentum: EMA momentum of the teacher head (VoCo: 0.9, fixed, no schedule).
        hidden_dim, out_dim: projection head widths (default: VoCo's, 1024 for v2, 2048 for v1).
        feature_dropout: probability of zeroing a whole embedding before the student head
            (default: VoCo's, 0.2 for v2, 0 for v1).
    Loss (unweighted, VoCo sums its terms): v2 intra + inter + regularization; v1 positive +
    negative + regularization; each is averaged over the volumes of the batch.
    Metric `position_accuracy`: share of random crops whose largest predicted overlap is the
    base they overlap most.
    """

    name = "voco"
    views = ("voco_crops", "voco_bases")
    batch_keys = ("voco_crops", "voco_bases", "voco_labels")

    def __init__(
        self,
        embed_dim: int,
        version: str = "v2",
        momentum: float = 0.9,
        hidden_dim: int | None = None,
        out_dim: int | None = None,
        feature_dropout: float | None = None,
    ) -> None:
        super().__init__()
        if version not in VERSIONS:
            raise ObjectiveError(f"VoCo version must be one of {VERSIONS}, got {version!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ObjectiveError(f"VoCo EMA momentum must lie in [0, 1], got {momentum}")
        self.version = version
        self.momentum = momentum
        self.feature_dropout = _FEATURE_DROPOUT[version] if feature_dropout is None else feature_dropout
        hidden_dim = hidden_dim or _HEAD_WIDTH[version]
        out_dim = out_dim or _HEAD_WIDTH[version]
        self.student = ProjectionHead(embed_dim, hidden_dim, out_dim)
        # VoCo draws the teacher's initial weights independently of the student's.
        self.teacher = ProjectionHead(embed_dim, hidden_dim, out_dim).requires_grad_(False)
        # VoCo's first forward moves the teacher once before using it; do that move here.
        self.update_teacher()

    @torch.no_grad()
    def update_teacher(self) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student (VoCo's `_EMA_update_encoder_teacher`)."""
        for student, teacher in zip(self.student.parameters(), self.teacher.parameters(), strict=True):
            teacher.mul_(self.momentum).add_(student.detach(), alpha=1.0 - self.momentum)

    def on_train_batch_end(self) -> None:
        self.update_teacher()

    def _projections(self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]):
        labels = torch.as_tensor(require(batch, "voco_labels", self.name))  # [B, R, K]
        if labels.dim() != 3:
            raise ObjectiveError(f"batch['voco_labels'] must be [B, R, K], got shape {tuple(labels.shape)}")
        b, r, k = labels.shape
        if k < 2:
            raise ObjectiveError(
                "VoCo needs at least 2 base crops per volume (its regulariser compares pairs)"
            )
        crops, bases = encoded["voco_crops"].pooled, encoded["voco_bases"].pooled
        if crops.shape[0] != b * r or bases.shape[0] != b * k:
            raise ObjectiveError(
                f"encoded voco_crops/voco_bases have {crops.shape[0]}/{bases.shape[0]} rows; voco_labels "
                f"{tuple(labels.shape)} needs B*R = {b * r} and B*K = {b * k} (flatten sample-major)"
            )
        # VoCo runs the heads on crops and bases together: BatchNorm statistics span both.
        embeddings = torch.cat([crops, bases])  # [B*R + B*K, C]
        if self.training and self.feature_dropout > 0:
            student = self.student(F.dropout1d(embeddings, self.feature_dropout, training=True))
        else:
            student = self.student(embeddings)
        with torch.no_grad():
            teacher = self.teacher(embeddings.detach())

        def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = x.float()  # the logs and cosines of the loss stay in float32 under bf16 autocast
            return x[: b * r].reshape(b, r, -1), x[b * r :].reshape(b, k, -1)

        return labels.to(device=student.device, dtype=torch.float32), split(student), split(teacher)

    def forward(
        self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        labels, (crops_s, bases_s), (crops_t, bases_t) = self._projections(batch, encoded)
        regularization = regularization_loss(bases_s).mean()
        if self.version == "v2":
            logits = online_assign(crops_s, bases_t)
            intra = sum(position_loss(labels, logits, "v2")).mean()
            # Inter-volume: volume i's crops against volume (i + 1) % B's bases, the teacher's
            # assignment (detached) being the student's target.
            other_bases_s, other_bases_t = bases_s.roll(-1, dims=0), bases_t.roll(-1, dims=0)
            target = online_assign(crops_t, other_bases_t).detach()
            inter = sum(position_loss(target, online_assign(crops_s, other_bases_s), "v2")).mean()
            loss = intra + inter + regularization
            terms = {"intra": intra, "inter": inter}
        else:
            logits = (online_assign(crops_s, bases_t) + online_assign(crops_t, bases_s)) / 2
            positive, negative = position_loss(labels, logits, "v1")
            loss = positive.mean() + negative.mean() + regularization
            terms = {"positive": positive.mean(), "negative": negative.mean()}
        accuracy = (logits.argmax(-1) == labels.argmax(-1)).float().mean()
        metrics = {name: value.detach() for name, value in terms.items()}
        metrics |= {"regularization": regularization.detach(), "position_accuracy": accuracy.detach()}
        return loss, metrics
