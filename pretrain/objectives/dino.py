"""DINOv2-style self-distillation: DINO on the pooled embedding, iBOT on masked patch tokens, KoLeo.

Reproduces the training step of Oquab et al., "DINOv2" (TMLR 2024), read for facts from
`facebookresearch/dinov2` (`dinov2/train/ssl_meta_arch.py`, the configs' defaults in
`dinov2/configs/ssl_default_config.yaml`, the schedules in `dinov2/train/train.py`); the
losses and head are fm3d's own (`pretrain.objectives.dino_losses`, `dino_head`), tested
against re-implementations of DINOv2's.

A step: the teacher (an EMA copy of the whole encoder and head) encodes the two global crops;
the student encodes the global crops with iBOT's masked tokens replaced by a learnable mask
token, and the local crops. DINO matches each student crop's head output to the teacher's
centred, sharpened output of the *other* global crops; iBOT matches the student's masked patch
tokens to the teacher's tokens at those positions; KoLeo spreads each global crop's student
embeddings over the sphere. After the optimizer step the teacher follows the student with a
momentum that rises from 0.992 to 1 on a cosine; the teacher temperature warms up from 0.04 to
0.07 over the first 30 % of the run (DINOv2: 30 of 100 epochs) and then stays.

Where fm3d differs, and why:
- The embedding is the encoder's `pooled` output: the class token when the encoder has one
  (as DINOv2), else the mean of the patch tokens, so DINO works for any fm3d family; iBOT needs
  a ViT3D (its masked-token input).
- Centering updates run synchronously across ranks (DINOv2 overlaps them asynchronously).
- DINOv2 freezes the head's last layer for the first epoch and schedules weight decay; fm3d
  uses the run's one optimizer setting for every parameter (`model.optimizer`).
- The exported encoder is the teacher (DINOv2 evaluates the teacher); `export: student`
  exports the student instead.

Batch (the `multicrop` view, `fm3d.data.multicrop`): `global_crops` [B, G, 1, D, H, W],
`local_crops` [B, L, 1, d, h, w], `global_masks` [B, G, T] (True = masked token).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.base import Objective, ObjectiveError, require
from pretrain.objectives.dino_head import DINOHead
from pretrain.objectives.dino_losses import (
    TeacherCenter,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
)

CENTERINGS = ("softmax", "sinkhorn_knopp")
EXPORTS = ("teacher", "student")


def teacher_momentum(step: int, max_steps: int, start: float, end: float) -> float:
    """DINOv2's momentum schedule: cosine from `start` at step 0 to `end` at `max_steps`."""
    if step >= max_steps:
        return end
    return end + 0.5 * (start - end) * (1 + math.cos(math.pi * step / max_steps))


def teacher_temperature(step: int, warmup_steps: int, start: float, end: float) -> float:
    """DINOv2's teacher temperature: linear from `start` to `end` over `warmup_steps`, then `end`.

    `np.linspace(start, end, warmup_steps)[step]` as DINOv2's CosineScheduler builds it (both ends
    included).
    """
    if step >= warmup_steps:
        return end
    if warmup_steps == 1:
        return start
    return start + (end - start) * step / (warmup_steps - 1)


