"""`fm3d pretrain plan`: FLOPs against a hand count for a ViT, parameters, memory, GPU-hours, the CLI."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from fm3d.cli import main as fm3d_main
from fm3d.data.base import LoaderSettings
from pretrain.module import PretrainModule
from pretrain.objectives.phenotype import PhenotypeObjective
from pretrain.plan import GPUS, PlanError, UnpreparedDataModule, make_plan
from pretrain.step_count import measure_cpu_step, planning_batch

# vit3d_tiny shrunk: 4^3 = 64 tokens of 96 channels, 2 blocks of 2 heads, MLP ratio 4.
SIZE, PATCH, WIDTH, DEPTH, PHENOTYPES = 32, 8, 96, 2, 5


def tiny_module() -> PretrainModule:
    return PretrainModule(
        encoder="vit3d_tiny",
        encoder_overrides={
            "image_size": [SIZE] * 3,
            "patch_size": [PATCH] * 3,
            "embed_dim": WIDTH,
            "depth": DEPTH,
            "num_heads": 2,
        },
        objectives={"phenotype": lambda dim: PhenotypeObjective(dim, num_phenotypes=PHENOTYPES)},
    )


def tiny_data(tmp_path: Path, batch_size: int = 2) -> UnpreparedDataModule:
    return UnpreparedDataModule(
        cache_dir=tmp_path / "no_cache",
        views={"image": {"size": [SIZE] * 3}},
        loader=LoaderSettings(batch_size=batch_size, num_workers=0),
    )


def vit_training_flops(tokens: int, width: int, depth: int, patch_voxels: int, outputs: int) -> int:
    """A ViT step by hand: matmuls cost 2 FLOPs per multiply-add, backward twice the forward.

    Per block: qkv (3 C^2), projection (C^2) and MLP (2 x 4 C^2) per token, plus attention scores
    and their weighted sum (2 N^2 C). The patch embedding is a matmul of each patch's voxels; its
    input needs no gradient, so its backward is the weight gradient alone (1x, not 2x). The head
    is a linear map of the pooled token.
    """
    n, c = tokens, width
    block = 2 * n * 12 * c * c + 2 * 2 * n * n * c
    patch_embed = 2 * n * patch_voxels * c
    head = 2 * c * outputs
    return 3 * (depth * block + head) + 2 * patch_embed


def test_flops_equal_the_hand_count_of_a_vit(tmp_path: Path) -> None:
    plan = make_plan(tiny_module(), tiny_data(tmp_path), {"max_steps": 10}, config="tiny", volumes=20)
    tokens = (SIZE // PATCH) ** 3
    expected = vit_training_flops(tokens, WIDTH, DEPTH, PATCH**3, PHENOTYPES)
    assert plan.tokens == {"image": (tokens, 1)}
    assert plan.flops_per_sample == pytest.approx(expected, rel=0.05)
    assert plan.flops_per_step == plan.flops_per_sample * 2  # the per-GPU batch
    assert plan.step.backward_flops == pytest.approx(2 * plan.step.forward_flops, rel=0.1)


def test_parameters_add_up_to_the_module(tmp_path: Path) -> None:
    module = tiny_module()
    total = sum(p.numel() for p in module.parameters())
    encoder = sum(p.numel() for p in module.encoder.parameters())
    plan = make_plan(module, tiny_data(tmp_path), {}, config="tiny", volumes=20)
    assert plan.encoder_params == encoder
    assert plan.encoder_params + plan.head_params + plan.frozen_params == total
    assert plan.head_params == WIDTH * PHENOTYPES + PHENOTYPES  # the phenotype head, trainable
    assert plan.state_gib * 2**30 == pytest.approx(16 * total)


def test_gpu_hours_and_epochs_follow_the_config(tmp_path: Path) -> None:
    plan = make_plan(
        tiny_module(), tiny_data(tmp_path), {"max_steps": 100}, config="tiny", volumes=50, gpu="a100-80gb",
        gpus=4, mfu=0.5,
    )  # fmt: skip
    assert plan.epochs == pytest.approx(100 * 2 * 4 / 50)  # max_steps x global batch / volumes
    expected = 100 * 2 * 4 * plan.flops_per_sample / (312e12 * 0.5) / 3600
    assert plan.gpu_hours == pytest.approx(expected)
    assert plan.gpu is GPUS["A100-80GB"]
    fixed = make_plan(
        tiny_module(), tiny_data(tmp_path), {"max_steps": 100}, config="t", volumes=50, epochs=3
    )
    assert fixed.samples == 150


def test_checkpointing_keeps_fewer_activations(tmp_path: Path) -> None:
    plan = make_plan(tiny_module(), tiny_data(tmp_path, batch_size=4), {}, config="tiny", volumes=20)
    assert plan.saved_bytes_with < plan.saved_bytes_without
    assert 0 < plan.activation_gib_with < plan.activation_gib_without
    # The attention scores alone (heads x N^2 fp32 per block) are kept without checkpointing.
    tokens = (SIZE // PATCH) ** 3
    assert plan.saved_bytes_without > DEPTH * 2 * tokens * tokens * 4


def test_the_meta_count_matches_a_real_cpu_step(tmp_path: Path) -> None:
    """The same step run for real on CPU counts the same FLOPs but attention's, and gives a GFLOP/s.

    torch's counter has no formula for the CPU flash-attention kernel a real CPU step runs, so
    the real count lacks exactly the attention FLOPs the meta step counts (its math path).
    """
    module, data = tiny_module(), tiny_data(tmp_path)
    batch = planning_batch(module, data, data.input_spec)
    seconds, cpu_flops = measure_cpu_step(module, batch)
    plan = make_plan(module, data, {}, config="tiny", volumes=20)
    tokens = (SIZE // PATCH) ** 3
    attention = 3 * DEPTH * 2 * 2 * tokens * tokens * WIDTH
    assert plan.flops_per_sample - cpu_flops == pytest.approx(attention, rel=0.05)
    print(f"tiny ViT step: {plan.flops_per_sample / 1e9:.3f} GFLOP in {seconds * 1e3:.1f} ms = "
          f"{plan.flops_per_sample / seconds / 1e9:.1f} GFLOP/s on this CPU")  # fmt: skip


def test_a_masked_view_counts_only_its_visible_tokens(tmp_path: Path) -> None:
    """MAE encodes the visible quarter: the mask's values reach the meta step."""
    from pretrain.objectives.mae import MAEObjective

    module = PretrainModule(
        encoder="vit3d_tiny",
        encoder_overrides={"image_size": [SIZE] * 3, "patch_size": [PATCH] * 3, "depth": 1},
        objectives={"mae": lambda dim: MAEObjective(dim, decoder_dim=12, decoder_depth=1, decoder_heads=2)},
    )
    data = UnpreparedDataModule(
        cache_dir=tmp_path / "none",
        views={"mae": {"size": [SIZE] * 3, "patch_size": PATCH, "mask_ratio": 0.75}},
        loader=LoaderSettings(batch_size=1, num_workers=0),
    )
    plan = make_plan(module, data, {}, config="mae", volumes=1)
    assert plan.tokens["mae_visible"] == ((SIZE // PATCH) ** 3 // 4, 1)


def test_unknown_gpu_names_the_nearest(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match=r"did you mean '?H100"):
        make_plan(tiny_module(), tiny_data(tmp_path), {}, config="tiny", volumes=1, gpu="H10")
    with pytest.raises(PlanError, match="--mfu"):
        make_plan(tiny_module(), tiny_data(tmp_path), {}, config="tiny", volumes=1, mfu=0.0)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = fm3d_main(argv)
    return code, out.getvalue(), err.getvalue()


def test_the_cli_prints_the_plan(tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(
        json.dumps(
            {
                "trainer": {"max_steps": 10, "precision": "bf16-mixed"},
                "model": {
                    "encoder": "vit3d_tiny",
                    "encoder_overrides": {"image_size": [SIZE] * 3, "patch_size": [PATCH] * 3, "depth": 1},
                    "objectives": {
                        "phenotype": {
                            "class_path": "pretrain.objectives.phenotype.PhenotypeObjective",
                            "init_args": {"num_phenotypes": 3},
                        }
                    },
                },
                "data": {"cache_dir": str(tmp_path / "cache"), "views": {"image": {"size": [SIZE] * 3}}},
            }
        )
    )
    code, out, _ = _run(["pretrain", "plan", "--config", str(config), "--volumes", "7", "--gpu", "L40S",
                         "--cpu_step", "true"])  # fmt: skip
    assert code == 0
    for expected in ("tokens / volume    image: 1 x 64", "FLOPs / sample", "activations / GPU", "GPU-hours",
                     "on L40S", "CPU check", "GFLOP/s"):  # fmt: skip
        assert expected in out
    code, _, err = _run(["pretrain", "plan", "--config", str(config), "--gpu", "H1OO"])
    assert code == 2 and err.count("\n") == 1 and "H100" in err
