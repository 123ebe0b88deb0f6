"""pretrain.objectives.dino_losses and dino_head: parity with DINOv2, and properties by hand.

The references below re-implement facebookresearch/dinov2 (commit b8931f7) inside this file,
written from reading its code, single process (world size 1):
- `_ReferenceDINOHead`: `dinov2/layers/dino_head.py`, `DINOHead` and `_build_mlp`, with the
  weight norm written out (w = g v / ||v|| per row, what `torch.nn.utils.weight_norm` does).
- `_ref_softmax_center`, `_ref_sinkhorn`, `_ref_update_center`, `_ref_dino_forward`:
  `dinov2/loss/dino_clstoken_loss.py`, `DINOLoss`.
- `_ref_dino_combined`: `dinov2/train/ssl_meta_arch.py`, `SSLMetaArch.forward_backward`.
- `_ref_ibot_forward_masked`: `dinov2/loss/ibot_patch_loss.py`, `iBOTPatchLoss.forward_masked`
  with `masks_weight` from `dinov2/data/collate.py`, `collate_data_and_cast`.
- `_ref_koleo`: `dinov2/loss/koleo_loss.py`, `KoLeoLoss`.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pretrain.objectives.base import ObjectiveError
from pretrain.objectives.dino_head import DINOHead
from pretrain.objectives.dino_losses import (
    TeacherCenter,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp_teacher,
    softmax_center_teacher,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}


# --- references written from DINOv2's code ------------------------------------------------


class _ReferenceDINOHead(nn.Module):
    """dinov2/layers/dino_head.py DINOHead (use_bn=False, mlp_bias=True), same creation order."""

    def __init__(self, in_dim, out_dim, nlayers=3, hidden_dim=2048, bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = [nn.Linear(in_dim, hidden_dim), nn.GELU()]
            for _ in range(nlayers - 2):
                layers += [nn.Linear(hidden_dim, hidden_dim), nn.GELU()]
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.modules():  # self.apply(self._init_weights)
            if isinstance(m, nn.Linear):
                torch.nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.constant_(m.bias, 0)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)  # weight_norm(...) keeps its init as v
        self.weight_v = nn.Parameter(last.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))  # last_layer.weight_g.data.fill_(1)

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2, eps=1e-12)
        weight = self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)
        return F.linear(x, weight)

    def dinov2_state_dict(self) -> dict[str, torch.Tensor]:
        """The keys DINOv2's head saves (`last_layer.weight_g` / `last_layer.weight_v`)."""
        state = {k: v for k, v in self.state_dict().items() if k.startswith("mlp.")}
        state["last_layer.weight_g"] = self.weight_g.detach().clone()
        state["last_layer.weight_v"] = self.weight_v.detach().clone()
        return state


def _ref_softmax_center(teacher_output, center, teacher_temp):
    return F.softmax((teacher_output - center) / teacher_temp, dim=-1)


def _ref_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    teacher_output = teacher_output.float()
    world_size = 1
    Q = torch.exp(teacher_output / teacher_temp).t()
    B = Q.shape[1] * world_size
    K = Q.shape[0]
    Q /= torch.sum(Q)
    for _ in range(n_iterations):
        Q /= torch.sum(Q, dim=1, keepdim=True)
        Q /= K
        Q /= torch.sum(Q, dim=0, keepdim=True)
        Q /= B
    Q *= B
    return Q.t()


def _ref_update_center(center, teacher_output, center_momentum=0.9):
    """reduce_center_update then apply_center_update, world size 1."""
    batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
    return center * center_momentum + batch_center * (1 - center_momentum)


def _ref_dino_forward(student_output_list, teacher_list, student_temp):
    total_loss = 0
    for s in student_output_list:
        lsm = F.log_softmax(s / student_temp, dim=-1)
        for t in teacher_list:
            total_loss -= torch.sum(t * lsm, dim=-1).mean()
    return total_loss


