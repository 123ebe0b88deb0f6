"""The DINO objective: DINOv2's schedules, the EMA teacher of encoder and head, centring, export."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fm3d
from pretrain.module import PretrainModule
from pretrain.objectives.base import ObjectiveError
from pretrain.objectives.dino import DINOObjective, teacher_momentum, teacher_temperature

TINY = {"image_size": [16, 16, 16], "patch_size": [8, 8, 8], "depth": 2}


def dinov2_cosine_schedule(base, final, total_iters, warmup_iters=0, start_warmup_value=0.0) -> np.ndarray:
    """DINOv2's `dinov2/utils/utils.py` CosineScheduler.schedule (no freeze), re-implemented."""
    warmup = np.linspace(start_warmup_value, base, warmup_iters)
    iters = np.arange(total_iters - warmup_iters)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))
    return np.concatenate((warmup, cosine))


def test_momentum_follows_dinov2s_cosine_schedule():
    expected = dinov2_cosine_schedule(0.992, 1.0, 50)
    got = [teacher_momentum(step, 50, 0.992, 1.0) for step in range(50)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert teacher_momentum(50, 50, 0.992, 1.0) == 1.0


def test_teacher_temperature_warms_up_as_dinov2s_scheduler():
    # DINOv2 builds it as CosineScheduler(0.07, 0.07, warmup, warmup, start_warmup_value=0.04).
    expected = dinov2_cosine_schedule(0.07, 0.07, 15, warmup_iters=15, start_warmup_value=0.04)
    got = [teacher_temperature(step, 15, 0.04, 0.07) for step in range(15)]
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    assert teacher_temperature(15, 15, 0.04, 0.07) == teacher_temperature(400, 15, 0.04, 0.07) == 0.07


def make(ibot: bool = True, **kwargs) -> tuple[torch.nn.Module, DINOObjective]:
    torch.manual_seed(0)
    encoder = fm3d.create_encoder("vit3d_tiny", **TINY)
    objective = DINOObjective(
        encoder.embed_dim, prototypes=32, head_hidden_dim=16, bottleneck_dim=8, ibot=ibot, **kwargs
    )
    objective.bind(encoder)
    return encoder, objective


def multicrop_batch(batch_size: int = 3, seed: int = 0) -> dict:
    """Contract-shaped multicrop batch: 2 global 16^3 crops (8 tokens each), 3 local 8^3 crops."""
    g = torch.Generator().manual_seed(seed)
    masks = torch.zeros(batch_size, 2, 8, dtype=torch.bool)
    masks[:, 0, :3] = True  # one masked global crop per sample, as DINOv2 masks half the crops
    return {
        "global_crops": torch.randn(batch_size, 2, 1, 16, 16, 16, generator=g),
        "local_crops": torch.randn(batch_size, 3, 1, 8, 8, 8, generator=g),
        "global_masks": masks,
    }


def step(encoder, objective, batch):
    encoded = objective.encode(encoder, batch)
    return objective(batch, encoded)


def test_the_teacher_starts_as_a_frozen_copy_and_is_saved_without_the_student_encoder():
    encoder, objective = make()
    for (name, s), (_, t) in zip(
        encoder.state_dict().items(), objective.teacher_encoder.state_dict().items(), strict=True
    ):
        assert torch.equal(s, t), name
    assert not any(p.requires_grad for p in objective.teacher_encoder.parameters())
    assert not any(p.requires_grad for p in objective.teacher_head.parameters())
    keys = objective.state_dict().keys()
    assert any(k.startswith("teacher_encoder.blocks.") for k in keys)
    assert not any(k.startswith("blocks.") for k in keys)  # the student encoder is not held twice
    assert "center.center" in keys and "mask_token" in keys


def test_gradients_reach_the_student_and_its_mask_token_never_the_teacher():
    encoder, objective = make()
    objective.train()
    loss, metrics = step(encoder, objective, multicrop_batch())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.blocks.parameters())
    assert objective.mask_token.grad is not None and objective.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in objective.teacher_encoder.parameters())
    assert set(metrics) == {"dino", "koleo", "ibot", "teacher_entropy", "teacher_temp", "momentum"}


def test_the_ema_update_moves_encoder_and_head_by_the_scheduled_momentum():
    encoder, objective = make()
    with torch.no_grad():
        for p in [*encoder.parameters(), *objective.student_head.parameters()]:
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in objective.teacher_encoder.state_dict().items()}
    head_before = [p.clone() for p in objective.teacher_head.parameters()]
    objective.on_train_batch_start(step=10, max_steps=20)
    m = teacher_momentum(10, 20, 0.992, 1.0)
    assert objective.momentum == m
    objective.on_train_batch_end()
    for name, student in encoder.state_dict().items():
        if name in dict(encoder.named_parameters()):
            expected = m * before[name] + (1 - m) * student
            torch.testing.assert_close(objective.teacher_encoder.state_dict()[name], expected)
    for t0, s, t in zip(
        head_before, objective.student_head.parameters(), objective.teacher_head.parameters(), strict=True
    ):
        torch.testing.assert_close(t, m * t0 + (1 - m) * s.detach())


def test_the_running_centre_moves_in_training_only():
    encoder, objective = make()
    batch = multicrop_batch()
    objective.eval()
    step(encoder, objective, batch)
    assert objective.center.center.abs().sum() == 0
    objective.train()
    step(encoder, objective, batch)
    assert objective.center.center.abs().sum() > 0


def test_sinkhorn_knopp_centring_and_no_ibot_train():
    encoder, objective = make(ibot=False, centering="sinkhorn_knopp")
    loss, metrics = step(encoder, objective, multicrop_batch())
    loss.backward()
    assert torch.isfinite(loss) and "ibot" not in metrics
    assert objective.mask_token is None


def test_ibot_needs_a_vit_and_bad_settings_are_refused():
    encoder = fm3d.create_encoder("swin3d_tiny")
    with pytest.raises(ObjectiveError, match="ibot: false"):
        DINOObjective(encoder.embed_dim, prototypes=8).bind(encoder)
    DINOObjective(encoder.embed_dim, prototypes=8, ibot=False).bind(encoder)  # DINO alone takes any family
    with pytest.raises(ObjectiveError, match="centering"):
        DINOObjective(8, centering="mean")
    with pytest.raises(ObjectiveError, match="export"):
        DINOObjective(8, export="both")


def test_a_run_exports_the_teacher_unless_told_the_student(tmp_path):
    def module(export: str) -> PretrainModule:
        def factory(dim: int) -> DINOObjective:
            return DINOObjective(dim, prototypes=16, head_hidden_dim=16, bottleneck_dim=8, export=export)

        return PretrainModule("vit3d_tiny", TINY, objectives={"dino": factory})

    assert module("teacher").exported_encoder_prefix() == "objectives.dino.teacher_encoder."
    assert module("student").exported_encoder_prefix() == "encoder."


@pytest.mark.parametrize("centering", ["softmax", "sinkhorn_knopp"])
def test_a_batch_without_any_masked_token_gives_a_finite_loss_and_keeps_the_patch_centre(centering):
    """The multicrop view masks each global crop with a probability: a batch may mask none."""
    encoder, objective = make(centering=centering)
    objective.train()
    batch = multicrop_batch()
    batch["global_masks"][:] = False
    loss, metrics = step(encoder, objective, batch)
    loss.backward()
    assert torch.isfinite(loss) and metrics["ibot"] == 0
    assert objective.patch_center.center.abs().sum() == 0
    assert objective.mask_token.grad is not None  # still in the graph: DDP sees every parameter used
