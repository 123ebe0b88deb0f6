"""AdamW parameter groups and warmup-cosine schedule against hand-computed values and torch's schedulers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from pretrain.optim import OptimizerSettings, build_optimizer, parameter_groups


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)  # weight decays, bias does not
        self.norm = nn.LayerNorm(3)  # neither decays
        self.pos_embed = nn.Parameter(torch.ones(1, 5, 3))  # 3-D but an embedding table
        self.cls_token = nn.Parameter(torch.ones(1, 1, 3))
        self.logit_scale = nn.Parameter(torch.tensor(2.0))
        self.teacher = nn.Linear(3, 3)
        self.teacher.requires_grad_(False)


def test_parameter_groups_split_by_role() -> None:
    model = _Tiny()
    groups = parameter_groups(model.named_parameters(), weight_decay=0.1)
    by_id = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert by_id == {
        id(model.proj.weight): 0.1,
        id(model.proj.bias): 0.0,
        id(model.norm.weight): 0.0,
        id(model.norm.bias): 0.0,
        id(model.pos_embed): 0.0,
        id(model.cls_token): 0.0,
        id(model.logit_scale): 0.0,
    }  # frozen teacher left out


def test_adamw_step_decays_only_the_decay_group() -> None:
    # With zero gradients Adam's update is 0, so only decoupled weight decay moves parameters:
    # p <- p * (1 - lr * wd) for the decayed group, unchanged for the rest.
    model = _Tiny()
    settings = OptimizerSettings(lr=0.5, weight_decay=0.1, warmup_steps=0)
    optimizer, _ = build_optimizer(model, settings, max_steps=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.5 * 0.1) if name == "proj.weight" else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_fused_adamw_takes_the_same_steps_as_the_loop() -> None:
    models = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = _Tiny()
        optimizer, scheduler = build_optimizer(model, OptimizerSettings(lr=0.1, fused=fused), max_steps=5)
        assert optimizer.defaults["fused"] is fused
        for step in range(5):
            torch.manual_seed(step)
            optimizer.zero_grad()
            loss = model.proj(torch.randn(8, 4)).pow(2).mean() + model.pos_embed.sum() * model.logit_scale
            loss.backward()
            optimizer.step()
            scheduler.step()
        models[fused] = model
    for (name, fused_param), loop_param in zip(
        models[True].named_parameters(), models[False].parameters(), strict=True
    ):
        torch.testing.assert_close(fused_param, loop_param, rtol=1e-6, atol=1e-7, msg=name)


def test_cosine_phase_matches_torch_cosine_annealing() -> None:
    lr, warmup, total, min_ratio = 0.3, 3, 20, 0.05
    ours_model, ref_model = nn.Linear(2, 2), nn.Linear(2, 2)
    ours, scheduler = build_optimizer(
        ours_model, OptimizerSettings(lr=lr, warmup_steps=warmup, min_lr_ratio=min_ratio), max_steps=total
    )
    ref = torch.optim.AdamW(ref_model.parameters(), lr=lr)
    ref_scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        ref, T_max=total - warmup, eta_min=lr * min_ratio
    )
    for _ in range(warmup):
        ours.step()
        scheduler.step()
    for _ in range(total - warmup):
        assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-9)
        ours.step()
        scheduler.step()
        ref.step()
        ref_scheduler.step()


def test_scheduler_state_round_trips() -> None:
    _, scheduler = build_optimizer(nn.Linear(2, 2), OptimizerSettings(warmup_steps=2), max_steps=7)
    state = scheduler.state_dict()
    assert state["lr_lambdas"][0] == {"warmup_steps": 2, "max_steps": 7, "min_ratio": 0.0}


def test_warmup_longer_than_the_run_is_cut_to_the_run() -> None:
    _, scheduler = build_optimizer(nn.Linear(2, 2), OptimizerSettings(warmup_steps=10), max_steps=4)
    assert scheduler.state_dict()["lr_lambdas"][0]["warmup_steps"] == 4