def _ref_dino_combined(student_global_flat, student_local_flat, teacher_logits_flat, center, temps, n_local):
    """ssl_meta_arch: teacher chunks swapped, softmax-centred, local and global terms normalised."""
    student_temp, teacher_temp = temps
    n_global_crops = 2
    chunks = teacher_logits_flat.chunk(n_global_crops)
    swapped = torch.cat((chunks[1], chunks[0]))
    k = swapped.shape[-1]
    teacher_list = _ref_softmax_center(swapped, center, teacher_temp).view(n_global_crops, -1, k)
    n_local_crops_loss_terms = max(n_local * n_global_crops, 1)
    n_global_crops_loss_terms = (n_global_crops - 1) * n_global_crops
    loss = 0
    if n_local > 0:
        loss += _ref_dino_forward(student_local_flat.chunk(n_local), teacher_list, student_temp) / (
            n_global_crops_loss_terms + n_local_crops_loss_terms
        )
    loss += (
        _ref_dino_forward([student_global_flat], [teacher_list.flatten(0, 1)], student_temp)
        * 2
        / (n_global_crops_loss_terms + n_local_crops_loss_terms)
    )
    return loss


def _ref_ibot_forward_masked(student_masked, teacher_masked, masks, student_temp):
    masks_weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    loss = torch.sum(teacher_masked * F.log_softmax(student_masked / student_temp, dim=-1), dim=-1)
    loss = loss * masks_weight
    return -loss.sum() / masks.shape[0]


def _ref_koleo(student_output, eps=1e-8):
    student_output = F.normalize(student_output, eps=eps, p=2, dim=-1)
    dots = torch.mm(student_output, student_output.t())
    n = student_output.shape[0]
    dots.view(-1)[:: (n + 1)].fill_(-1)
    _, nearest = torch.max(dots, dim=1)
    distances = nn.PairwiseDistance(2, eps=1e-8)(student_output, student_output[nearest])
    return -torch.log(distances + eps).mean()


# --- DINOHead -------------------------------------------------------------------------------


@pytest.mark.parametrize("nlayers", [1, 2, 3])
def test_head_same_seed_same_weights_and_outputs_as_dinov2(nlayers):
    torch.manual_seed(0)
    reference = _ReferenceDINOHead(12, 40, nlayers=nlayers, hidden_dim=24, bottleneck_dim=8)
    torch.manual_seed(0)
    head = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8, nlayers=nlayers)
    ours = head.state_dict()
    for key, value in reference.dinov2_state_dict().items():
        key = key.replace("last_layer.weight_g", "last_layer.parametrizations.weight.original0")
        key = key.replace("last_layer.weight_v", "last_layer.parametrizations.weight.original1")
        torch.testing.assert_close(ours[key], value, rtol=0, atol=0, msg=key)
    assert len(ours) == len(reference.dinov2_state_dict())
    x = torch.randn(6, 12)
    torch.testing.assert_close(head(x), reference(x), **TOL)
    assert head(x).shape == (6, 40)


@pytest.mark.parametrize("norm_last_layer", [True, False])
def test_head_gradients_match_dinov2(norm_last_layer):
    # In float64: the normalised bottleneck divides by a small norm (0.02-scale weights), which
    # amplifies float32 rounding in the gradients of the first layers to ~1e-5 relative.
    torch.manual_seed(1)
    reference = _ReferenceDINOHead(12, 40, hidden_dim=24, bottleneck_dim=8).double()
    torch.manual_seed(1)
    head = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8, norm_last_layer=norm_last_layer).double()
    x = torch.randn(6, 12, dtype=torch.float64)
    target = torch.randn(6, 40, dtype=torch.float64)
    (head(x) * target).sum().backward()
    (reference(x) * target).sum().backward()
    close = {"rtol": 1e-10, "atol": 1e-12}
    for name, param in reference.mlp.named_parameters():
        torch.testing.assert_close(head.mlp.get_parameter(name).grad, param.grad, **close, msg=name)
    weight = head.last_layer.parametrizations.weight
    torch.testing.assert_close(weight.original1.grad, reference.weight_v.grad, **close)
    if norm_last_layer:  # the prototypes' norm is frozen at 1: no gradient, nothing to update
        assert not weight.original0.requires_grad and weight.original0.grad is None
    else:  # DINOv2's behaviour: g starts at 1 and is trained
        torch.testing.assert_close(weight.original0.grad, reference.weight_g.grad, **close)


