"""conf/recipes/: every peer's recipe parses (`--print_config`) and plans, at its published geometry."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest
import yaml

from fm3d.cli import main as fm3d_main

RECIPES = Path(__file__).resolve().parents[2] / "conf" / "recipes"
# Published token grids: CT-CLIP's CTViT 24 x 24 x 24 (480 / 20, 240 / 10), M3D's 8 x 16 x 16.
TOKENS = {"ct_clip": ("image", 13824), "m3d_clip": ("image", 2048)}


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
    assert {"merlin", "ct_clip", "m3d_clip", "voco_v2"} <= set(recipes())


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
    code, out, err = _run(args)
    assert code == 0, err
    for expected in ("tokens / volume", "parameters", "FLOPs / sample", "activations / GPU", "GPU-hours"):
        assert expected in out
    if name in TOKENS:
        view, tokens = TOKENS[name]
        assert f"{view}: 1 x {tokens:,}" in out
