"""Recognising peer layouts through the format registry, and the errors for files that are none of them."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import fm3d
from fm3d.models.adapters import (
    PeerWeightsError,
    convert_peer_weights,
    detect_format,
    load_peer_encoder,
    peer_formats,
    register_peer_format,
    voco_swin,
)
from fm3d.models.adapters import formats as formats_module
from fm3d.models.weights import EncoderLoadError


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
    with pytest.raises(PeerWeightsError, match="no peer layout recognised") as caught:
        detect_format(state, "medicalnet.pth")
    # The message says what every registered detector looked for, and names the file.
    assert "medicalnet.pth" in str(caught.value)
    for name in ("merlin", "voco", "m3d_clip", "monai_vit"):
        assert f"{name}: " in str(caught.value)


def test_unknown_format_and_misplaced_hints_are_refused(tmp_path):
    state = {"swinViT.patch_embed.proj.weight": _t(12, 1, 2, 2, 2)}
    with pytest.raises(PeerWeightsError, match="unknown format 'timm'"):
        load_peer_encoder(tmp_path / "x.pt", state_dict=state, format="timm")
    with pytest.raises(PeerWeightsError, match=r"do not apply to format 'voco'.*format='monai_vit'"):
        load_peer_encoder(tmp_path / "x.pt", state_dict=state, num_heads=4)
    assert set(peer_formats()) == {"monai_vit", "m3d_clip", "voco", "merlin"}


def test_peer_modules_are_discovered_and_ranked_by_priority():
    formats = peer_formats()
    assert {name: fmt.convert.__module__ for name, fmt in formats.items()} == {
        "monai_vit": "fm3d.models.adapters.monai_vit",
        "m3d_clip": "fm3d.models.adapters.m3d_clip",
        "voco": "fm3d.models.adapters.voco_swin",
        "merlin": "fm3d.models.adapters.merlin",
    }
    # An M3D tower is also a MONAI ViT: both detectors match, and the more specific one ranks higher.
    state = {"vision_encoder.patch_embedding.position_embeddings": _t(1, 8, 16)}
    assert formats["monai_vit"].detect(state) is not None and formats["m3d_clip"].detect(state) is not None
    assert formats["m3d_clip"].priority > formats["monai_vit"].priority


@pytest.fixture
def registry(monkeypatch):
    """The format registry as it is now, restored after the test (a test's formats do not leak)."""
    monkeypatch.setattr(formats_module, "_FORMATS", dict(peer_formats()))
    return formats_module


def _voco_keys(state):
    return "VoCo keys" if voco_swin.detect(state) else None


def test_a_registered_format_with_a_higher_priority_wins_over_a_built_in(registry, tmp_path):
    calls = []

    @register_peer_format("voco_variant", detect=_voco_keys, priority=100, looks_for="VoCo keys")
    def convert(state, path):
        calls.append(path)
        return voco_swin.convert(state, path)

    state = {"module.swinViT.patch_embed.proj.weight": _t(12, 1, 2, 2, 2)}
    assert voco_swin.detect(state) is not None  # the built-in matches too
    assert detect_format(state) == "voco_variant"
    with pytest.raises(PeerWeightsError, match="expected Swin stages"):  # its converter is the one called
        convert_peer_weights(state, tmp_path / "x.pt")
    assert calls == [tmp_path / "x.pt"]


def test_a_tie_at_the_top_names_every_matching_format_and_what_it_saw(registry):
    register_peer_format("voco_twin", detect=_voco_keys, priority=30, looks_for="VoCo keys")(
        voco_swin.convert
    )
    state = {"swinViT.patch_embed.proj.weight": _t(12, 1, 2, 2, 2)}
    with pytest.raises(PeerWeightsError, match="several peer layouts match equally well") as caught:
        detect_format(state, "twin.pt")
    message = str(caught.value)
    assert "twin.pt" in message and "voco (priority 30) saw key 'swinViT.patch_embed.proj.weight'" in message
    assert "voco_twin (priority 30) saw VoCo keys" in message and "format=" in message


def test_a_name_registered_twice_is_refused(registry):
    with pytest.raises(PeerWeightsError, match="'voco' is registered twice"):
        register_peer_format("voco", detect=_voco_keys, priority=1, looks_for="VoCo keys")(lambda s, p: None)


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