def test_head_norm_stays_one_and_logits_are_cosines_after_training_steps():
    torch.manual_seed(2)
    head = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8)
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=0.1)
    x = torch.randn(16, 12)
    for _ in range(3):
        optimizer.zero_grad()
        head(x).pow(2).sum().backward()
        optimizer.step()
    prototypes = head.last_layer.weight  # [40, 8], the parametrised weight
    torch.testing.assert_close(prototypes.norm(dim=1), torch.ones(40), rtol=0, atol=1e-6)
    assert head(x).abs().max() <= 1 + 1e-6  # unit bottleneck . unit prototype


def test_head_state_dict_round_trip_dinov2_keys_and_deepcopy():
    torch.manual_seed(3)
    head = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    with torch.no_grad():  # a trained-looking norm, so the round trip is not of ones only
        head.last_layer.parametrizations.weight.original0.uniform_(0.5, 2.0)
    x = torch.randn(5, 12)
    torch.manual_seed(4)
    other = DINOHead(12, 40, hidden_dim=24, bottleneck_dim=8, norm_last_layer=False)
    assert not torch.allclose(other(x), head(x))
    other.load_state_dict(head.state_dict())
    torch.testing.assert_close(other(x), head(x), rtol=0, atol=0)
    # The EMA teacher is a deep copy; parametrised modules support it.
    teacher = copy.deepcopy(head)
    torch.testing.assert_close(teacher(x), head(x), rtol=0, atol=0)
    # A state dict in DINOv2's layout (weight_g / weight_v) loads through torch's compatibility hook.
    torch.manual_seed(5)
    reference = _ReferenceDINOHead(12, 40, hidden_dim=24, bottleneck_dim=8)
    with torch.no_grad():
        reference.weight_g.uniform_(0.5, 2.0)
    head.load_state_dict(reference.dinov2_state_dict())
    torch.testing.assert_close(head(x), reference(x), **TOL)


# --- teacher targets and centre ---------------------------------------------------------------


def test_softmax_center_teacher_matches_dinov2_in_float32_without_grad():
    torch.manual_seed(6)
    logits = torch.randn(8, 32, requires_grad=True)
    center = torch.randn(1, 32) * 0.1
    probs = softmax_center_teacher(logits, center, 0.04)
    torch.testing.assert_close(probs, _ref_softmax_center(logits.detach(), center, 0.04), **TOL)
    assert not probs.requires_grad  # the teacher is not trained by backpropagation
    from_bf16 = softmax_center_teacher(logits.detach().bfloat16(), center, 0.04)
    assert from_bf16.dtype == torch.float32
    torch.testing.assert_close(
        from_bf16, _ref_softmax_center(logits.detach().bfloat16().float(), center, 0.04), **TOL
    )


@pytest.mark.parametrize("n_iterations", [1, 3, 10])
def test_sinkhorn_matches_dinov2(n_iterations):
    torch.manual_seed(7)
    logits = torch.randn(12, 20)
    probs = sinkhorn_knopp_teacher(logits, 0.07, n_iterations=n_iterations)
    torch.testing.assert_close(probs, _ref_sinkhorn(logits, 0.07, n_iterations), **TOL)


