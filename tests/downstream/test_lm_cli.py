"""`fm3d causal-lm`: a tiny offline causal LM learned from the demo cohort's reports, loaded back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from downstream.language.causal_lm import load_causal_lm
from downstream.lm_cli import main
from fm3d.demo import generate_demo_cohort

FM3D = Path(sys.executable).with_name("fm3d")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    """The demo cohort's manifest (8 studies): findings and impression text per study."""
    return generate_demo_cohort(tmp_path_factory.mktemp("demo"), num_studies=8, seed=0, progress=False)


def test_command_builds_a_gpt2_that_generates(manifest, tmp_path):
    out = tmp_path / "causal_lm"
    args = ["causal-lm", "--out", str(out), "--texts", str(manifest), "--columns", "findings", "impression"]
    args += ["--vocab-size", "400", "--hidden-size", "32", "--max-length", "96"]
    result = subprocess.run([str(FM3D), *args], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert "from 8 texts" in result.stdout and "report_generation.yaml" in result.stdout
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert model.config.model_type == "gpt2" and model.config.n_embd == 32 and model.config.n_positions == 96
    assert len(tokenizer) <= 400 and tokenizer.eos_token == "</s>"
    text = "The liver is unremarkable."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    with torch.no_grad():
        generated = model.generate(
            **tokenizer(["No pleural"], return_tensors="pt"), max_new_tokens=4, do_sample=False
        )
    assert generated.shape[1] > 2


def test_llama_family_loads_through_load_causal_lm(manifest, tmp_path, capsys):
    out = tmp_path / "llama"
    args = ["--out", str(out), "--texts", str(manifest), "--columns", "impression", "--family", "llama"]
    assert main([*args, "--hidden-size", "32", "--heads", "4", "--layers", "1"]) == 0
    assert "llama" in capsys.readouterr().out
    model, tokenizer = load_causal_lm(out)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 1
    # The default leaves room for image tokens + prompt + a 256-token report in report generation.
    assert model.config.max_position_embeddings == 512
    assert tokenizer.pad_token is not None


def test_missing_column_and_unknown_family_are_refused(manifest, tmp_path, capsys):
    assert main(["--out", str(tmp_path / "m"), "--texts", str(manifest), "--columns", "impresion"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert (
        line.startswith("fm3d causal-lm:")
        and "has no column 'impresion' (did you mean 'impression'?)" in line
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "m"), "--texts", str(manifest), "--columns", "x", "--family", "bert"])
    assert exit_info.value.code == 2
