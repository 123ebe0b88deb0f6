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
from fm3d.text import TextTower, TextTowerError, init_text_model, text_settings

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


# --- text tower modes (issue 20) ---


def test_frozen_mode_loads_no_text_model_and_saves_the_towers_files(text_model, tmp_path):
    """A frozen tower is not in the module (nothing to train or checkpoint); the export still embeds texts."""
    torch.manual_seed(0)
    config = ClipConfig(
        image_embed_dim=8, text_model=text_model, proj_dim=4, pooling="mean", text_mode="frozen"
    )
    clip = ClipModel(config).eval()
    assert clip.text is None and not any(name.startswith("text.") for name in clip.state_dict())
    assert clip.text_settings == text_settings(text_model, pooling="mean")
    tower = TextTower(text_model, pooling="mean").eval()
    cached = tower.embed(REPORTS[:3])  # what the text-embedding cache holds
    with pytest.raises(ClipLoadError, match="frozen"):
        clip.encode_text(REPORTS[:3])
    loaded = load_clip(save_clip(clip, tmp_path / "clip")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_text(REPORTS[:3]), clip.project_text(cached), atol=1e-5, rtol=0
        )
    assert loaded.text_settings.model_hash == clip.text_settings.model_hash  # the same files


def test_lora_mode_trains_adapters_and_exports_them_merged(text_model, tmp_path):
    torch.manual_seed(0)
    config = ClipConfig(image_embed_dim=8, text_model=text_model, proj_dim=4, text_mode="lora", lora_rank=2)
    clip = ClipModel(config)
    text_trainable = [name for name, p in clip.text.named_parameters() if p.requires_grad]
    assert text_trainable and all("lora_" in name for name in text_trainable)
    with torch.no_grad():
        for name, param in clip.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    clip.eval()
    loaded = load_clip(save_clip(clip, tmp_path / "clip")).eval()
    assert not any("lora_" in name for name in loaded.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_text(REPORTS[:3]), clip.encode_text(REPORTS[:3]), atol=1e-5, rtol=0
        )


def test_auto_settings_are_saved_resolved(tmp_path):
    """The model's own pooling and normalisation survive save_pretrained, which drops their files."""
    clip = ClipModel(
        ClipConfig(image_embed_dim=8, text_model="sentence-transformers/all-MiniLM-L6-v2", proj_dim=4)
    )
    saved = json.loads((save_clip(clip, tmp_path / "clip") / "config.json").read_text())
    assert (saved["pooling"], saved["normalize"], saved["prefix"]) == ("mean", True, "")
    loaded = load_clip(tmp_path / "clip").eval()
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.encode_text(REPORTS[:2]), clip.eval().encode_text(REPORTS[:2]), atol=1e-5, rtol=0
        )


def test_unknown_text_mode_is_refused(text_model):
    with pytest.raises(ValueError, match="text_mode"):
        ClipConfig(image_embed_dim=8, text_model=text_model, text_mode="partial")
