"""fm3d.clip: ClipModel heads, logit-scale clamp, save_clip/load_clip round trip."""

from __future__ import annotations

import json
import math

import pytest
import torch

from fm3d.clip import ClipConfig, ClipLoadError, ClipModel, load_clip, save_clip
from fm3d.text import init_text_model

REPORTS = ["Liver normal. No focal lesion.", "Right lower lobe nodule, 6 mm.", "Kidneys unremarkable."] * 4


@pytest.fixture(scope="module")
def text_model(tmp_path_factory) -> str:
    return str(init_text_model(tmp_path_factory.mktemp("text"), REPORTS, vocab_size=120, hidden_size=16))


def test_defaults_follow_clip_and_siglip(text_model):
    clip = ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model, proj_dim=4))
    assert clip.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert clip.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    siglip = ClipConfig(image_embed_dim=8, text_model=text_model, loss="siglip")
    assert siglip.logit_scale_init == pytest.approx(math.log(10)) and siglip.logit_bias_init == -10
    with pytest.raises(ValueError, match="loss"):
        ClipConfig(image_embed_dim=8, text_model=text_model, loss="triplet")


def test_scale_is_exp_clamped_at_100(text_model):
    clip = ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model, logit_scale_init=math.log(500)))
    assert clip.scale().item() == pytest.approx(100.0)
    clip.scale().backward()
    assert clip.logit_scale.grad.item() == 0.0  # clamped: the temperature stops growing


def test_encoders_project_and_normalise(text_model):
    torch.manual_seed(0)
    clip = ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model, proj_dim=4)).eval()
    pooled = torch.randn(3, 8)
    image = clip.encode_image(pooled)
    torch.testing.assert_close(
        image, torch.nn.functional.normalize(pooled @ clip.image_projection.weight.T, dim=-1)
    )
    text = clip.encode_text(REPORTS[:3])
    assert text.shape == (3, 4)
    torch.testing.assert_close(text.norm(dim=-1), torch.ones(3))


def test_save_and_load_round_trip(text_model, tmp_path):
    torch.manual_seed(0)
    clip = ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model, proj_dim=4, max_length=32)).eval()
    with torch.no_grad():
        clip.logit_scale.fill_(3.0)
    folder = save_clip(clip, tmp_path / "clip")
    assert {p.name for p in folder.iterdir()} == {"config.json", "heads.safetensors", "text"}
    assert json.loads((folder / "config.json").read_text())["text_model"] == "text"
    again = load_clip(folder).eval()
    pooled = torch.randn(2, 8)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(pooled), clip.encode_image(pooled))
        torch.testing.assert_close(again.encode_text(REPORTS[:2]), clip.encode_text(REPORTS[:2]))
    assert again.logit_scale.item() == 3.0
    assert again.config.max_length == 32


def test_load_names_the_missing_file(text_model, tmp_path):
    folder = save_clip(ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model)), tmp_path / "clip")
    (folder / "heads.safetensors").unlink()
    with pytest.raises(ClipLoadError, match=r"heads\.safetensors is missing"):
        load_clip(folder)
