"""M3D-CLIP's vision tower loads as vit3d with M3D's geometry and reproduces its forward pass.

M3D builds the tower with MONAI 1.3's ViT (`LaMed/src/model/multimodal_encoder/vit.py`):
perceptron patch embedding, cls token, no qkv bias, classification head commented out. MONAI
1.6's ViT with the same arguments has the same parameters plus the unused `norm_cross_attn`
placeholders and the head, which are dropped here to give M3D's exact layout.
"""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.nets import ViT
from safetensors.torch import save_file

import fm3d
from fm3d.models.adapters import check_conversion, convert_peer_weights, detect_format
from fm3d.models.registry import create_encoder

ATOL = 1e-5
IMG_SIZE, PATCH_SIZE = (32, 256, 256), (4, 16, 16)


def _m3d_tower(hidden_size: int = 128, num_layers: int = 2, mlp_dim: int = 256) -> ViT:
    torch.manual_seed(0)
    net = ViT(
        in_channels=1,
        img_size=IMG_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=num_layers,
        num_heads=hidden_size // 64,
        proj_type="perceptron",
        classification=True,
    )
    del net.classification_head  # M3D comments the head out
    return net.eval()


def _m3d_layout(net: ViT, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in net.state_dict().items() if "norm_cross_attn" not in k}


def _clip_extras(hidden_size: int) -> dict[str, torch.Tensor]:
    """The rest of an M3D-CLIP checkpoint: text tower (one tensor stands for it), projections, scale."""
    return {
        "language_encoder.embeddings.word_embeddings.weight": torch.randn(30, hidden_size),
        "mm_vision_proj.weight": torch.randn(hidden_size, hidden_size),
        "mm_vision_proj.bias": torch.randn(hidden_size),
        "mm_language_proj.weight": torch.randn(hidden_size, hidden_size),
        "mm_language_proj.bias": torch.randn(hidden_size),
        "logit_scale": torch.tensor(2.6593),
    }


def _check_matches(encoder, net: ViT) -> None:
    x = torch.rand(1, 1, *IMG_SIZE)  # M3D's inputs are min-max scaled to [0, 1]
    with torch.no_grad():
        reference, hidden = net(x)
        out = encoder(x, hidden_layers=[-1])
    torch.testing.assert_close(out.tokens, reference[:, 1:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.pooled, reference[:, 0], atol=ATOL, rtol=0)  # M3D's image_feats[:, 0]
    torch.testing.assert_close(out.hidden[0], hidden[-1][:, 1:], atol=ATOL, rtol=0)
    assert out.grid == (8, 16, 16)


def test_m3d_clip_folder_loads_the_vision_encoder(tmp_path):
    net = _m3d_tower()
    folder = tmp_path / "M3D-CLIP"
    folder.mkdir()
    save_file({**_m3d_layout(net, "vision_encoder."), **_clip_extras(128)}, folder / "model.safetensors")

    encoder = fm3d.load_encoder(folder).eval()

    _check_matches(encoder, net)
    config = encoder.config
    assert (config.image_size, config.patch_size) == (IMG_SIZE, PATCH_SIZE)
    assert (config.qkv_bias, config.cls_token) == (False, True)
    assert config.source["format"] == "m3d_clip"
    assert (config.axis_order, config.intensity_range) == ("zyx", (0.0, 1.0))
    assert config.source["spec_assumed"] == ["target_spacing_mm", "hu_window"]  # M3D resized display images
    assert encoder.peer_weights_report.ignored == len(_clip_extras(128))


def test_hugging_face_folder_with_its_own_config_json_is_not_taken_for_an_fm3d_export(tmp_path):
    net = _m3d_tower()
    folder = tmp_path / "M3D-CLIP"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "m3d_clip", "img_size": list(IMG_SIZE)}))
    save_file(_m3d_layout(net, "vision_encoder."), folder / "model.safetensors")

    encoder = fm3d.load_encoder(folder).eval()

    _check_matches(encoder, net)


@pytest.mark.parametrize("prefix", ["", "model.vision_tower.vision_tower."])
def test_pretrained_vit_bin_and_lamed_layouts_load(tmp_path, prefix):
    net = _m3d_tower()
    path = tmp_path / "pretrained_ViT.bin"
    torch.save(_m3d_layout(net, prefix), path)

    encoder = fm3d.load_encoder(path, format="m3d_clip").eval()

    _check_matches(encoder, net)


def test_full_size_m3d_tower_is_detected_and_covers_vit3d_base():
    # The published tower (768 channels, 12 blocks, 12 heads), built on the meta device: shapes only.
    with torch.device("meta"):
        net = _m3d_tower(hidden_size=768, num_layers=12, mlp_dim=3072)
    state = _m3d_layout(net, "")  # pretrained_ViT.bin: bare keys

    assert detect_format(state) == "m3d_clip"
    conversion = convert_peer_weights(state, "pretrained_ViT.bin")
    with torch.device("meta"):
        encoder = create_encoder(conversion.encoder_name, **conversion.config)
    report = check_conversion(encoder, conversion, "pretrained_ViT.bin")

    assert conversion.encoder_name == "vit3d_base"
    assert (encoder.config.embed_dim, encoder.config.depth, encoder.config.num_heads) == (768, 12, 12)
    assert report.complete and report.matched == len(state) == len(encoder.state_dict())
