"""DINOv2's self-distillation losses: teacher targets, the DINO and iBOT losses, KoLeo.

Reproduces (read for facts; the code here is fm3d's own) facebookresearch/dinov2:
- `dinov2/loss/dino_clstoken_loss.py`, `DINOLoss`: `softmax_center_teacher`,
  `sinkhorn_knopp_teacher`, `update_center` / `apply_center_update` and `forward`;
- `dinov2/loss/ibot_patch_loss.py`, `iBOTPatchLoss.forward_masked`;
- `dinov2/loss/koleo_loss.py`, `KoLeoLoss`;
- `dinov2/train/ssl_meta_arch.py`, `SSLMetaArch.forward_backward`, for how the class-token
  terms are paired and normalised (`dino_loss`) and how the iBOT term is scaled (by
  `loss_scales * ibot_loss_scale` = 2 * 1/2 = 1, so `ibot_patch_loss` is used as it is).

Every function computes in float32 with autocast off, whatever dtype its inputs arrive in
(bf16 under mixed precision): softmaxes over 65536 prototypes and Sinkhorn's repeated
normalisations lose too much in 8 mantissa bits. Teacher-side functions run without
gradient, as the teacher is never trained by backpropagation.

Under DDP, the teacher targets and the centre are functions of the global batch: Sinkhorn-Knopp
and `TeacherCenter.update` all-reduce their sums (whenever a process group with more than
one rank is initialised), so each rank's result equals one process's on the joined batch
(tests/pretrain/objectives/test_dino_ddp.py). The losses themselves are per-rank means, which
DDP's gradient averaging turns into the global-batch loss, as in DINOv2.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from pretrain.objectives.base import ObjectiveError
from pretrain.objectives.gather import distributed


def _all_reduce(x: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """`x` reduced over every rank, in place; `x` itself outside a process group."""
    if distributed():
        dist.all_reduce(x, op=op)
    return x


def _no_autocast(x: torch.Tensor) -> AbstractContextManager:
    """A context that turns autocast off on `x`'s device, so the maths below stays float32.

    A device without autocast (the meta device `fm3d pretrain plan` counts FLOPs on) needs none.
    """
    if not torch.amp.is_autocast_available(x.device.type):
        return nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


@torch.no_grad()
def softmax_center_teacher(
    teacher_logits: torch.Tensor, center: torch.Tensor, teacher_temp: float
) -> torch.Tensor:
    """Teacher targets by centring and sharpening: softmax((logits - center) / teacher_temp).

    teacher_logits [N, K], center [1, K] (a `TeacherCenter`'s buffer) -> probabilities [N, K].
    Use the centre as it is *before* this batch's `TeacherCenter.update`, as DINOv2 does.
    """
    with _no_autocast(teacher_logits):
        return F.softmax((teacher_logits.float() - center.float()) / teacher_temp, dim=-1)


@torch.no_grad()
def sinkhorn_knopp_teacher(
    teacher_logits: torch.Tensor, teacher_temp: float, n_iterations: int = 3
) -> torch.Tensor:
    """Teacher targets by Sinkhorn-Knopp: an assignment with equal mass on every prototype.

    teacher_logits [N, K] -> probabilities [N, K] whose rows sum to 1 (DINOv2 returns the
    transport plan scaled by the number of samples), with prototype totals near N_global / K.
    Q = exp(logits / T) is normalised to total mass 1, then `n_iterations` times every
    prototype's mass (over all ranks' rows) is set to 1/K and every row's to 1/N_global.

    As DINOv2, with two differences that leave the result unchanged where DINOv2's is
    defined: the global maximum logit is subtracted before `exp` (the first normalisation
    cancels that factor exactly; without it exp overflows once logits / T pass ~88, with it
    only a spread of logits / T beyond ~87 can underflow a whole prototype or row), and the
    number of rows is summed over ranks (DINOv2's class-token version assumes every rank holds
    N rows; its iBOT version sums them too), so ranks may hold different numbers of rows.
    """
    with _no_autocast(teacher_logits):
        scaled = teacher_logits.float() / teacher_temp  # [N, K]
        peak = scaled.max() if scaled.numel() else scaled.new_tensor(float("-inf"))
        q = torch.exp(scaled - _all_reduce(peak, dist.ReduceOp.MAX)).t()  # [K, N]
        rows = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))  # samples, all ranks
        prototypes = q.shape[0]
        q /= _all_reduce(q.sum())
        for _ in range(n_iterations):
            q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype's mass -> 1 ...
            q /= prototypes  # ... -> 1/K
            q /= q.sum(dim=0, keepdim=True)  # each sample's mass -> 1 ...
            q /= rows  # ... -> 1/N_global
        q *= rows  # rows of the result sum to 1: one assignment per sample
        return q.t()


class TeacherCenter(nn.Module):
    """The running mean of the teacher's logits that `softmax_center_teacher` subtracts.

    Centring keeps one prototype from taking every sample (collapse); DINOv2 keeps one centre
    for class tokens and one for masked patch tokens. `center` [1, K] is a persistent buffer,
    so it is saved and restored with the checkpoint and a resumed run continues it.

    DINOv2 starts the all-reduce of the batch sum asynchronously and applies the update just
    before the next `softmax_center_teacher`; fm3d reduces and applies it synchronously in
    `update`, which gives the same sequence of centres as long as `update` is called after
    the targets of the batch are computed. The batch mean weighs every row of every rank
    equally; for iBOT's patch tokens, where ranks hold different numbers of masked patches,
    DINOv2 instead averages each rank's patch mean.
    """

    center: torch.Tensor

    def __init__(self, num_prototypes: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, num_prototypes))

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """center <- momentum * center + (1 - momentum) * mean of teacher_logits [N, K] over all ranks."""
        with _no_autocast(teacher_logits):
            batch_sum = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))  # [1, K]
            rows = _all_reduce(torch.tensor(float(teacher_logits.shape[0]), device=batch_sum.device))
            moved = self.center * self.momentum + batch_sum / rows.clamp(min=1) * (1 - self.momentum)
            # No row on any rank (iBOT with no masked patch): keep the centre. torch.where, not
            # an `if`, so the step never waits for the GPU.
            self.center.copy_(torch.where(rows > 0, moved, self.center))


def dino_loss(
    student_global: torch.Tensor,
    student_local: torch.Tensor | None,
    teacher_probs: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """DINO's class-token loss: every student crop against the teacher's other global crops.

    student_global [G, B, K] and student_local [L, B, K] (or None) are the student head's
    logits on the G global and L local crops of B images; teacher_probs [G, B, K] the teacher
    targets on the global crops (teacher_probs[g] from global crop g, in the same order as
    student_global: this function does the pairing that DINOv2 does by swapping the
    teacher's two chunks). With H(t, s) = -mean_b sum_k t[b, k] log softmax(s / student_temp)[b, k]:

        loss = [ sum_{l < L} sum_{g < G} H(t_g, s_l)  +  sum_{g < G} sum_{g' != g} H(t_g', s_g) ]
               / ( G (G - 1) + max(L G, 1) )

    which is DINOv2's `dino_local_crops_loss + dino_global_crops_loss`: the denominator counts
    the loss terms, and, as in DINOv2 (`n_local_crops_loss_terms = max(L * G, 1)`), it counts
    one local term even when there are no local crops (then the loss is 2/3 of the mean of the
    two global terms for G = 2). A crop is never compared with its own teacher view.
    """
    if student_global.shape != teacher_probs.shape or student_global.ndim != 3:
        raise ObjectiveError(
            f"dino_loss needs student_global and teacher_probs of one shape [G, B, K]; got "
            f"{tuple(student_global.shape)} and {tuple(teacher_probs.shape)}"
        )
    n_global = student_global.shape[0]
    n_local = 0 if student_local is None else student_local.shape[0]
    if student_local is not None and student_local.shape[1:] != teacher_probs.shape[1:]:
        raise ObjectiveError(
            f"dino_loss needs student_local [L, B, K] with B, K = {tuple(teacher_probs.shape[1:])}; "
            f"got {tuple(student_local.shape)}"
        )
    if n_global < 2 and n_local == 0:
        raise ObjectiveError(
            f"dino_loss has nothing to compare with {n_global} global and no local crop: "
            "sample at least two global crops, or local crops"
        )
    with _no_autocast(student_global):
        teacher = teacher_probs.float()
        student = F.log_softmax(student_global.float() / student_temp, dim=-1)  # [G, B, K]
        # Every global crop against the sum of the *other* teacher views (t_sum - t_g).
        others = teacher.sum(dim=0, keepdim=True) - teacher  # [G, B, K]
        total = -(others * student).sum(dim=-1).mean(dim=-1).sum()
        if student_local is not None and n_local > 0:
            local = F.log_softmax(student_local.float() / student_temp, dim=-1)  # [L, B, K]
            # Every (local, teacher) pair: sum_l sum_g t_g . s_l = (sum_g t_g) . (sum_l s_l) per row.
            total = total - torch.einsum("bk,bk->", teacher.sum(dim=0), local.sum(dim=0)) / teacher.shape[1]
        return total / (n_global * (n_global - 1) + max(n_local * n_global, 1))


def ibot_patch_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    masks: torch.Tensor,
    student_temp: float,
) -> torch.Tensor:
    """iBOT's masked-patch loss: the student predicts the teacher's targets at masked patches.

    student_patch_logits [M, K] and teacher_patch_probs [M, K] hold the masked patches of all
    images, image by image in token order (the rows of `masks.flatten().nonzero()`); masks
    [N_img, T] bool marks them, M = masks.sum(). As DINOv2's `forward_masked`:

        loss = -(1 / N_img) sum_i sum_{masked t of i} (1 / n_i) sum_k p[i, t, k] log softmax(s / T_s)

    with n_i the number of masked patches of image i: every image weighs the same whatever
    its mask ratio, and images without a masked patch count in N_img with a zero term.
    """
    masks = masks.to(device=student_patch_logits.device, dtype=torch.bool)
    if masks.ndim != 2:
        raise ObjectiveError(f"ibot_patch_loss needs masks [N_img, T]; got shape {tuple(masks.shape)}")
    n_masked = int(masks.sum())
    if student_patch_logits.shape != teacher_patch_probs.shape or student_patch_logits.shape[0] != n_masked:
        raise ObjectiveError(
            f"ibot_patch_loss needs student and teacher rows [M, K] with M = masks.sum() = {n_masked}; got "
            f"{tuple(student_patch_logits.shape)} and {tuple(teacher_patch_probs.shape)}"
        )
    with _no_autocast(student_patch_logits):
        log_probs = F.log_softmax(student_patch_logits.float() / student_temp, dim=-1)  # [M, K]
        per_patch = (teacher_patch_probs.float() * log_probs).sum(dim=-1)  # [M]
        per_image = 1 / masks.sum(dim=-1).clamp(min=1).float()  # [N_img]
        weights = per_image[:, None].expand_as(masks)[masks]  # [M], 1/n_i for each patch of image i
        return -(per_patch * weights).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KoLeo regulariser (Sablayrolles et al. 2018): spread features uniformly on the sphere.

    x [B, C] (the student's class tokens of one global crop): rows are L2-normalised, each
    row's nearest other row is found by the largest inner product, and the loss is
    -mean_b log(||x_b - x_nn(b)|| + eps), the Kozachenko-Leonenko entropy estimate up to
    constants. As DINOv2's `KoLeoLoss`, whose pairwise distance adds its fixed eps 1e-8 to
    the difference (here `eps`, equal at the default). A single row has no neighbour: the
    loss is then 0 (kept in the graph; DINOv2 would take the row's distance to itself).
    """
    if x.ndim != 2:
        raise ObjectiveError(f"koleo_loss needs features [B, C]; got shape {tuple(x.shape)}")
    with _no_autocast(x):
        x = F.normalize(x.float(), p=2, dim=-1, eps=eps)  # [B, C]
        if x.shape[0] < 2:
            return x.sum() * 0
        with torch.no_grad():
            dots = x @ x.t()  # [B, B]
            # A row is not its own neighbour. DINOv2 writes -1, which can tie with an antipodal
            # row; -inf cannot.
            dots.fill_diagonal_(float("-inf"))
            nearest = dots.max(dim=1).indices  # [B]
        distances = F.pairwise_distance(x, x[nearest], p=2, eps=eps)  # [B]
        return -torch.log(distances + eps).mean()
