"""Recognising peer layouts, and the errors for files that are none of them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import fm3d
from fm3d.io import EncoderLoadError
from fm3d.models.adapters import PEER_FORMATS, PeerWeightsError, detect_format, load_peer_encoder


def _t(*shape: int) -> torch.Tensor:
    return torch.zeros(shape)


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        ({"vit.patch_embedding.position_embeddings": _t(1, 8, 16)}, "monai_vit"),
        ({"vision_encoder.patch_embedding.position_embeddings": _t(1, 8, 16)}, "m3d_clip"),
        ({"module.swinViT.patch_embed.proj.weight": _t(12, 1, 2, 2, 2)}, "voco"),
        ({"swin_vit.patch_embed.proj.weight": _t(12, 1, 2, 2, 2)}, "voco"),
        (
            {
                "encode_image.i3_resnet.conv1.weight": _t(8, 3, 3, 7, 7),
                "encode_image.i3_resnet.layer1.0.conv1.weight": _t(8, 8, 1, 1, 1),
            },
            "merlin",
        ),
        ({"encode_image.vision_model.features.0.weight": _t(8, 3, 3, 7, 7)}, "merlin"),
    ],
)
def test_layouts_are_recognised_from_their_keys(state, expected):
    assert detect_format(state) == expected


def test_another_3d_resnet_is_not_taken_for_merlin():
    # MedicalNet-style 3D ResNet: same block names, but a 7x7x7 single-channel stem.
    state = {"conv1.weight": _t(8, 1, 7, 7, 7), "layer1.0.conv1.weight": _t(8, 8, 1, 1, 1)}
    with pytest.raises(PeerWeightsError, match="no peer layout recognised"):
        detect_format(state, "medicalnet.pth")


def test_unknown_format_and_misplaced_hints_are_refused(tmp_path):
    state = {"swinViT.patch_embed.proj.weight": _t(12, 1, 2, 2, 2)}
    with pytest.raises(PeerWeightsError, match="unknown format 'timm'"):
        load_peer_encoder(tmp_path / "x.pt", state_dict=state, format="timm")
    with pytest.raises(PeerWeightsError, match="only apply to format='monai_vit'"):
        load_peer_encoder(tmp_path / "x.pt", state_dict=state, num_heads=4)
    assert set(PEER_FORMATS) == {"monai_vit", "m3d_clip", "voco", "merlin"}


def test_files_without_a_state_dict_say_what_they_hold(tmp_path):
    tensor_file = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor_file)
    with pytest.raises(PeerWeightsError, match="holds a Tensor, not a state dict"):
        fm3d.load_encoder(tensor_file)

    metadata_only = tmp_path / "meta.pt"
    torch.save({"epoch": 3, "best_dice": 0.8}, metadata_only)
    with pytest.raises(PeerWeightsError, match=r"keys \[epoch, best_dice\]") as caught:
        fm3d.load_encoder(metadata_only)
    assert str(metadata_only) in str(caught.value)


def test_folder_without_weights_is_explained(tmp_path):
    with pytest.raises(PeerWeightsError, match=r"without \*\.safetensors"):
        fm3d.load_encoder(tmp_path)


def test_truncated_safetensors_file_is_named(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"vit.patch_embedding.position_embeddings": torch.randn(1, 8, 64)}, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(EncoderLoadError, match=r"model\.safetensors could not be read"):
        fm3d.load_encoder(path)
    with pytest.raises(EncoderLoadError, match=r"model\.safetensors could not be read"):
        fm3d.load_encoder(tmp_path)  # the folder's weights are read the same way
