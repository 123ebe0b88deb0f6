"""Fine-tune strategies: frozen keeps weights bit-identical, LoRA trains only adapters, LLRD lrs per layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import fm3d
from downstream.strategies import (
    FinetuneStrategy,
    StrategyError,
    apply_strategy,
    layer_scales,
    parameter_groups,
)
from downstream.tasks.classification import ClassificationTask
from fm3d.models import registry
from fm3d.models.config import EncoderConfig
from fm3d.models.encoder import EncoderFamily, EncoderOutput
from fm3d.models.families.vit3d import vit_layer_id

TINY = {"embed_dim": 32, "depth": 3, "num_heads": 2, "patch_size": 8, "image_size": (16, 16, 16)}


def _batches(n: int = 4) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [
        {
            "image": torch.rand(2, 1, 16, 16, 16, generator=g) * 2000 - 1000,
            "labels": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
            "label_mask": torch.ones(2, 2, dtype=torch.bool),
            "study_id": ["a", "b"],
        }
        for _ in range(n)
    ]


def _train(task: ClassificationTask, steps: int = 4) -> None:
    trainer = L.Trainer(
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(task, DataLoader(_batches(steps), batch_size=None))


def _task(strategy: FinetuneStrategy) -> ClassificationTask:
    torch.manual_seed(0)
    return ClassificationTask("vit3d_tiny", ["x", "y"], strategy=strategy, encoder_overrides=TINY, lr=1e-2)


def test_frozen_leaves_encoder_weights_bit_identical() -> None:
    task = _task(FinetuneStrategy("frozen"))
    before = {k: v.clone() for k, v in task.encoder.state_dict().items()}
    head_before = task.head[-1].weight.clone()
    _train(task)
    after = task.encoder.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, task.head[-1].weight)
    assert not task.encoder.training  # frozen encoder stays in eval mode


def test_lora_trains_only_adapters_and_merges_back() -> None:
    task = _task(FinetuneStrategy("lora", lora_rank=2))
    trainable = {n for n, p in task.encoder.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.rsplit(".lora_", 1)[0] for n in trainable}
    assert {"blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"} <= wrapped
    before = {n: p.clone() for n, p in task.encoder.named_parameters()}
    _train(task)
    for name, param in task.encoder.named_parameters():
        changed = not torch.equal(before[name], param)
        if "lora_" not in name:
            assert not changed, name
    assert any(not torch.equal(before[n], p) for n, p in task.encoder.named_parameters() if "lora_B" in n)

    # Merging folds the adapters in: same outputs, plain parameter names, loadable by a fresh encoder.
    x = torch.rand(1, 1, 16, 16, 16)
    task.eval()
    with torch.no_grad():
        expected = task.encoder(x).pooled
        plain = task.plain_encoder()
        fresh = fm3d.create_encoder("vit3d_tiny", **TINY)
        fresh.load_state_dict(plain.state_dict())
        assert torch.allclose(fresh(x).pooled, expected, atol=1e-5)


def test_layerwise_lr_decay_assigns_the_documented_lr_per_layer() -> None:
    encoder = fm3d.create_encoder("vit3d_tiny", **TINY)
    decay, lr, depth = 0.5, 1e-3, TINY["depth"]
    scales = layer_scales(encoder, decay)
    assert math.isclose(scales["patch_embed.proj.weight"], decay ** (depth + 1))
    assert math.isclose(scales["blocks.0.attn.qkv.weight"], decay**depth)
    assert math.isclose(scales[f"blocks.{depth - 1}.mlp.fc2.weight"], decay**1)
    assert math.isclose(scales["norm.weight"], 1.0)
    head = torch.nn.Linear(32, 2)
    groups = parameter_groups(
        encoder, head.named_parameters(), FinetuneStrategy("full", layer_decay=decay), lr, 0.05
    )
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, param in encoder.named_parameters():
        assert math.isclose(lr_of[id(param)], lr * decay ** (depth + 1 - vit_layer_id(name, depth)))
    assert lr_of[id(head.weight)] == lr and wd_of[id(head.weight)] == 0.05 and wd_of[id(head.bias)] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(list(encoder.parameters())) + 2


def test_strategy_validation() -> None:
    with pytest.raises(StrategyError, match="unknown fine-tune strategy"):
        FinetuneStrategy("partial")
    encoder = fm3d.create_encoder("vit3d_tiny", **TINY)
    with pytest.raises(StrategyError, match=r"LoRA found no nn\.Linear"):
        apply_strategy(encoder, FinetuneStrategy("lora", lora_targets=("nothing_named_so",)))


def test_fine_tuning_uses_the_shared_no_decay_rule_and_schedule() -> None:
    # One rule for both applications (fm3d.train.optim): the position table (3-D) takes no decay,
    # and the task's scheduler is pretraining's warmup-cosine over the trainer's steps.
    task = ClassificationTask(
        "vit3d_tiny", ["x", "y"], strategy=FinetuneStrategy("full", layer_decay=1.0),
        encoder_overrides=TINY, lr=1e-2, weight_decay=0.05, warmup_steps=2,
    )  # fmt: skip
    _train(task, steps=4)
    optimizer = task.trainer.optimizers[0]
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert wd_of[id(task.encoder.pos_embed)] == 0.0
    assert wd_of[id(task.encoder.blocks[0].attn.qkv.weight)] == 0.05
    (scheduler,) = [config.scheduler for config in task.trainer.lr_scheduler_configs]
    assert scheduler.state_dict()["lr_lambdas"][0] == {"warmup_steps": 2, "max_steps": 4, "min_ratio": 0.0}


@dataclass
class StackConfig(EncoderConfig):
    """A test family: `layers` Linear stages, each with an `inner` and an `outer` projection."""

    family: ClassVar[str] = "stack_test"
    width: int = 4
    layers: int = 3


class Stack(nn.Module):
    """Tokens of a volume through `layers` (inner, outer) Linear pairs; a tiny but real encoder."""

    def __init__(self, config: StackConfig) -> None:
        super().__init__()
        self.config, self.embed_dim = config, config.width
        self.stem = nn.Linear(1, config.width)
        self.stages = nn.ModuleList(
            nn.ModuleDict(
                {
                    "inner": nn.Linear(config.width, config.width),
                    "outer": nn.Linear(config.width, config.width),
                }
            )
            for _ in range(config.layers)
        )

    def forward(self, x: torch.Tensor, hidden_layers=None) -> EncoderOutput:
        tokens = self.stem(x.flatten(2).transpose(1, 2))
        for stage in self.stages:
            tokens = stage["outer"](torch.relu(stage["inner"](tokens)))
        return EncoderOutput(tokens, tokens.mean(1), tuple(x.shape[2:]))


def _stage_id(param_name: str, depth: int) -> int:
    """stem 0, stages.i -> i + 1 (nothing follows the last stage)."""
    return int(param_name.split(".")[1]) + 1 if param_name.startswith("stages.") else 0


@pytest.fixture
def stack_family(monkeypatch: pytest.MonkeyPatch) -> EncoderFamily:
    registry.discover_families()
    monkeypatch.setattr(registry, "_FAMILIES", dict(registry._FAMILIES))
    return registry.register_family(
        EncoderFamily(
            StackConfig,
            width=lambda c: c.width,
            depth=lambda c: c.layers,
            layer_id=_stage_id,
            lora_targets=("inner",),
        )
    )


def test_a_registered_family_gets_lora_on_its_declared_targets(stack_family: EncoderFamily) -> None:
    encoder = apply_strategy(Stack(StackConfig()), FinetuneStrategy("lora", lora_rank=2))
    adapted = {n.rsplit(".lora_", 1)[0] for n, p in encoder.named_parameters() if p.requires_grad}
    assert adapted == {"stages.0.inner", "stages.1.inner", "stages.2.inner"}
    # An explicit strategy.lora_targets still overrides the declaration.
    encoder = apply_strategy(Stack(StackConfig()), FinetuneStrategy("lora", lora_targets=("1.outer",)))
    assert {n.rsplit(".lora_", 1)[0] for n, p in encoder.named_parameters() if p.requires_grad} == {
        "stages.1.outer"
    }


def test_a_registered_family_gets_layer_decay_from_its_declared_layer_ids(
    stack_family: EncoderFamily,
) -> None:
    scales = layer_scales(Stack(StackConfig(layers=3)), 0.5)
    # depth 3: layer l gets 0.5 ** (4 - l); the stem (0) 1/16, stage 2 (layer 3) 1/2.
    assert scales["stem.weight"] == 0.5**4 and scales["stages.0.inner.bias"] == 0.5**3
    assert scales["stages.2.outer.weight"] == 0.5


def test_families_without_declarations_get_clear_errors(stack_family: EncoderFamily) -> None:
    resnet = fm3d.create_encoder("resnet3d_i3d", layers=(1, 1, 1, 1), base_width=4)
    with pytest.raises(StrategyError, match=r"declares no layer ids.*layer_decay: 1\.0.*'swin3d', 'vit3d'"):
        layer_scales(resnet, 0.75)
    assert set(layer_scales(resnet, 1.0).values()) == {1.0}
    with pytest.raises(StrategyError, match=r"family 'resnet3d_i3d' declares no LoRA targets.*lora_targets"):
        apply_strategy(resnet, FinetuneStrategy("lora"))
