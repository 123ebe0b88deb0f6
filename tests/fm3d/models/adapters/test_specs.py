"""The peers' preprocessing table: complete, sourced, attached by `load_encoder`, and equal to the recipes'.

Each peer format's loaded encoder must carry the table's spec (so `fm3d.preprocessing(encoder)`
feeds it what its peer trained on), and each recipe that reproduces a peer's training must
prepare and sample with the same spacing, window, scaling and size: the table and conf/recipes/
are written apart, and this is where they are held together.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from monai.networks.nets import ViT

import fm3d
from fm3d.data.volume import Volume
from fm3d.models.adapters import PeerWeightsError, peer_formats
from fm3d.models.adapters.specs import PEERS, peer_preprocessing
from fm3d.models.registry import create_encoder
from fm3d.spec import InputSpec

RECIPES = Path(__file__).resolve().parents[4] / "conf" / "recipes"
SPEC_FIELDS = ("target_spacing_mm", "hu_window", "intensity_range", "image_size")


def _checkpoint(fmt: str) -> tuple[dict[str, torch.Tensor], str]:
    """A tiny checkpoint in `fmt`'s published layout, and the prefix the peer writes in front of it."""
    torch.manual_seed(0)
    if fmt == "merlin":  # Merlin's I3D keys with its 3-channel (.., 3, 7, 7) stem
        state = create_encoder("resnet3d_i3d", layers=(1, 1, 1, 1), base_width=4, in_chans=3).state_dict()
        return state, "encode_image.i3_resnet."
    if fmt == "voco":  # swin3d keeps SwinUNETR's module names (swinViT., encoder1..)
        return create_encoder("swin3d_tiny", image_size=(64, 64, 64)).state_dict(), "module.backbone."
    if fmt == "m3d_clip":  # M3D's MONAI ViT: perceptron patches 4 x 16 x 16 over 32 x 256 x 256
        net = ViT(1, (32, 256, 256), (4, 16, 16), hidden_size=64, mlp_dim=128, num_layers=1, num_heads=1,
                  proj_type="perceptron", qkv_bias=False)  # fmt: skip
        return net.state_dict(), "vision_encoder."
    if fmt == "monai_vit":
        net = ViT(1, (32, 32, 32), (16, 16, 16), hidden_size=64, mlp_dim=128, num_layers=1, num_heads=1)
        return net.state_dict(), "vit."
    raise AssertionError(f"no tiny checkpoint for {fmt}: add one beside this table's new entry")


def _recipe(name: str) -> tuple[dict, str]:
    path = RECIPES / f"{name}.yaml"
    return yaml.safe_load(path.read_text()), path.read_text()


def _prepare_option(text: str, option: str, count: int, default: tuple[float, ...]) -> tuple[float, ...]:
    """The values of `option` on the recipe header's `fm3d prepare` line (prepare's default when absent)."""
    line = next(line for line in text.splitlines() if "fm3d prepare" in line)
    found = re.search(rf"{option}((?: -?[\d.]+){{{count}}})", line)
    return tuple(float(v) for v in found.group(1).split()) if found else default


def test_every_peer_format_fm3d_loads_has_an_entry() -> None:
    described = {fmt for entry in PEERS.values() for fmt in entry.formats}
    assert set(peer_formats()) <= described
    for fmt in peer_formats():
        assert fmt in peer_preprocessing(fmt).formats


@pytest.mark.parametrize("name", sorted(PEERS))
def test_every_published_value_names_its_source(name: str) -> None:
    entry = PEERS[name]
    for field in SPEC_FIELDS:
        if field in entry.assumed or (field == "image_size" and entry.spec.image_size is None):
            continue
        assert entry.sources.get(field), f"{name}: {field} has no source"
    assert entry.sources.get("orientation") and entry.orientation and entry.citation
    assert set(entry.assumed) <= set(SPEC_FIELDS)
    if entry.recipe_view is None and entry.recipe is not None:
        assert entry.not_in_spec, f"{name}: say why the recipe's crops differ from the spec's size"


@pytest.mark.parametrize("fmt", ["merlin", "voco", "m3d_clip", "monai_vit"])
def test_load_encoder_attaches_the_peers_preprocessing(fmt: str, tmp_path: Path) -> None:
    state, prefix = _checkpoint(fmt)
    path = tmp_path / f"{fmt}.pt"
    torch.save({prefix + key: value for key, value in state.items()}, path)

    encoder = fm3d.load_encoder(path)

    entry = peer_preprocessing(fmt)
    spec = encoder.config.input_spec
    assert encoder.config.source["format"] == fmt
    assert fm3d.preprocessing(encoder).spec == spec
    for field, value in entry.config_fields().items():
        assert getattr(spec, field) == value, f"{fmt}: {field}"
    assert encoder.config.source["preprocessing"].startswith(entry.peer)
    assert encoder.config.source.get("spec_assumed", []) == list(entry.assumed)


@pytest.mark.parametrize("name", sorted(name for name, entry in PEERS.items() if entry.recipe))
def test_the_recipe_trains_on_the_peers_preprocessing(name: str) -> None:
    """Spacing and window of the recipe's `fm3d prepare` line, its data window, scaling and view size."""
    entry = PEERS[name]
    config, text = _recipe(entry.recipe)
    data, spec = config["data"], entry.spec
    defaults = InputSpec()
    assert _prepare_option(text, "--spacing", 3, defaults.target_spacing_mm) == spec.target_spacing_mm
    assert _prepare_option(text, "--hu-window", 2, defaults.hu_window) == spec.hu_window
    assert tuple(data["hu_window"]) == spec.hu_window
    assert tuple(data["intensity_range"]) == spec.intensity_range
    if entry.recipe_view is not None:
        assert tuple(data["views"][entry.recipe_view]["size"]) == entry.image_size_zyx


def test_ct_clip_uses_its_training_window_not_the_inference_one() -> None:
    """CT-CLIP trained on -1000..1000 HU; its first inference loader clipped -1000..200 (issue 22)."""
    spec = PEERS["ct_clip"].spec
    config, text = _recipe("ct_clip")
    assert spec.hu_window == (-1000.0, 1000.0) != (-1000.0, 200.0)
    assert tuple(config["data"]["hu_window"]) == spec.hu_window
    assert _prepare_option(text, "--hu-window", 2, ()) == spec.hu_window
    # Soft tissue at 500 HU reads 0.5 under the training window; the inference clip would
    # saturate it at 200 HU, the top of the range (1.0). 1500 HU saturates at 1000 HU.
    preprocess = fm3d.preprocessing(spec.replace(image_size=None))
    affine = np.diag([0.75, 0.75, 1.5, 1.0])  # a RAS volume already at CT-CLIP's spacing
    for hu, expected in ((500, 0.5), (1500, 1.0), (-1200, -1.0)):
        volume = Volume(np.full((4, 4, 4), hu, dtype=np.int16), affine, (0.75, 0.75, 1.5))
        torch.testing.assert_close(preprocess(volume), torch.full((1, 1, 4, 4, 4), expected))


def test_an_unknown_peer_names_the_nearest_one() -> None:
    with pytest.raises(PeerWeightsError, match=r"'merln' \(did you mean merlin\?\)"):
        peer_preprocessing("merln")
