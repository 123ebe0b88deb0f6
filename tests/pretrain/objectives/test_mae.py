"""pretrain.objectives.mae against MAE's own computation, restated from facebookresearch/mae.

`mae_random_masking`, `mae_patchify`, `mae_forward_decoder` and `mae_forward_loss` restate
`MaskedAutoencoderViT.random_masking`, `.patchify`, `.forward_decoder` and `.forward_loss` of
models_mae.py step for step (2D, [N, L, D] sequences, float 0/1 masks, gather-based
unshuffling), so the 3D objective is checked against the original formulation.
"""

from __future__ import annotations

import pytest
import torch

import fm3d
from fm3d.models.encoder import EncoderOutput
from fm3d.models.patches import patchify3d, unpatchify3d
from fm3d.models.pos_embed import resize_pos_embed, sincos_pos_embed_3d
from pretrain.objectives.base import ObjectiveError
from pretrain.objectives.mae import MAEObjective, reconstruction_loss, visible_first

# 16^3 configured crops with 8^3 patches (conftest.TINY_ENCODER): 8 tokens, milliseconds per step.
TINY = {"image_size": (16, 16, 16), "patch_size": (8, 8, 8)}


def mae_random_masking(x: torch.Tensor, mask_ratio: float, generator: torch.Generator):
    """models_mae.py `random_masking`, with the noise drawn from a seeded generator."""
    n, length, d = x.shape
    len_keep = int(length * (1 - mask_ratio))
    noise = torch.rand(n, length, generator=generator)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, d))
    mask = torch.ones([n, length])
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)
    return x_masked, mask, ids_restore, ids_keep


def mae_patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """models_mae.py `patchify` ('nchpwq->nhwpqc'), for the channel count of `imgs`."""
    n, c, h, w = imgs.shape
    assert h == w and h % p == 0
    h = w = h // p
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p**2 * c)


def mae_forward_loss(target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool):
    """models_mae.py `forward_loss` after its `patchify` call (`target` = the patchified images)."""
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


def mae_forward_decoder(
    objective: MAEObjective, x: torch.Tensor, ids_restore: torch.Tensor, pos: torch.Tensor
):
    """models_mae.py `forward_decoder` on the objective's layers; `pos` [1, 1 + N, Cd] has a zero cls row."""
    x = objective.decoder_embed(x)
    mask_token = objective.mask_token.reshape(1, 1, -1)
    mask_tokens = mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
    x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
    x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
    x = torch.cat([x[:, :1, :], x_], dim=1)
    x = x + pos
    for blk in objective.decoder_blocks:
        x = blk(x)
    x = objective.decoder_norm(x)
    x = objective.decoder_pred(x)
    return x[:, 1:, :]


def _setup(decoder_depth: int = 1, **overrides):
    torch.manual_seed(0)
    encoder = fm3d.create_encoder("vit3d_tiny", depth=2, **{**TINY, **overrides})
    objective = MAEObjective(encoder.embed_dim, decoder_dim=48, decoder_depth=decoder_depth, decoder_heads=2)
    objective.bind(encoder)
    return encoder, objective


