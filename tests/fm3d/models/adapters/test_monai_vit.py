"""MONAI ViT / UNETR weights load as vit3d and reproduce MONAI's own forward pass."""

from __future__ import annotations

import json

import pytest
import torch
from monai.networks.blocks import TransformerBlock
from monai.networks.nets import UNETR, ViT

import fm3d
from fm3d.io import EncoderLoadError
from fm3d.models.adapters import PeerWeightsError, load_peer_encoder

ATOL = 1e-5


def _vit(proj_type: str, classification: bool, qkv_bias: bool, **sizes) -> ViT:
    torch.manual_seed(0)
    args = dict(img_size=(16, 32, 32), patch_size=(4, 8, 8), hidden_size=128, mlp_dim=192, num_layers=2)
    args.update(sizes)
    net = ViT(
        in_channels=1,
        num_heads=2,
        proj_type=proj_type,
        classification=classification,
        qkv_bias=qkv_bias,
        **args,
    )
    # MONAI initialises LayerNorms to identity and biases to zero; randomise them so a
    # swapped norm or bias shows.
    with torch.no_grad():
        for name, tensor in net.named_parameters():
            if "norm" in name or name.endswith("bias"):
                tensor.normal_(0, 0.5)
    return net.eval()


def _monai_outputs(net: ViT, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """MONAI's final-norm tokens and per-block hidden states (its classification head dropped)."""
    if hasattr(net, "classification_head"):
        del net.classification_head  # MONAI's forward then returns norm(x) with the cls token
    with torch.no_grad():
        return net(x)


@pytest.mark.parametrize(
    ("proj_type", "classification", "qkv_bias", "sizes"),
    [
        ("conv", False, False, {}),
        ("conv", True, True, {}),
        ("perceptron", True, False, {"img_size": (16, 16, 16), "patch_size": (4, 4, 4)}),
    ],
)
def test_monai_vit_file_loads_and_matches_monai_outputs(tmp_path, proj_type, classification, qkv_bias, sizes):
    net = _vit(proj_type, classification, qkv_bias, **sizes)
    path = tmp_path / "vit.pt"
    torch.save(net.state_dict(), path)

    encoder = fm3d.load_encoder(path).eval()

    img_size = sizes.get("img_size", (16, 32, 32))
    x = torch.randn(2, 1, *img_size)
    reference, hidden = _monai_outputs(net, x)
    out = encoder(x, hidden_layers=[0, 1])
    first = 1 if classification else 0
    torch.testing.assert_close(out.tokens, reference[:, first:], atol=ATOL, rtol=0)
    pooled = reference[:, 0] if classification else reference.mean(1)
    torch.testing.assert_close(out.pooled, pooled, atol=ATOL, rtol=0)
    for mine, theirs in zip(out.hidden, hidden, strict=True):
        torch.testing.assert_close(mine, theirs[:, first:], atol=ATOL, rtol=0)
    config = encoder.config
    assert (config.embed_dim, config.depth, config.num_heads, config.qkv_bias) == (128, 2, 2, qkv_bias)
    assert config.cls_token is classification
    assert config.source["format"] == "monai_vit"
    assert config.source["monai_proj_type"] == proj_type
    # Fed as MONAI fed it: (x, y, z) axes at the trained size; what the file cannot say is named.
    assert (config.axis_order, config.image_size) == ("xyz", img_size)
    assert config.source["spec_assumed"] == ["target_spacing_mm", "hu_window", "intensity_range"]
    report = encoder.peer_weights_report
    assert report.complete and report.matched == len(encoder.state_dict())


def test_unetr_checkpoint_loads_its_vit_and_sets_the_decoder_aside(tmp_path):
    torch.manual_seed(0)
    unetr = UNETR(
        1, 3, img_size=(32, 32, 32), feature_size=4, hidden_size=128, mlp_dim=256, num_heads=2
    ).eval()
    path = tmp_path / "unetr.pt"
    state = {f"module.{key}": value for key, value in unetr.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3}, path)

    encoder = fm3d.load_encoder(path).eval()

    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        reference, hidden = unetr.vit(x)
    out = encoder(x, hidden_layers=[3, 6, 9])
    torch.testing.assert_close(out.tokens, reference, atol=ATOL, rtol=0)
    for mine, index in zip(out.hidden, [3, 6, 9], strict=True):
        torch.testing.assert_close(mine, hidden[index], atol=ATOL, rtol=0)
    report = encoder.peer_weights_report
    decoder_keys = [key for key in unetr.state_dict() if not key.startswith("vit.")]
    cross_attn_placeholders = [key for key in unetr.state_dict() if "norm_cross_attn" in key]
    assert report.ignored == len(decoder_keys) + len(cross_attn_placeholders)
    assert encoder.config.source["prefix"] == "module.vit."


