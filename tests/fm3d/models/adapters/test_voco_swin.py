"""VoCo / SwinUNETR(-v2) weights load as swin3d and reproduce MONAI SwinUNETR's encoder outputs."""

from __future__ import annotations

import argparse

import pytest
import torch
from monai.networks.nets import SwinUNETR

import fm3d
from fm3d.io import EncoderLoadError, UnsafeCheckpointError
from fm3d.models.adapters import PeerWeightsError, check_conversion, convert_peer_weights
from fm3d.models.registry import create_encoder

ATOL = 1e-5


def _swin_unetr(use_v2: bool = True) -> SwinUNETR:
    torch.manual_seed(0)
    net = SwinUNETR(
        in_channels=1,
        out_channels=3,
        feature_size=12,
        depths=(1, 1, 2, 1),
        num_heads=(1, 2, 2, 4),
        window_size=4,
        use_v2=use_v2,
    )
    with torch.no_grad():  # non-trivial norms and position biases, so a swapped one shows
        for name, tensor in net.named_parameters():
            if "norm" in name or "relative_position_bias_table" in name:
                tensor.normal_(0, 0.5)
    return net.eval()


def _monai_encoder_maps(net: SwinUNETR, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SwinUNETR's bottleneck (encoder10) and its five skip maps, from MONAI's own modules."""
    with torch.no_grad():
        stages = net.swinViT(x, net.normalize)
        convs = [net.encoder2, net.encoder3, net.encoder4]
        skips = [
            net.encoder1(x),
            *(conv(stage) for conv, stage in zip(convs, stages, strict=False)),
            stages[3],
        ]
        return net.encoder10(stages[4]), skips


def _tokens(feature_map: torch.Tensor) -> torch.Tensor:
    return feature_map.flatten(2).transpose(1, 2)


def _wrap(state: dict, how: str) -> dict:
    if how == "plain":
        return state
    if how == "state_dict+module.":  # DDP training script checkpoint
        return {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 10}
    if how == "network_weights+backbone.":  # nnU-Net style wrapper around VoCo-v2's VoCoHead
        return {"network_weights": {f"backbone.{k}": v for k, v in state.items()}}
    if how == "net+swin_vit":  # old MONAI self-supervised naming
        return {"net": {k.replace("swinViT.", "swin_vit."): v for k, v in state.items()}}
    raise ValueError(how)


@pytest.mark.parametrize("how", ["plain", "state_dict+module.", "network_weights+backbone.", "net+swin_vit"])
def test_voco_checkpoint_loads_and_matches_swinunetr_encoder(tmp_path, how):
    net = _swin_unetr()
    path = tmp_path / "voco.pt"
    torch.save(_wrap(net.state_dict(), how), path)

    encoder = fm3d.load_encoder(path).eval()

    x = torch.randn(1, 1, 32, 64, 32)
    bottleneck, skips = _monai_encoder_maps(net, x)
    out = encoder(x, hidden_layers=[0, 1, 2, 3, 4])
    torch.testing.assert_close(out.tokens, _tokens(bottleneck), atol=ATOL, rtol=0)
    assert out.grid == tuple(bottleneck.shape[2:])
    for mine, theirs in zip(out.hidden, skips, strict=True):
        torch.testing.assert_close(mine, _tokens(theirs), atol=ATOL, rtol=0)
    config = encoder.config
    assert (config.feature_size, config.depths, config.num_heads) == (12, (1, 1, 2, 1), (1, 2, 2, 4))
    assert (config.window_size, config.use_v2) == (4, True)
    assert (config.target_spacing_mm, config.hu_window) == ((1.5, 1.5, 1.5), (-175.0, 250.0))
    spec = config.input_spec
    assert (spec.intensity_range, spec.axis_order, spec.image_size) == ((0.0, 1.0), "xyz", (96, 96, 96))
    # The source records provenance only; the spec lives in the spec fields, once.
    assert config.source["format"] == "voco" and not {"input_permute", "intensity", "spacing_mm"} & set(
        config.source
    )
    decoder_keys = [k for k in net.state_dict() if not k.startswith(("swinViT.", "encoder"))]
    assert encoder.peer_weights_report.ignored == len(decoder_keys)


def test_swinunetr_v1_without_residual_conv_blocks_loads(tmp_path):
    net = _swin_unetr(use_v2=False)
    path = tmp_path / "swinunetr.pt"
    torch.save(net.state_dict(), path)

    encoder = fm3d.load_encoder(path, format="voco").eval()

    x = torch.randn(1, 1, 64, 32, 32)  # instance norm needs > 1 voxel at 1/32
    bottleneck, _ = _monai_encoder_maps(net, x)
    torch.testing.assert_close(encoder(x).tokens, _tokens(bottleneck), atol=ATOL, rtol=0)
    assert encoder.config.use_v2 is False


def test_swin_only_checkpoint_fails_naming_the_missing_conv_blocks(tmp_path):
    state = {k: v for k, v in _swin_unetr().state_dict().items() if k.startswith("swinViT.")}
    path = tmp_path / "ssl_swin.pt"
    torch.save(state, path)

    with pytest.raises(PeerWeightsError) as caught:
        fm3d.load_encoder(path)
    message = str(caught.value)
    assert str(path) in message and "encoder10.layer.conv1.conv.weight" in message


def test_student_and_teacher_in_one_file_is_refused_as_ambiguous(tmp_path):
    state = _swin_unetr().state_dict()
    both = {f"{who}.{k}": v for who in ("student", "teacher") for k, v in state.items()}
    path = tmp_path / "voco_head.pt"
    torch.save({"state_dict": both}, path)

    with pytest.raises(PeerWeightsError, match=r"student\.swinViT\..*teacher\.swinViT\."):
        fm3d.load_encoder(path)


def test_renamed_module_is_not_silently_skipped(tmp_path):
    # VoCo's own loader keeps only keys that already match, so this file would load nothing.
    state = {k.replace("swinViT.", "swin."): v for k, v in _swin_unetr().state_dict().items()}
    path = tmp_path / "voco.pt"
    torch.save(state, path)

    with pytest.raises(PeerWeightsError, match="no peer layout recognised"):
        fm3d.load_encoder(path)
    with pytest.raises(PeerWeightsError, match=r"swinViT\.patch_embed\.proj\.weight"):
        fm3d.load_encoder(path, format="voco")


def test_checkpoint_with_pickled_objects_needs_trust_pickle(tmp_path):
    net = _swin_unetr()
    path = tmp_path / "voco_with_args.pt"
    # Training scripts often save their argparse namespace beside the weights.
    torch.save({"state_dict": net.state_dict(), "args": argparse.Namespace(roi_x=96)}, path)

    with pytest.raises(UnsafeCheckpointError, match="trust_pickle=True"):
        fm3d.load_encoder(path)
    encoder = fm3d.load_encoder(path, trust_pickle=True).eval()

    x = torch.randn(1, 1, 64, 32, 32)  # instance norm needs > 1 voxel at 1/32
    bottleneck, _ = _monai_encoder_maps(net, x)
    torch.testing.assert_close(encoder(x).tokens, _tokens(bottleneck), atol=ATOL, rtol=0)


def test_pickled_whole_model_loads_with_trust_pickle(tmp_path):
    net = _swin_unetr()
    path = tmp_path / "swinunetr_model.pt"
    torch.save({"model": net, "epoch": 1}, path)

    with pytest.raises(UnsafeCheckpointError, match="SwinUNETR"):
        fm3d.load_encoder(path)
    encoder = fm3d.load_encoder(path, trust_pickle=True).eval()

    x = torch.randn(1, 1, 64, 32, 32)  # instance norm needs > 1 voxel at 1/32
    bottleneck, _ = _monai_encoder_maps(net, x)
    torch.testing.assert_close(encoder(x).tokens, _tokens(bottleneck), atol=ATOL, rtol=0)


def test_byte_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "voco.pt"
    torch.save(_swin_unetr().state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    with pytest.raises(EncoderLoadError, match=r"voco\.pt"):
        fm3d.load_encoder(path)


def test_full_size_voco_b_key_set_covers_swin3d_base():
    # VoCo-B as published: SwinUNETR-v2, feature_size 48, depths 2-2-2-2, heads 3-6-12-24, window 7.
    # (MONAI's SwinUNETR cannot be built on the meta device, so this one allocates ~60M parameters.)
    state = SwinUNETR(in_channels=1, out_channels=21, feature_size=48, use_v2=True).state_dict()
    conversion = convert_peer_weights({"state_dict": state}, "VoComni_B.pt")
    encoder = create_encoder(conversion.encoder_name, **conversion.config)
    report = check_conversion(encoder, conversion, "VoComni_B.pt")

    assert conversion.encoder_name == "swin3d_base"
    assert conversion.config["window_size"] == 7 and conversion.config["num_heads"] == (3, 6, 12, 24)
    assert conversion.config["depths"] == (2, 2, 2, 2)
    assert report.complete and report.matched == len(encoder.state_dict())