class DINOObjective(Objective):
    """DINO + iBOT + KoLeo self-distillation with an EMA teacher of the whole encoder and head.

    Args:
        embed_dim: the encoder's pooled width.
        prototypes: width of the head's output (DINOv2: 65536; a few thousand suit small data).
        head_hidden_dim, bottleneck_dim, head_layers: the DINO head's MLP (DINOv2: 2048, 256, 3).
        norm_last_layer: hold the prototypes' norms at 1 (DINO v1's choice for stability); DINOv2
            trains them (False, the default).
        ibot: add iBOT's masked-patch loss (needs a ViT3D encoder and `global_masks`).
        separate_ibot_head: a second head for patch tokens (DINOv2's default shares one).
        dino_weight, ibot_weight, koleo_weight: loss weights (DINOv2: 1, 1, 0.1).
        student_temp: temperature of the student's softmax (0.1).
        teacher_temp: (start, end) of the warm-up of the teacher temperature (0.04, 0.07).
        teacher_temp_warmup: share of the run's steps the warm-up takes (DINOv2: 30 of 100 epochs).
        momentum: (start, end) of the teacher's EMA momentum over the run (0.992, 1.0).
        centering: "softmax" (running centre, DINO) or "sinkhorn_knopp" (DINOv2's large runs).
        center_momentum: momentum of the running centre (0.9).
        export: which encoder the run exports, "teacher" (default) or "student".
    """

    name = "dino"
    views = ()
    batch_keys = ("global_crops", "local_crops", "global_masks")

    def __init__(
        self,
        embed_dim: int,
        prototypes: int = 65536,
        head_hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_layers: int = 3,
        norm_last_layer: bool = False,
        ibot: bool = True,
        separate_ibot_head: bool = False,
        dino_weight: float = 1.0,
        ibot_weight: float = 1.0,
        koleo_weight: float = 0.1,
        student_temp: float = 0.1,
        teacher_temp: tuple[float, float] = (0.04, 0.07),
        teacher_temp_warmup: float = 0.3,
        momentum: tuple[float, float] = (0.992, 1.0),
        centering: str = "softmax",
        center_momentum: float = 0.9,
        export: str = "teacher",
    ) -> None:
        super().__init__()
        if centering not in CENTERINGS:
            raise ObjectiveError(f"dino centering must be one of {CENTERINGS}, got {centering!r}")
        if export not in EXPORTS:
            raise ObjectiveError(f"dino export must be one of {EXPORTS}, got {export!r}")
        if not all(0.0 <= m <= 1.0 for m in momentum):
            raise ObjectiveError(f"dino momentum (start, end) must lie in [0, 1], got {momentum}")
        if not 0.0 <= teacher_temp_warmup <= 1.0:
            raise ObjectiveError(f"dino teacher_temp_warmup is a share of the run, got {teacher_temp_warmup}")
        if min(student_temp, *teacher_temp) <= 0:
            raise ObjectiveError("dino temperatures must be positive")
        self.ibot, self.centering, self.export = ibot, centering, export
        self.weights = {"dino": dino_weight, "ibot": ibot_weight if ibot else 0.0, "koleo": koleo_weight}
        self.student_temp = student_temp
        self.teacher_temp_range = tuple(teacher_temp)
        self.teacher_temp_warmup = teacher_temp_warmup
        self.momentum_range = tuple(momentum)
        # Before the first training step (and in a validation-only run): the schedules' start.
        self.teacher_temp, self.momentum = self.teacher_temp_range[0], self.momentum_range[0]

        def head() -> DINOHead:
            return DINOHead(
                embed_dim, prototypes, head_hidden_dim, bottleneck_dim, head_layers, norm_last_layer
            )

        self.student_head = head()
        self.student_ibot_head = head() if ibot and separate_ibot_head else None
        self.center = TeacherCenter(prototypes, center_momentum)
        self.patch_center = TeacherCenter(prototypes, center_momentum) if ibot else None
        # iBOT's learnable mask token (DINOv2 keeps it in the backbone, zero-initialised); it
        # belongs to the student only, so the exported encoder does not carry it.
        self.mask_token = nn.Parameter(torch.zeros(embed_dim)) if ibot else None
        self.teacher_encoder: nn.Module | None = None
        self.teacher_head: DINOHead | None = None
        self.teacher_ibot_head: DINOHead | None = None
        self._student_encoder: list[nn.Module] = []  # a list keeps it out of this module's state

    @property
    def exported_encoder_prefix(self) -> str | None:
        return "teacher_encoder." if self.export == "teacher" else None

    def bind(self, encoder: nn.Module) -> None:
        """Make the teacher: a frozen copy of the freshly built encoder and of the student heads."""
        if self.ibot and getattr(getattr(encoder, "config", None), "family", None) != "vit3d":
            raise ObjectiveError(
                f"iBOT masks input tokens, which only a vit3d encoder takes ({type(encoder).__name__} "
                "given); set model.objectives.dino.init_args.ibot: false for other families"
            )
        self._student_encoder = [encoder]
        self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
        if self.student_ibot_head is not None:
            self.teacher_ibot_head = copy.deepcopy(self.student_ibot_head).requires_grad_(False)

    def _pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        pairs = [(self._student_encoder[0], self.teacher_encoder), (self.student_head, self.teacher_head)]
        if self.student_ibot_head is not None:
            pairs.append((self.student_ibot_head, self.teacher_ibot_head))
        return pairs

    def on_train_batch_start(self, step: int, max_steps: int) -> None:
        warmup = round(self.teacher_temp_warmup * max_steps)
        self.teacher_temp = teacher_temperature(step, warmup, *self.teacher_temp_range)
        self.momentum = teacher_momentum(step, max_steps, *self.momentum_range)

    @torch.no_grad()
    def on_train_batch_end(self) -> None:
        """teacher <- momentum * teacher + (1 - momentum) * student, for encoder and heads."""
        for student, teacher in self._pairs():
            s_params = [p.detach() for p in student.parameters()]
            t_params = list(teacher.parameters())
            torch._foreach_mul_(t_params, self.momentum)
            torch._foreach_add_(t_params, s_params, alpha=1.0 - self.momentum)

    def encode(self, encoder: nn.Module, batch: Mapping[str, object]) -> dict[str, EncoderOutput]:
        """Student on masked global and on local crops, teacher (no gradient) on the global crops.

        Crops are ordered crop-major ([G*B]: crop 0 of every sample, then crop 1), as DINOv2's
        collate does, so the losses see [G, B, ...].
        """
        if self.teacher_encoder is None:
            raise ObjectiveError("the dino objective was not bound to an encoder (PretrainModule does this)")
        global_crops = _crop_major(require(batch, "global_crops", self.name), "global_crops")
        encoded: dict[str, EncoderOutput] = {}
        if self.ibot:
            masks = _crop_major(require(batch, "global_masks", self.name), "global_masks").to(torch.bool)
            encoded["student_global"] = encoder(
                global_crops, token_mask=masks.to(global_crops.device), mask_token=self.mask_token
            )
        else:
            encoded["student_global"] = encoder(global_crops)
        local = batch.get("local_crops")
        if local is not None and local.shape[1] > 0:
            encoded["student_local"] = encoder(_crop_major(local, "local_crops"))
        with torch.no_grad():
            # Deterministic teacher (no dropout or drop-path), whatever mode Lightning set.
            encoded["teacher_global"] = self.teacher_encoder.eval()(global_crops)
        return encoded

    def _teacher_probs(self, logits: torch.Tensor, center: TeacherCenter) -> torch.Tensor:
        """Centred, sharpened teacher distribution; the running centre moves in training only."""
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp_teacher(logits, self.teacher_temp)
        probs = softmax_center_teacher(logits, center.center, self.teacher_temp)
        if self.training:
            center.update(logits)
        return probs

    def forward(
        self, batch: Mapping[str, object], encoded: Mapping[str, EncoderOutput]
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        if "student_global" not in encoded:
            raise ObjectiveError(
                "the dino objective reads its own encodings: call encode(encoder, batch) first"
            )
        num_global = int(torch.as_tensor(batch["global_crops"]).shape[1])
        student_global, teacher_global = encoded["student_global"], encoded["teacher_global"]
        batch_size = student_global.pooled.shape[0] // num_global
        student_local = encoded.get("student_local")

        def crops(x: torch.Tensor) -> torch.Tensor:  # [G*B, K] -> [G, B, K]
            return x.float().reshape(-1, batch_size, x.shape[-1])

        with torch.no_grad():
            teacher_logits = self.teacher_head(teacher_global.pooled)
            teacher_probs = crops(self._teacher_probs(teacher_logits.float(), self.center))
        local_logits = None if student_local is None else crops(self.student_head(student_local.pooled))
        dino = dino_loss(
            crops(self.student_head(student_global.pooled)), local_logits, teacher_probs, self.student_temp
        )
        pooled = student_global.pooled.float().reshape(num_global, batch_size, -1)
        koleo = sum(koleo_loss(pooled[g]) for g in range(num_global))
        loss = self.weights["dino"] * dino + self.weights["koleo"] * koleo
        metrics: dict[str, float | torch.Tensor] = {"dino": dino.detach(), "koleo": koleo.detach()}
        if self.ibot:
            ibot = self._ibot_loss(batch, student_global, teacher_global)
            loss = loss + self.weights["ibot"] * ibot
            metrics["ibot"] = ibot.detach()
        entropy = -(teacher_probs * teacher_probs.clamp_min(1e-12).log()).sum(-1).mean()
        metrics |= {
            "teacher_entropy": entropy.detach(),
            "teacher_temp": torch.tensor(self.teacher_temp),
            "momentum": torch.tensor(self.momentum),
        }
        return loss, metrics

    def _ibot_loss(
        self, batch: Mapping[str, object], student: EncoderOutput, teacher: EncoderOutput
    ) -> torch.Tensor:
        """iBOT: the student's masked patch tokens against the teacher's tokens at those positions."""
        masks = _crop_major(torch.as_tensor(batch["global_masks"]), "global_masks").to(
            device=student.tokens.device, dtype=torch.bool
        )  # [G*B, T]
        if masks.shape[1] != student.tokens.shape[1]:
            raise ObjectiveError(
                f"global_masks cover {masks.shape[1]} tokens but the encoder makes {student.tokens.shape[1]} "
                "per global crop; set data.views.multicrop.patch_size to the encoder's patch size"
            )
        student_head = self.student_ibot_head or self.student_head
        teacher_head = self.teacher_ibot_head or self.teacher_head
        student_logits = student_head(student.tokens[masks])  # [M, K]
        with torch.no_grad():
            teacher_logits = teacher_head(teacher.tokens[masks]).float()
            teacher_probs = self._teacher_probs(teacher_logits, self.patch_center)
        return ibot_patch_loss(student_logits.float(), teacher_probs, masks, self.student_temp)


def _crop_major(x: object, key: str) -> torch.Tensor:
    """[B, G, ...] sample-major crops -> [G*B, ...] crop-major."""
    x = torch.as_tensor(x)
    if x.dim() < 2:
        raise ObjectiveError(f"batch[{key!r}] must be [B, crops, ...], got shape {tuple(x.shape)}")
    return x.transpose(0, 1).flatten(0, 1)


__all__ = ["DINOObjective", "teacher_momentum", "teacher_temperature"]