def test_sinkhorn_rows_are_assignments_and_prototypes_balance_with_iterations():
    torch.manual_seed(8)
    n, k = 64, 8
    logits = torch.randn(n, k) + torch.linspace(0, 2, k)  # prototype 7 favoured before balancing
    gaps = []
    for n_iterations in (0, 1, 3, 10, 50):
        probs = sinkhorn_knopp_teacher(logits, 0.1, n_iterations=n_iterations)
        if n_iterations:  # DINOv2 returns the plan times N: every row (sample) sums to 1 ...
            torch.testing.assert_close(probs.sum(dim=1), torch.ones(n), rtol=0, atol=1e-6)
        # ... and every prototype gets about N / K of the mass, closer with each iteration.
        gaps.append((probs.sum(dim=0) - n / k).abs().max().item())
    assert gaps == sorted(gaps, reverse=True) and len(set(gaps)) == len(gaps)
    assert gaps[-1] < 0.05 * n / k


def test_sinkhorn_stays_finite_where_dinov2_overflows():
    torch.manual_seed(9)
    logits = torch.randn(10, 16)
    # Logits that grew (a trained prototype norm): logits / 0.04 reach ~130, beyond exp's
    # float32 range (~88), while their spread stays within it.
    grown = 4.0 + 0.5 * logits
    assert not torch.isfinite(_ref_sinkhorn(grown, 0.04)).all()
    probs = sinkhorn_knopp_teacher(grown, 0.04)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(10), rtol=0, atol=1e-5)
    # Shifting every logit by one constant leaves the targets unchanged (what the guard relies on).
    shifted = sinkhorn_knopp_teacher(logits + 3.0, 0.07)
    torch.testing.assert_close(shifted, _ref_sinkhorn(logits, 0.07), **TOL)


def test_teacher_center_follows_dinov2_and_is_a_saved_buffer():
    torch.manual_seed(10)
    center = TeacherCenter(16, momentum=0.9)
    expected = torch.zeros(1, 16)
    for rows in (5, 3):
        logits = torch.randn(rows, 16)
        center.update(logits.bfloat16().float())
        expected = _ref_update_center(expected, logits.bfloat16().float(), 0.9)
        torch.testing.assert_close(center.center, expected, **TOL)
    assert "center" in center.state_dict()
    restored = TeacherCenter(16)
    restored.load_state_dict(center.state_dict())
    torch.testing.assert_close(restored.center, center.center, rtol=0, atol=0)
    # No rows at all (iBOT without a masked patch): the centre stays (DINOv2 would divide 0 by 0).
    center.update(torch.zeros(0, 16))
    torch.testing.assert_close(center.center, expected, rtol=0, atol=0)


# --- DINO class-token loss ----------------------------------------------------------------------


@pytest.mark.parametrize("n_local", [0, 3])
def test_dino_loss_matches_dinov2_combination(n_local):
    torch.manual_seed(11)
    b, k, temps = 4, 32, (0.1, 0.04)
    teacher_logits = torch.randn(2 * b, k)  # DINOv2's layout: crop 0 rows, then crop 1 rows
    center = torch.randn(1, k) * 0.1
    student_global = torch.randn(2 * b, k)
    student_local = torch.randn(n_local * b, k)
    expected = _ref_dino_combined(student_global, student_local, teacher_logits, center, temps, n_local)
    probs = softmax_center_teacher(teacher_logits, center, temps[1]).view(2, b, k)  # natural order
    local = student_local.view(n_local, b, k) if n_local else None
    loss = dino_loss(student_global.view(2, b, k), local, probs, temps[0])
    torch.testing.assert_close(loss, expected, **TOL)


