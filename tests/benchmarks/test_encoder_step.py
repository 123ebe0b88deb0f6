"""encoder_step's model FLOP count and its candidates, checked in-process at tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fm3d

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def encoder_step(monkeypatch):
    # The scripts import their helpers as a script does (their folder on sys.path).
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import encoder_step

    return encoder_step


def test_vit_base_at_1960_tokens_is_the_issue_count(encoder_step):
    flops = encoder_step.training_flops(
        embed_dim=768, depth=12, mlp_ratio=4.0, tokens=1961, patches=1960, patch_voxels=16**3, in_chans=1
    )
    blocks = 3 * 12 * (24 * 1961 * 768**2 + 4 * 1961**2 * 768)  # by hand
    assert flops == pytest.approx(blocks + 4 * 1960 * 4096 * 768)
    assert blocks / 1e12 == pytest.approx(1.42, abs=0.01)


def test_flop_formula_equals_torch_flop_counter_on_a_real_step(encoder_step):
    # torch's FlopCounterMode counts every matmul of a real forward + backward; with the math
    # attention path, the scores are plain matmuls too, so both counts must agree exactly.
    torch.manual_seed(0)
    enc = fm3d.create_encoder(
        "vit3d_tiny", depth=2, embed_dim=48, num_heads=2, mlp_ratio=2.0, image_size=(8, 16, 16),
        patch_size=(2, 4, 4), attention_backend="math",
    )  # fmt: skip
    x = torch.randn(1, 1, 8, 16, 16)
    with FlopCounterMode(display=False) as counter:
        enc(x).tokens.mean().backward()
    patches = 4 * 4 * 4
    expected = encoder_step.training_flops(
        embed_dim=48, depth=2, mlp_ratio=2.0, tokens=patches + 1, patches=patches, patch_voxels=32, in_chans=1
    )
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("impl", ["fm3d", "monai", "monai_flash"])
def test_each_candidate_runs_a_step_in_process(encoder_step, impl):
    case = {"impl": impl, "ckpt": impl == "fm3d", "image_size": (16, 32, 32), "depth": 1, "embed_dim": 48,
            "heads": 2, "threads": 1, "warmup": 1, "steps": 2,
            "limit_n": 64, "limit_seconds": 0.01}  # fmt: skip
    report = encoder_step.run_case(case)
    assert len(report["warmup_seconds"]) == 1 and len(report["seconds"]) == 2
    assert report["baseline_rss_mib"] > 0
    assert len(report["limit_gflops"]) == 2 and min(report["limit_gflops"]) > 0


def test_monai_flash_candidate_really_uses_sdpa(encoder_step):
    model, _ = encoder_step._build("monai_flash", False, (16, 32, 32), 1, 48, 2)
    assert all(block.attn.use_flash_attention for block in model.blocks)
    model, _ = encoder_step._build("monai", False, (16, 32, 32), 1, 48, 2)
    assert not any(block.attn.use_flash_attention for block in model.blocks)
