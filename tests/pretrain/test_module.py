"""PretrainModule: weighted objectives, masks that keep every parameter in use, checkpoints, switches."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

import fm3d
from pretrain.module import PretrainConfigError, PretrainModule
from pretrain.objectives.clip import ClipObjective

TINY = {"image_size": [16, 16, 16], "patch_size": [8, 8, 8]}


def clip_factory(text_model, **kwargs):
    return functools.partial(ClipObjective, text_model=str(text_model), proj_dim=16, max_length=16, **kwargs)


def build(text_model, **kwargs) -> PretrainModule:
    torch.manual_seed(0)
    return PretrainModule("vit3d_tiny", TINY, {"clip": clip_factory(text_model)}, **kwargs)


def test_embed_dim_comes_from_the_encoder(tiny_text_model) -> None:
    module = build(tiny_text_model)
    assert module.encoder.embed_dim == 192
    assert module.objectives["clip"].clip.image_projection.in_features == 192
    assert module.views == ("image",)


def test_every_parameter_gets_a_gradient_when_no_study_has_a_report(tiny_text_model, batch_factory) -> None:
    module = build(tiny_text_model)
    batch = batch_factory(4, has_report=False)
    encoded = module.encode(batch)
    loss, _ = module.objectives["clip"](batch, encoded)
    loss.backward()
    assert torch.isfinite(loss) and loss.item() == 0.0
    missing = [n for n, p in module.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def _fit(module: PretrainModule, batches: list[dict], tmp_path, **trainer_kwargs) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(batches),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        **trainer_kwargs,
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def test_total_loss_is_the_weighted_sum(tiny_text_model, batch_factory, tmp_path) -> None:
    module = build(tiny_text_model, loss_weights={"clip": 0.25})
    trainer = _fit(module, [batch_factory(4)], tmp_path)
    metrics = trainer.callback_metrics
    torch.testing.assert_close(metrics["train/loss"], 0.25 * metrics["train/clip/loss"])
    assert "train/clip/i2t_recall_at_1" in metrics


def test_checkpoint_rebuilds_the_encoder_with_weights_only(tiny_text_model, batch_factory, tmp_path) -> None:
    module = build(tiny_text_model)
    trainer = _fit(module, [batch_factory(4, seed=s) for s in range(2)], tmp_path)
    path = tmp_path / "x.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # no pickled objects anywhere
    assert checkpoint["fm3d_encoder_config"]["name"] == "vit3d_tiny"
    assert checkpoint["hyper_parameters"]["objectives"] == {"clip": "ClipObjective"}
    encoder = fm3d.load_encoder(path)
    for name, tensor in module.encoder.state_dict().items():
        torch.testing.assert_close(encoder.state_dict()[name], tensor, rtol=0, atol=0)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_text_model, batch_factory) -> None:
    batch = batch_factory(3)
    grads = []
    for flag in (False, True):
        module = build(tiny_text_model, grad_checkpointing=flag)
        module.train()
        loss, _ = module.objectives["clip"](batch, module.encode(batch))
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_compile_keeps_checkpoint_keys(tiny_text_model) -> None:
    plain = build(tiny_text_model)
    compiled = build(tiny_text_model, compile=True)
    assert compiled.state_dict().keys() == plain.state_dict().keys()


def test_configuration_errors_name_the_fix(tiny_text_model, batch_factory) -> None:
    with pytest.raises(PretrainConfigError, match="needs an objective"):
        PretrainModule("vit3d_tiny", TINY, {})
    with pytest.raises(PretrainConfigError, match="loss_weights names \\['voco'\\]"):
        build(tiny_text_model, loss_weights={"voco": 1.0})
    module = build(tiny_text_model)
    batch = batch_factory(2)
    del batch["image"]
    with pytest.raises(PretrainConfigError, match="batch key 'image'"):
        module.encode(batch)


def test_the_config_can_name_the_checkpoint_monitor(tiny_text_model) -> None:
    assert build(tiny_text_model).checkpoint_monitor() == ("val/clip/loss", "min")
    chosen = build(tiny_text_model, monitor="val/clip/i2t_recall_at_5", monitor_mode="max")
    assert chosen.checkpoint_monitor() == ("val/clip/i2t_recall_at_5", "max")
    with pytest.raises(PretrainConfigError, match=r"model\.monitor_mode is 'highest'; use 'min' or 'max'"):
        build(tiny_text_model, monitor="val/loss", monitor_mode="highest")