def test_dino_loss_by_hand_uniform_student_and_crop_pairing():
    k = 8
    teacher = F.softmax(torch.randn(2, 3, k), dim=-1)
    uniform = torch.zeros(2, 3, k)  # every cross-entropy term is log K whatever the target
    with_local = dino_loss(uniform, torch.zeros(4, 3, k), teacher, 0.1)
    assert with_local.item() == pytest.approx(math.log(k), rel=1e-6)
    # No local crops: DINOv2 still counts one local term, so 2 log K / 3.
    assert dino_loss(uniform, None, teacher, 0.1).item() == pytest.approx(2 * math.log(k) / 3, rel=1e-6)
    # Global crop g is compared with the teacher's *other* crop only: a student that matches
    # its own crop's (one-hot) teacher but not the other pays; one that matches the other does not.
    onehot = torch.zeros(2, 1, k)
    onehot[0, 0, 0] = onehot[1, 0, 1] = 1.0
    own = torch.full((2, 1, k), -1e3)
    own[0, 0, 0] = own[1, 0, 1] = 0.0
    swapped = own.flip(0)
    assert dino_loss(swapped, None, onehot, 1.0).item() == pytest.approx(0.0, abs=1e-6)
    assert dino_loss(own, None, onehot, 1.0).item() == pytest.approx(2 * 1e3 / 3, rel=1e-6)


def test_dino_loss_is_smallest_when_the_student_equals_the_teacher_and_only_the_student_learns():
    torch.manual_seed(12)
    k, student_temp = 16, 0.1
    teacher_logits = torch.randn(3, k, requires_grad=True)
    probs = softmax_center_teacher(teacher_logits, torch.zeros(1, k), 0.05)  # [3, K]
    targets = probs.expand(2, 3, k)  # both global crops gave the same teacher view
    matched = (student_temp * probs.log()).expand(2, 3, k).clone().requires_grad_(True)
    matched_loss = dino_loss(matched, matched.detach()[:1], targets, student_temp)
    entropy = -(probs * probs.log()).sum(dim=-1).mean()  # the minimum of a cross-entropy
    torch.testing.assert_close(matched_loss, entropy, rtol=1e-5, atol=1e-6)
    matched_loss.backward()
    assert matched.grad.abs().max() < 1e-6  # a minimum: no gradient left
    assert teacher_logits.grad is None  # nothing reaches the teacher
    for _ in range(5):
        other = matched.detach() + torch.randn(2, 3, k)
        assert dino_loss(other, other[:1], targets, student_temp) > matched_loss


def test_dino_loss_in_float32_under_bf16_autocast():
    torch.manual_seed(13)
    student = torch.randn(2, 4, 32).bfloat16()
    local = torch.randn(2, 4, 32).bfloat16()
    teacher = F.softmax(torch.randn(2, 4, 32), dim=-1).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = dino_loss(student, local, teacher, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, dino_loss(student.float(), local.float(), teacher.float(), 0.1), **TOL)


def test_dino_loss_rejects_mismatched_crops():
    probs = F.softmax(torch.randn(2, 4, 8), dim=-1)
    with pytest.raises(ObjectiveError, match=r"\[G, B, K\]"):
        dino_loss(torch.randn(2, 3, 8), None, probs, 0.1)
    with pytest.raises(ObjectiveError, match=r"student_local \[L, B, K\]"):
        dino_loss(torch.randn(2, 4, 8), torch.randn(3, 5, 8), probs, 0.1)
    with pytest.raises(ObjectiveError, match="at least two global crops"):
        dino_loss(torch.randn(1, 4, 8), None, probs[:1], 0.1)


# --- iBOT masked-patch loss ----------------------------------------------------------------------


def _masks() -> torch.Tensor:
    masks = torch.zeros(4, 6, dtype=torch.bool)  # 4 images of 6 tokens; image 2 has no masked patch
    masks[0, [1, 4]] = True
    masks[1, [0, 2, 3, 5]] = True
    masks[3, [2]] = True
    return masks


def test_ibot_patch_loss_matches_dinov2():
    torch.manual_seed(14)
    masks = _masks()
    m = int(masks.sum())
    student = torch.randn(m, 16)
    teacher = F.softmax(torch.randn(m, 16) / 0.07, dim=-1)
    expected = _ref_ibot_forward_masked(student, teacher, masks, 0.1)
    torch.testing.assert_close(ibot_patch_loss(student, teacher, masks, 0.1), expected, **TOL)
    from_bf16 = ibot_patch_loss(student.bfloat16(), teacher.bfloat16(), masks, 0.1)
    assert from_bf16.dtype == torch.float32
    expected = _ref_ibot_forward_masked(student.bfloat16().float(), teacher.bfloat16().float(), masks, 0.1)
    torch.testing.assert_close(from_bf16, expected, **TOL)


