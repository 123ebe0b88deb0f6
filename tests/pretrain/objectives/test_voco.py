"""pretrain.objectives.voco against hand-computed values and against VoCo's own per-volume loops.

`_reference_v2` / `_reference_v1` restate `VoCoHead.forward` and its helpers from
Luffy03/Large-Scale-Medical (Self-supervised/models/voco_head.py) and Luffy03/VoCo
(models/voco_head.py) loop for loop, on the same heads, so the vectorised objective is
checked against the original formulation (including v2's nn.Dropout1d feature dropout).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fm3d.data.crops import VOCO_TINY
from fm3d.models.encoder import EncoderOutput
from pretrain.objectives.base import ObjectiveError
from pretrain.objectives.voco import VoCoObjective, position_loss, regularization_loss


def _online_assign(feats, bases):
    rows = [
        F.cosine_similarity(feats[i].unsqueeze(0), bases, dim=1).unsqueeze(0) for i in range(feats.shape[0])
    ]
    return F.relu(torch.cat(rows, 0))


def _regularization(bases):
    total, pairs = 0, 0
    for i in range(bases.shape[0] - 1):
        for j in range(i + 1, bases.shape[0]):
            pairs += 1
            sim = F.relu(F.cosine_similarity(bases[i].unsqueeze(0), bases[j].unsqueeze(0).detach(), dim=1))
            total += sim**2
    return total / pairs


def _ce(labels, logits, version):
    pos = -labels * torch.log(1 - torch.abs(labels - logits) + 1e-6)
    pos = pos.sum() / (labels.sum() + 1e-6)
    neg_lab = (labels == 0).long()
    neg = -neg_lab * torch.log(1 - logits + 1e-6) if version == "v2" else neg_lab * logits**2
    neg = neg.sum() / (neg_lab.sum() + 1e-6)
    return pos, neg


def _reference_v2(objective, crops, bases, labels):
    batch_size, sw_size, k = labels.shape
    total = crops.shape[0]
    embeddings = torch.cat([crops, bases])
    student = objective.student(nn.Dropout1d(objective.feature_dropout)(embeddings))
    with torch.no_grad():
        teacher = objective.teacher(embeddings)
    x_s, b_s, x_t, b_t = student[:total], student[total:], teacher[:total], teacher[total:]
    intra = inter = reg = 0.0
    for i in range(batch_size):
        xs, bs = x_s[i * sw_size : (i + 1) * sw_size], b_s[i * k : (i + 1) * k]
        xt, bt = x_t[i * sw_size : (i + 1) * sw_size], b_t[i * k : (i + 1) * k]
        intra = intra + sum(_ce(labels[i], _online_assign(xs, bt), "v2"))
        j = (i + 1) % batch_size
        pred1 = _online_assign(xt, b_t[j * k : (j + 1) * k])
        pred2 = _online_assign(xs, b_s[j * k : (j + 1) * k])
        inter = inter + sum(_ce(pred1.detach(), pred2, "v2"))
        reg = reg + _regularization(bs)
    return (intra + inter + reg) / batch_size


def _reference_v1(objective, crops, bases, labels):
    batch_size, sw_size, k = labels.shape
    total = crops.shape[0]
    embeddings = torch.cat([crops, bases])
    student = objective.student(embeddings)
    with torch.no_grad():
        teacher = objective.teacher(embeddings)
    x_s, b_s, x_t, b_t = student[:total], student[total:], teacher[:total], teacher[total:]
    pos = neg = reg = 0.0
    for i in range(batch_size):
        xs, bs = x_s[i * sw_size : (i + 1) * sw_size], b_s[i * k : (i + 1) * k]
        xt, bt = x_t[i * sw_size : (i + 1) * sw_size], b_t[i * k : (i + 1) * k]
        logits = (_online_assign(xs, bt) + _online_assign(xt, bs)) * 0.5
        p, n = _ce(labels[i], logits, "v1")
        pos, neg, reg = pos + p, neg + n, reg + _regularization(bs)
    return (pos + neg + reg) / batch_size


def _case(batch_size=3, embed_dim=12, seed=0):
    """Encoded crops/bases and real VoCo overlap labels from the tiny crop geometry."""
    rng = np.random.default_rng(seed)
    labels = np.stack(
        [VOCO_TINY.overlap_labels(VOCO_TINY.draw_random_centres(rng)) for _ in range(batch_size)]
    )
    labels = torch.tensor(labels, dtype=torch.float32)  # [B, R, K]
    b, r, k = labels.shape
    generator = torch.Generator().manual_seed(seed)
    crops = torch.randn(b * r, embed_dim, generator=generator, requires_grad=True)
    bases = torch.randn(b * k, embed_dim, generator=generator, requires_grad=True)
    encoded = {
        "voco_crops": EncoderOutput(tokens=crops[:, None], pooled=crops, grid=(1, 1, 1)),
        "voco_bases": EncoderOutput(tokens=bases[:, None], pooled=bases, grid=(1, 1, 1)),
    }
    return {"voco_labels": labels}, encoded, crops, bases, labels


def test_position_loss_by_hand():
    labels = torch.tensor([[[0.75, 0.25, 0.0]]])
    logits = torch.tensor([[[0.5, 0.25, 0.5]]])
    positive, negative = position_loss(labels, logits, "v2")
    expected_pos = -(0.75 * math.log(0.75 + 1e-6) + 0.25 * math.log(1 + 1e-6)) / (1 + 1e-6)
    assert positive.item() == pytest.approx(expected_pos, rel=1e-5)
    assert negative.item() == pytest.approx(-math.log(0.5 + 1e-6) / (1 + 1e-6), rel=1e-5)
    _, negative_v1 = position_loss(labels, logits, "v1")
    assert negative_v1.item() == pytest.approx(0.25 / (1 + 1e-6), rel=1e-5)


def test_regularization_by_hand():
    bases = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
    # Pairs: (0,1) 0, (0,2) 1/sqrt2, (0,3) -1 -> 0, (1,2) 1/sqrt2, (1,3) 0, (2,3) -1/sqrt2 -> 0.
    assert regularization_loss(bases).item() == pytest.approx((0.5 + 0.5) / 6, rel=1e-6)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_matches_voco_loops(version):
    torch.manual_seed(0)
    objective = VoCoObjective(12, version=version, hidden_dim=16, out_dim=8)
    batch, encoded, crops, bases, labels = _case()
    torch.manual_seed(123)  # the same dropout mask for both
    loss, metrics = objective(batch, encoded)
    torch.manual_seed(123)
    reference = (_reference_v2 if version == "v2" else _reference_v1)(objective, crops, bases, labels)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    (grad,) = torch.autograd.grad(loss, crops)
    (reference_grad,) = torch.autograd.grad(reference, crops)
    torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-6)
    expected_keys = {"intra", "inter"} if version == "v2" else {"positive", "negative"}
    assert set(metrics) == expected_keys | {"regularization", "position_accuracy"}


def test_v2_feature_dropout_zeroes_whole_embeddings_in_training_only():
    objective = VoCoObjective(12, hidden_dim=16, out_dim=8)
    assert objective.feature_dropout == 0.2 and VoCoObjective(12, version="v1").feature_dropout == 0.0
    batch, encoded, *_ = _case()
    objective.eval()
    first, _ = objective(batch, encoded)
    second, _ = objective(batch, encoded)
    assert first.item() == second.item()  # no dropout at evaluation
    # torch's Dropout1d on [N, C] drops rows: what VoCo's feature augmentation does.
    dropped = F.dropout1d(torch.ones(200, 5), 0.2, training=True)
    assert set(torch.unique(dropped.sum(1)).tolist()) <= {0.0, 5 / 0.8}


def test_position_accuracy_counts_the_argmax_base():
    objective = VoCoObjective(4, version="v1", hidden_dim=8, out_dim=4).eval()
    labels = torch.tensor([[[0.7, 0.3, 0.0, 0.0], [0.0, 0.1, 0.0, 0.9]]])
    logits = torch.tensor([[[0.9, 0.1, 0.0, 0.0], [0.0, 0.8, 0.0, 0.2]]])
    assert (logits.argmax(-1) == labels.argmax(-1)).float().mean().item() == 0.5
    # Make the crops' projections equal to their best base's: accuracy 1 on a real forward.
    batch, encoded, *_ = _case(batch_size=2, embed_dim=4)
    bases = encoded["voco_bases"].pooled.detach()
    best = batch["voco_labels"].argmax(-1)  # [B, R]
    k = batch["voco_labels"].shape[2]
    crops = torch.stack([bases[b * k + best[b, r]] for b in range(2) for r in range(best.shape[1])])
    encoded["voco_crops"] = EncoderOutput(tokens=crops[:, None], pooled=crops, grid=(1, 1, 1))
    objective.teacher.load_state_dict(objective.student.state_dict())
    with torch.no_grad():
        _, metrics = objective(batch, encoded)
    assert metrics["position_accuracy"].item() == 1.0


def test_ema_teacher_update():
    objective = VoCoObjective(6, momentum=0.9, hidden_dim=8, out_dim=4)
    student = [p.detach().clone() for p in objective.student.parameters()]
    teacher = [p.detach().clone() for p in objective.teacher.parameters()]
    objective.on_train_batch_end()
    for s, t, now in zip(student, teacher, objective.teacher.parameters(), strict=True):
        torch.testing.assert_close(now, 0.9 * t + 0.1 * s)
    assert not any(p.requires_grad for p in objective.teacher.parameters())


def test_every_trainable_parameter_gets_a_gradient():
    for version in ("v2", "v1"):
        objective = VoCoObjective(12, version=version, hidden_dim=16, out_dim=8)
        batch, encoded, crops, bases, _ = _case()
        loss, _ = objective(batch, encoded)
        loss.backward()
        assert all(p.grad is not None for p in objective.parameters() if p.requires_grad)
        assert crops.grad is not None and bases.grad is not None


def test_shape_errors_name_the_contract():
    objective = VoCoObjective(12, hidden_dim=16, out_dim=8)
    batch, encoded, *_ = _case()
    batch["voco_labels"] = batch["voco_labels"][:2]
    with pytest.raises(ObjectiveError, match="sample-major"):
        objective(batch, encoded)
    with pytest.raises(ObjectiveError, match="voco_labels"):
        objective({}, encoded)
    with pytest.raises(ObjectiveError, match="version"):
        VoCoObjective(12, version="v3")