@pytest.mark.parametrize("layout", ["monai<1.4", "monai1.4-1.5"])
def test_older_monai_layouts_load(tmp_path, layout):
    net = _vit("conv", False, True)
    state = {k: v for k, v in net.state_dict().items() if "norm_cross_attn" not in k}
    if layout == "monai1.4-1.5":
        # 1.4 and 1.5 built an (unused) cross-attention block in every TransformerBlock.
        with_cross = TransformerBlock(128, 192, 2, qkv_bias=True, with_cross_attention=True).state_dict()
        for index in range(2):
            for key, value in with_cross.items():
                if "cross_attn" in key:
                    state[f"blocks.{index}.{key}"] = value
    path = tmp_path / "vit.pt"
    torch.save(state, path)

    encoder = fm3d.load_encoder(path).eval()

    x = torch.randn(1, 1, 16, 32, 32)
    reference, _ = _monai_outputs(net, x)
    torch.testing.assert_close(encoder(x).tokens, reference, atol=ATOL, rtol=0)


def test_hints_give_heads_grid_and_perceptron_patch_that_the_file_cannot(tmp_path):
    torch.manual_seed(0)
    net = ViT(
        1,
        (16, 32, 32),
        (4, 8, 8),
        hidden_size=64,
        mlp_dim=96,
        num_layers=1,
        num_heads=4,
        proj_type="perceptron",
    ).eval()
    path = tmp_path / "vit.pt"
    torch.save(net.state_dict(), path)
    state = torch.load(path, weights_only=True)

    with pytest.raises(PeerWeightsError, match="patch_size="):
        load_peer_encoder(path, state_dict=state)
    encoder = load_peer_encoder(
        path, state_dict=state, format="monai_vit", num_heads=4, image_size=(16, 32, 32), patch_size=(4, 8, 8)
    ).eval()

    x = torch.randn(2, 1, 16, 32, 32)
    reference, _ = _monai_outputs(net, x)
    torch.testing.assert_close(encoder(x).tokens, reference, atol=ATOL, rtol=0)
    assert encoder.config.source["num_heads"] == "given"


def test_truncated_state_dict_names_the_missing_tensors(tmp_path):
    state = _vit("conv", False, True).state_dict()
    del state["blocks.1.mlp.linear2.weight"], state["norm.weight"]
    path = tmp_path / "vit.pt"
    torch.save(state, path)

    with pytest.raises(PeerWeightsError) as caught:
        fm3d.load_encoder(path)

    message = str(caught.value)
    assert str(path) in message
    assert "blocks.1.mlp.fc2.weight" in message and "norm.weight" in message
    assert "2 missing" in message and "Nothing was loaded" in message


def test_unknown_tensor_inside_the_vit_is_refused_not_dropped(tmp_path):
    state = _vit("conv", False, True).state_dict()
    state["blocks.0.attn.rel_positional_embedding.weight"] = torch.zeros(3)
    path = tmp_path / "vit.pt"
    torch.save(state, path)

    with pytest.raises(PeerWeightsError, match=r"blocks\.0\.attn\.rel_positional_embedding\.weight"):
        fm3d.load_encoder(path)


def test_wrong_prefix_names_what_was_looked_for(tmp_path):
    original = _vit("conv", False, True).state_dict()
    state = {key.replace("patch_embedding.", "embed."): value for key, value in original.items()}
    path = tmp_path / "vit.pt"
    torch.save(state, path)

    with pytest.raises(PeerWeightsError, match=r"patch_embedding\.position_embeddings") as caught:
        fm3d.load_encoder(path)
    assert "embed.position_embeddings" in str(caught.value)  # the file's own keys are shown


def test_loaded_encoder_exports_with_its_source_and_reloads(tmp_path):
    net = _vit("conv", True, True)
    path = tmp_path / "vit.pt"
    torch.save(net.state_dict(), path)
    encoder = fm3d.load_encoder(path).eval()

    folder = fm3d.save_encoder(encoder, tmp_path / "exported")
    written = json.loads((folder / "config.json").read_text())
    again = fm3d.load_encoder(folder).eval()

    assert written["source"]["format"] == "monai_vit"
    assert written["source"]["file"] == str(path)
    assert written["source"]["keys"]["matched"] == len(encoder.state_dict())
    x = torch.randn(1, 1, 16, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x).tokens, encoder(x).tokens)


def test_nan_peer_weights_are_refused_naming_the_tensor(tmp_path):
    state = _vit("conv", False, True).state_dict()
    state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    path = tmp_path / "vit.pt"
    torch.save(state, path)
    with pytest.raises(
        EncoderLoadError, match=rf"{path}: 1 tensor\(s\) hold NaN .*blocks\.0\.attn\.qkv\.weight \(1 values\)"
    ):
        fm3d.load_encoder(path)