def test_ibot_patch_loss_by_hand_weighs_images_not_patches():
    masks, k = _masks(), 16
    m = int(masks.sum())
    teacher = F.softmax(torch.randn(m, k), dim=-1)
    # Uniform student: every patch costs log K; the 3 images with a masked patch weigh 1 each
    # (2, 4 and 1 patches), the unmasked one 0, over 4 images.
    loss = ibot_patch_loss(torch.zeros(m, k), teacher, masks, 0.1)
    assert loss.item() == pytest.approx(3 * math.log(k) / 4, rel=1e-6)
    # Cost c on image 3's single patch only: it enters with weight 1 / 4, not 1 / M.
    student = torch.zeros(m, k, requires_grad=True)
    onehot = torch.zeros(m, k)
    onehot[:, 0] = 1.0
    logits = torch.zeros(m, k)
    logits[-1, 1] = 5.0  # image 3's patch: the student prefers prototype 1, the teacher says 0
    costs = -F.log_softmax(logits, dim=-1)[:, 0]  # per-patch cross-entropies at temperature 1
    expected = (costs[0:2].mean() + costs[2:6].mean() + costs[6]) / 4
    assert ibot_patch_loss(logits, onehot, masks, 1.0).item() == pytest.approx(expected.item(), rel=1e-6)
    ibot_patch_loss(student, teacher, masks, 0.1).backward()
    assert student.grad.abs().sum() > 0


def test_ibot_patch_loss_rejects_rows_that_do_not_match_the_masks():
    masks = _masks()
    with pytest.raises(ObjectiveError, match=r"masks.sum\(\) = 7"):
        ibot_patch_loss(torch.randn(6, 8), torch.randn(6, 8), masks, 0.1)
    with pytest.raises(ObjectiveError, match=r"\[N_img, T\]"):
        ibot_patch_loss(torch.randn(7, 8), torch.randn(7, 8), masks.flatten(), 0.1)


# --- KoLeo ------------------------------------------------------------------------------------------


def test_koleo_matches_dinov2_with_gradients():
    torch.manual_seed(15)
    x = torch.randn(10, 6, requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    loss, expected = koleo_loss(x), _ref_koleo(ref_x)
    torch.testing.assert_close(loss, expected, **TOL)
    loss.backward()
    expected.backward()
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-7)


def test_koleo_by_hand_square_and_scale_invariance():
    # Four points on the unit circle at right angles: every nearest neighbour is sqrt(2) away.
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert koleo_loss(square).item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    assert koleo_loss(7 * square).item() == pytest.approx(-0.5 * math.log(2), abs=1e-6)
    # Two antipodal points: each is the other's neighbour, 2 apart (DINOv2's -1 diagonal ties here).
    assert koleo_loss(square[[0, 2]]).item() == pytest.approx(-math.log(2), abs=1e-6)
    # Spreading the points lowers the loss: a tight cluster scores higher than the square.
    cluster = torch.tensor([[1.0, 0.0], [1.0, 0.1], [1.0, -0.1], [1.0, 0.2]])
    assert koleo_loss(cluster) > koleo_loss(square)


def test_koleo_single_row_is_zero_in_graph_and_float32_under_autocast():
    x = torch.randn(1, 4, requires_grad=True)
    loss = koleo_loss(x)
    assert loss.item() == 0.0
    loss.backward()
    torch.testing.assert_close(x.grad, torch.zeros(1, 4))
    torch.manual_seed(16)
    y = torch.randn(8, 6).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = koleo_loss(y)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, _ref_koleo(y.float()), **TOL)
