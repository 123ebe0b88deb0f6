"""fm3d.clip: ClipModel heads, logit-scale clamp, save_clip/load_clip round trip."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from fm3d.clip import ClipConfig, ClipLoadError, ClipModel, load_clip, save_clip
from fm3d.text import TextTowerError, init_text_model

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


EVIL_CODE = """
from pathlib import Path
Path({marker!r}).write_text("code from the downloaded folder ran")
from transformers import BertConfig, BertModel


class EvilConfig(BertConfig):
    model_type = "evil"


class EvilModel(BertModel):
    config_class = EvilConfig
"""


def _plant_code(text_folder, marker) -> None:
    """Make a text model folder ship its own Python (auto_map), as a hostile download would."""
    (text_folder / "modeling_evil.py").write_text(EVIL_CODE.format(marker=str(marker)))
    config = json.loads((text_folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (text_folder / "config.json").write_text(json.dumps(config))


def _set_config(folder, **values) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | values))


def test_a_folder_cannot_turn_on_remote_code(text_model, tmp_path):
    folder = save_clip(ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model)), tmp_path / "clip")
    marker = tmp_path / "marker.txt"
    _plant_code(folder / "text", marker)
    _set_config(folder, trust_remote_code=True)
    with pytest.raises(
        ClipLoadError, match=r"config\.json asks for trust_remote_code.*trust_remote_code=True"
    ):
        load_clip(folder)
    # With the flag gone from config.json, the text folder's own auto_map is still refused.
    _set_config(folder, trust_remote_code=False)
    with pytest.raises(
        TextTowerError, match=r"text/config\.json names its own Python code.*trust_remote_code"
    ):
        load_clip(folder)
    assert not marker.exists()


def test_the_planted_code_runs_only_when_the_caller_allows_it(text_model, tmp_path):
    """The control for the test above: the same folder does run its code once the caller opts in."""
    folder = save_clip(ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model)), tmp_path / "clip")
    marker = tmp_path / "marker.txt"
    _plant_code(folder / "text", marker)
    script = (
        "from fm3d.clip import load_clip\n"
        f"try:\n    load_clip({str(folder)!r}, trust_remote_code=True)\nexcept Exception:\n    pass\n"
    )
    env = os.environ | {"HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", script], env=env, check=True, capture_output=True, timeout=300)
    assert marker.exists()


def test_text_model_outside_the_folder_is_refused(text_model, tmp_path):
    folder = save_clip(ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model)), tmp_path / "clip")
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(folder / "text", elsewhere)
    for pointer in (str(elsewhere), "../elsewhere"):
        _set_config(folder, text_model=pointer)
        with pytest.raises(
            ClipLoadError, match=r"`text_model` .* points outside the CLIP folder.*text_model=PATH"
        ):
            load_clip(folder)
    (folder / "text").rename(folder / "text_moved")
    (folder / "text").symlink_to(elsewhere, target_is_directory=True)
    _set_config(folder, text_model="text")
    with pytest.raises(ClipLoadError, match="points outside the CLIP folder"):
        load_clip(folder)
    # The caller may name another text model explicitly.
    assert load_clip(folder, text_model=elsewhere).config.text_model == str(elsewhere)


def test_heads_of_the_wrong_shape_are_named(text_model, tmp_path):
    folder = save_clip(ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model)), tmp_path / "clip")
    _set_config(folder, image_embed_dim=16)
    with pytest.raises(
        ClipLoadError, match=r"heads\.safetensors does not match.*image_projection\.weight: file"
    ):
        load_clip(folder)


def test_save_clip_leaves_no_temporaries(text_model, tmp_path):
    clip = ClipModel(ClipConfig(image_embed_dim=8, text_model=text_model))
    folder = save_clip(clip, tmp_path / "clip")
    save_clip(clip, folder)  # over an existing export
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "heads.safetensors", "text"]
    assert isinstance(load_clip(folder), ClipModel)
