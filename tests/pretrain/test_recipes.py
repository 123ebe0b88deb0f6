"""conf/recipes/: every peer's recipe parses (`--print_config`) and plans, at its published geometry."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from fm3d.cli import main as fm3d_main

RECIPES = Path(__file__).resolve().parents[2] / "conf" / "recipes"
# Published token grids: CT-CLIP's CTViT 24 x 24 x 24 (480 / 20, 240 / 10), M3D's 8 x 16 x 16;
# Pillar-0's 384^3 in 16^3 patches (24^3); SPECTRE's whole scan 256 x 384 x 384 in 8 x 16 x 16
# patches (32 x 24 x 24), its global crops 64 x 128 x 128 (8^3) and local crops 24 x 48 x 48 (3^3).
TOKENS = {
    "ct_clip": [("image", 1, 13824)],
    "m3d_clip": [("image", 1, 2048)],
    "pillar0": [("image", 1, 13824)],
    "spectre": [("image", 1, 18432), ("student_global", 2, 512), ("student_local", 8, 27)],
}


def recipes() -> list[str]:
    return sorted(path.stem for path in RECIPES.glob("*.yaml"))


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = fm3d_main(argv)
        except SystemExit as exit_:  # --print_config ends the parser with exit(0)
            code = exit_.code or 0
    return code, out.getvalue(), err.getvalue()


def test_the_issue_names_these_recipes() -> None:
    assert {"merlin", "ct_clip", "m3d_clip", "voco_v2", "pillar0", "spectre"} <= set(recipes())


def _clip_args(name: str) -> dict:
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["model"]["objectives"]["clip"]["init_args"]


def test_pillar0_aligns_to_a_frozen_tower_through_cached_embeddings() -> None:
    """Pillar-0-style: the text model never loads in training; the data module serves its cached vectors."""
    config = yaml.safe_load((RECIPES / "pillar0.yaml").read_text())
    assert _clip_args("pillar0")["text_mode"] == "frozen"
    assert config["data"]["text_embeddings"]
    assert list(config["model"]["objectives"]) == ["clip"]


def test_spectre_distils_and_aligns_with_siglip_through_lora() -> None:
    """SPECTRE-style: DINO/iBOT on multi-crops and SigLIP with LoRA adapters on the text tower."""
    config = yaml.safe_load((RECIPES / "spectre.yaml").read_text())
    assert set(config["model"]["objectives"]) == {"dino", "clip"}
    clip = _clip_args("spectre")
    assert (clip["text_mode"], clip["loss"], clip["lora_rank"]) == ("lora", "siglip", 16)
    encoder = config["model"]["encoder_overrides"]
    assert config["data"]["views"]["multicrop"]["patch_size"] == encoder["patch_size"]


@pytest.mark.parametrize("name", recipes())
def test_recipe_prints_its_config(name: str) -> None:
    code, out, err = _run(["pretrain", "fit", "--config", str(RECIPES / f"{name}.yaml"), "--print_config"])
    assert code == 0, err
    printed = yaml.safe_load(out)
    written = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    assert printed["model"]["encoder"] == written["model"]["encoder"]
    assert printed["data"]["hu_window"] == written["data"]["hu_window"]


@pytest.mark.parametrize("name", recipes())
def test_every_number_has_a_source(name: str) -> None:
    """Each recipe names its paper or repository, and says where a number is not published."""
    text = (RECIPES / f"{name}.yaml").read_text()
    assert "Sources:" in text and ("github.com/" in text or "arXiv" in text)
    previous = ""
    for line in text.splitlines():
        body = line.split("#")[0]
        # A tuned number carries its source in a comment on its line or on the line above.
        if any(key in body for key in ("lr:", "weight_decay:", "max_steps:", "max_epochs:", "warmup_steps:")):
            assert "#" in line or previous.strip().startswith("#"), f"{name}: {line.strip()} has no source"
        previous = line


@pytest.mark.parametrize("name", recipes())
def test_recipe_prints_its_plan(name: str, tiny_text_model: Path, tmp_path: Path) -> None:
    """The plan of the real recipe; a CLIP text tower is the tiny offline one (nothing downloads)."""
    config = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    args = ["pretrain", "plan", "--config", str(RECIPES / f"{name}.yaml"), "--volumes", "100",
            "--data.cache_dir", str(tmp_path / "cache")]  # fmt: skip
    if "clip" in config["model"]["objectives"]:
        args += ["--model.objectives.clip.init_args.text_model", str(tiny_text_model)]
        if _clip_args(name).get("text_mode") == "lora":  # the tiny BERT has no q_proj/...: every projection
            args += ["--model.objectives.clip.init_args.lora_targets", "null"]
    code, out, err = _run(args)
    assert code == 0, err
    for expected in ("tokens / volume", "parameters", "FLOPs / sample", "activations / GPU", "GPU-hours"):
        assert expected in out
    for view, inputs, tokens in TOKENS.get(name, []):
        assert f"{view}: {inputs} x {tokens:,}" in out