def _mask(rows: list[list[int]], num_tokens: int) -> torch.Tensor:
    mask = torch.zeros(len(rows), num_tokens, dtype=torch.bool)
    for row, masked in enumerate(rows):
        mask[row, masked] = True
    return mask


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_one_slice_3d_loss_equals_mae_2d_loss(norm_pix_loss):
    # A [1, 1, H, W] volume with (1, p, p) patches is MAE's 2D image with p x p patches.
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(3, 1, 32, 32, generator=g)
    tokens = (32 // 8) ** 2
    _, mask, _, _ = mae_random_masking(torch.zeros(3, tokens, 1), 0.75, g)
    pred = torch.randn(3, tokens, 64, generator=g)
    theirs = mae_forward_loss(mae_patchify(imgs, 8), pred, mask, norm_pix_loss)
    ours = reconstruction_loss(pred, imgs.unsqueeze(2), mask.bool(), (1, 8, 8), norm_pix_loss)
    torch.testing.assert_close(ours, theirs)


def test_multi_slice_loss_equals_mae_formula_on_3d_patches():
    g = torch.Generator().manual_seed(1)
    volume = torch.randn(2, 1, 8, 16, 16, generator=g)
    patches = patchify3d(volume, (4, 8, 8))  # [2, 8, 256]
    _, mask, _, _ = mae_random_masking(torch.zeros(2, 8, 1), 0.5, g)
    pred = torch.randn(2, 8, 256, generator=g)
    torch.testing.assert_close(
        reconstruction_loss(pred, volume, mask.bool(), (4, 8, 8)), mae_forward_loss(patches, pred, mask, True)
    )


def test_norm_pix_target_uses_the_unbiased_variance():
    # One masked 2-voxel patch [0, 2]: mean 1, unbiased var 2; target (t - 1) / sqrt(2 + 1e-6).
    image = torch.tensor([0.0, 2.0]).reshape(1, 1, 1, 1, 2)
    loss = reconstruction_loss(torch.zeros(1, 1, 2), image, torch.ones(1, 1, dtype=torch.bool), (1, 1, 2))
    torch.testing.assert_close(loss, torch.tensor(1.0 / (2.0 + 1e-6)))


def test_objective_equals_mae_pipeline_from_its_random_masking():
    """MAE's masking, encoder order, decoder and loss end to end vs the objective on the same mask.

    MAE keeps tokens in its shuffled order; fm3d keeps them ascending. Attention does not care
    about order, so both must predict the same patches.
    """
    encoder, objective = _setup(decoder_depth=2)
    encoder.eval()
    g = torch.Generator().manual_seed(2)
    image = torch.randn(2, 1, 16, 16, 32, generator=g)  # grid (2, 2, 4): not the configured (2, 2, 2)
    _, mask, ids_restore, ids_keep = mae_random_masking(torch.zeros(2, 16, 1), 0.75, g)
    with torch.no_grad():
        latent = encoder(image, keep=ids_keep)  # MAE's forward_encoder: kept tokens in shuffled order
        x = torch.cat([latent.pooled.unsqueeze(1), latent.tokens], dim=1)
        table = resize_pos_embed(sincos_pos_embed_3d((2, 2, 2), 48), (2, 2, 2), (2, 2, 4))
        pos = torch.cat([torch.zeros(1, 1, 48), table], dim=1)
        pred = mae_forward_decoder(objective, x, ids_restore, pos)
        theirs = mae_forward_loss(patchify3d(image, (8, 8, 8)), pred, mask, True)
        batch = {"mae_image": image, "mae_mask": mask.bool()}
        encoded = objective.encode(encoder, batch)
        torch.testing.assert_close(objective.decode(encoded["mae_visible"], mask.bool()), pred)
        ours, metrics = objective(batch, encoded)
    torch.testing.assert_close(ours, theirs)
    assert metrics["masked_share"].item() == 0.75 and metrics["visible_tokens"].item() == 4.0


def test_encode_keeps_the_unmasked_tokens_in_grid_order():
    mask = _mask([[0, 2, 3, 5, 6, 7], [1, 2, 3, 4, 5, 6]], 8)
    order = visible_first(mask)
    assert order[:, :2].tolist() == [[1, 4], [0, 7]]
    assert order[:, 2:].tolist() == [[0, 2, 3, 5, 6, 7], [1, 2, 3, 4, 5, 6]]
    encoder, objective = _setup()
    image = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        visible = objective.encode(encoder.eval(), {"mae_image": image, "mae_mask": mask})["mae_visible"]
        torch.testing.assert_close(visible.tokens, encoder(image, keep=order[:, :2]).tokens)
    assert visible.tokens.shape == (2, 2, 192) and visible.grid == (2, 2, 2)


def test_gradient_reaches_the_visible_voxels_only_and_every_parameter():
    encoder, objective = _setup()
    image = torch.randn(2, 1, 16, 16, 16)
    mask = _mask([[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]], 8)
    # The encoder reads a leaf; the target is built from a detached copy of the same values, so
    # the leaf's gradient is what flowed through the encoder alone.
    leaf = image.clone().requires_grad_(True)
    encoded = objective.encode(encoder, {"mae_image": leaf, "mae_mask": mask})
    loss, _ = objective({"mae_image": image, "mae_mask": mask}, encoded)
    loss.backward()
    per_patch = patchify3d(leaf.grad, (8, 8, 8)).abs().sum(-1)  # [2, 8]
    assert (per_patch[mask] == 0).all() and (per_patch[~mask] > 0).all()
    for module in (encoder, objective):
        missing = [n for n, p in module.named_parameters() if p.grad is None]
        assert not missing, missing
    assert objective.mask_token.grad.abs().sum() > 0 and encoder.cls_token.grad.abs().sum() > 0


def test_loss_ignores_the_visible_patches_of_the_target():
    encoder, objective = _setup()
    image = torch.randn(2, 1, 16, 16, 16)
    mask = _mask([[0, 1, 2, 3, 4, 5], [2, 3, 4, 5, 6, 7]], 8)
    with torch.no_grad():
        # One encoding of the original image: only the target changes between the calls.
        encoded = objective.encode(encoder, {"mae_image": image, "mae_mask": mask})

        def loss_with(changed: torch.Tensor) -> torch.Tensor:
            return objective({"mae_image": changed, "mae_mask": mask}, encoded)[0]

        patches = patchify3d(image, (8, 8, 8))
        visible_changed = torch.where(~mask[..., None], torch.randn_like(patches) * 5, patches)
        masked_changed = torch.where(mask[..., None], torch.randn_like(patches) * 5, patches)
        base = loss_with(image)
        torch.testing.assert_close(
            loss_with(unpatchify3d(visible_changed, (8, 8, 8), (2, 2, 2))), base, rtol=0, atol=0
        )
        assert not torch.allclose(loss_with(unpatchify3d(masked_changed, (8, 8, 8), (2, 2, 2))), base)


def test_a_few_steps_on_a_fixed_batch_reduce_the_loss():
    torch.manual_seed(0)
    encoder = fm3d.create_encoder("vit3d_tiny", **TINY)
    objective = MAEObjective(encoder.embed_dim)  # the default decoder
    objective.bind(encoder)
    g = torch.Generator().manual_seed(3)
    batch = {
        "mae_image": torch.randn(2, 1, 16, 16, 16, generator=g),
        "mae_mask": _mask([[0, 1, 3, 4, 6, 7], [1, 2, 3, 5, 6, 7]], 8),
    }
    optimizer = torch.optim.AdamW([*encoder.parameters(), *objective.parameters()], lr=3e-4)
    losses = []
    for _ in range(15):
        loss, _ = objective(batch, objective.encode(encoder, batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_loss_is_float32_under_bf16_autocast():
    encoder, objective = _setup()
    batch = {"mae_image": torch.randn(2, 1, 16, 16, 16), "mae_mask": _mask([[0, 1, 2, 3, 4, 5]] * 2, 8)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        encoded = objective.encode(encoder, batch)
        assert encoded["mae_visible"].tokens.dtype == torch.bfloat16
        loss, metrics = objective(batch, encoded)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert set(metrics) == {"masked_share", "visible_tokens"}


def test_state_holds_the_decoder_only_and_bind_is_idempotent():
    encoder, objective = _setup()
    names = set(objective.state_dict())
    assert "decoder_pred.weight" in names and "mask_token" in names
    assert not any(name.startswith(("blocks.", "patch_embed", "pos_embed")) for name in names)
    assert "decoder_pos_embed" not in names  # a function of the config, like the encoder's sin-cos table
    assert objective.decoder_pred.out_features == 8**3
    before = objective.decoder_pred.weight.clone()
    objective.bind(encoder)  # the same geometry: nothing is rebuilt
    torch.testing.assert_close(objective.decoder_pred.weight, before, rtol=0, atol=0)
    other = fm3d.create_encoder("vit3d_tiny", depth=1, image_size=(16, 16, 16), patch_size=(4, 8, 8))
    with pytest.raises(ObjectiveError, match="already bound"):
        objective.bind(other)


def test_encoder_without_cls_token_decodes_without_a_prefix():
    encoder, objective = _setup(cls_token=False)
    batch = {"mae_image": torch.randn(2, 1, 16, 16, 16), "mae_mask": _mask([[0, 1, 2, 3, 4, 5]] * 2, 8)}
    loss, _ = objective(batch, objective.encode(encoder, batch))
    loss.backward()
    assert not objective.has_cls and all(p.grad is not None for p in encoder.parameters())


def test_non_vit_encoder_is_refused():
    swin = fm3d.create_encoder("swin3d_tiny")
    with pytest.raises(ObjectiveError, match=f"needs a ViT3D encoder.*got {type(swin).__name__}"):
        MAEObjective(swin.embed_dim).bind(swin)


@pytest.mark.parametrize(
    ("image", "mask", "match"),
    [
        (torch.zeros(2, 1, 16, 16, 16), _mask([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4]], 8), "same count"),
        (torch.zeros(2, 1, 16, 16, 16), torch.ones(2, 8, dtype=torch.bool), r"mask_ratio strictly"),
        (torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 8, dtype=torch.bool), r"mask_ratio strictly"),
        (torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 64, dtype=torch.bool), r"8 tokens.*mae\.patch_size"),
        (torch.zeros(2, 1, 16, 16, 16), torch.zeros(2, 8), "must be a bool tensor"),
        (torch.zeros(2, 1, 16, 16, 12), torch.zeros(2, 8, dtype=torch.bool), r"mae\.size"),
        (torch.zeros(2, 16, 16, 16), torch.zeros(2, 8, dtype=torch.bool), r"\[B, 1, D, H, W\]"),
    ],
)
def test_bad_batches_name_the_view_setting(image, mask, match):
    encoder, objective = _setup()
    with pytest.raises(ObjectiveError, match=match):
        objective.encode(encoder, {"mae_image": image, "mae_mask": mask})


def test_usage_errors_are_named():
    encoder = fm3d.create_encoder("vit3d_tiny", depth=1, **TINY)
    batch = {"mae_image": torch.zeros(1, 1, 16, 16, 16), "mae_mask": _mask([[0, 1, 2, 3, 4, 5]], 8)}
    unbound = MAEObjective(encoder.embed_dim)
    with pytest.raises(ObjectiveError, match=r"bind\(encoder\)"):
        unbound.encode(encoder, batch)
    unbound.bind(encoder)
    with pytest.raises(ObjectiveError, match="mae_visible"):
        unbound(batch, {})
    with pytest.raises(ObjectiveError, match=r"needs batch\['mae_mask'\]"):
        unbound.encode(encoder, {"mae_image": batch["mae_image"]})
    for kwargs in ({"decoder_dim": 256, "decoder_heads": 8}, {"decoder_dim": 192, "decoder_heads": 5}):
        with pytest.raises(ObjectiveError, match="multiple of 6"):
            MAEObjective(192, **kwargs)
    with pytest.raises(ObjectiveError, match="at least 2 voxels"):
        MAEObjective(48, decoder_dim=48, decoder_heads=2).bind(
            fm3d.create_encoder("vit3d_tiny", depth=1, image_size=(2, 2, 2), patch_size=(1, 1, 1))
        )


def test_encoded_output_type_is_the_encoder_contract():
    encoder, objective = _setup()
    batch = {"mae_image": torch.zeros(1, 1, 16, 16, 16), "mae_mask": _mask([[0, 1, 2, 3, 4, 5]], 8)}
    assert isinstance(objective.encode(encoder, batch)["mae_visible"], EncoderOutput)
