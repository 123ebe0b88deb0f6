"""Merlin's image encoder loads as resnet3d_i3d and reproduces Merlin's forward pass.

The reference is written from Merlin's published code (`merlin/models/i3res.py`,
`inflate.py`, torchvision's ResNet-152 it inflates) as plain functional ops on Merlin's own
input layout: a MONAI (x, y, z) volume, permuted to (z, x, y) and repeated to 3 channels.
The key layout is enumerated from the same code, so it does not come from fm3d's module.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fm3d
from fm3d.models.adapters import PeerWeightsError, check_conversion, convert_peer_weights
from fm3d.models.registry import create_encoder
from fm3d.spec import InputSpec

# Folding Merlin's three identical input channels into one sums the stem kernel first, which
# reorders float32 sums; activations here are O(5), hence an absolute 1e-4.
ATOL, RTOL = 1e-4, 1e-5
RESNET152 = (3, 8, 36, 3)


def merlin_i3_resnet_shapes(layers: tuple[int, ...], width: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of Merlin's `i3_resnet` parameters and BN buffers (conv_class=True, heads excluded)."""
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(name: str, channels: int) -> None:
        for part in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{name}.{part}"] = (channels,)
        shapes[f"{name}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (width, 3, 3, 7, 7)  # inflate_conv of the 7x7 stem: time 3
    bn("bn1", width)
    in_ch = width
    for stage, blocks in enumerate(layers, start=1):
        planes = width * 2 ** (stage - 1)
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            shapes[f"{name}.conv1.weight"] = (planes, in_ch, 1, 1, 1)
            bn(f"{name}.bn1", planes)
            shapes[f"{name}.conv2.weight"] = (planes, planes, 3, 3, 3)
            bn(f"{name}.bn2", planes)
            shapes[f"{name}.conv3.weight"] = (planes * 4, planes, 1, 1, 1)
            bn(f"{name}.bn3", planes * 4)
            if block == 0:
                shapes[f"{name}.downsample.0.weight"] = (planes * 4, in_ch, 1, 1, 1)
                bn(f"{name}.downsample.1", planes * 4)
            in_ch = planes * 4
    return shapes


def random_merlin_state(layers: tuple[int, ...], width: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {}
    for name, shape in merlin_i3_resnet_shapes(layers, width).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(100)
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape) + 0.5
        elif ".bn" in name or "bn1" in name or "downsample.1" in name:
            state[name] = torch.randn(shape) * 0.2 + (1.0 if name.endswith("weight") else 0.0)
        else:  # conv kernels, scaled so activations stay O(1) through the stack
            fan_in = torch.tensor(shape[1:]).prod().item()
            state[name] = torch.randn(shape) * (2.0 / fan_in) ** 0.5
    return state


def merlin_reference(state: dict[str, torch.Tensor], layers: tuple[int, ...], image: torch.Tensor):
    """Merlin's I3ResNet forward (eval) on its input [B, 1, x, y, z]: ((z, x, y) feature map, embedding)."""

    def bn(x, name):
        return F.batch_norm(
            x,
            state[f"{name}.running_mean"],
            state[f"{name}.running_var"],
            state[f"{name}.weight"],
            state[f"{name}.bias"],
            training=False,
            eps=1e-5,
        )

    x = image.permute(0, 1, 4, 2, 3)
    x = torch.cat((x, x, x), dim=1)
    x = F.relu(bn(F.conv3d(x, state["conv1.weight"], stride=(1, 2, 2), padding=(1, 3, 3)), "bn1"))
    x = F.max_pool3d(x, kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1))
    for stage, blocks in enumerate(layers, start=1):
        for block in range(blocks):
            name = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1  # torchvision v1.5: the 3x3 carries the stride
            out = F.relu(bn(F.conv3d(x, state[f"{name}.conv1.weight"]), f"{name}.bn1"))
            out = F.relu(
                bn(F.conv3d(out, state[f"{name}.conv2.weight"], stride=stride, padding=1), f"{name}.bn2")
            )
            out = bn(F.conv3d(out, state[f"{name}.conv3.weight"]), f"{name}.bn3")
            if block == 0:
                x = bn(
                    F.conv3d(x, state[f"{name}.downsample.0.weight"], stride=stride), f"{name}.downsample.1"
                )
            x = F.relu(out + x)
    return x, F.adaptive_avg_pool3d(x, 1).flatten(1)


def _heads(width: int) -> dict[str, torch.Tensor]:
    out = width * 32
    return {
        "classifier.weight": torch.randn(1692, out, 1, 1, 1),
        "classifier.bias": torch.randn(1692),
        "contrastive_head.weight": torch.randn(512, out, 1, 1, 1),
        "contrastive_head.bias": torch.randn(512),
    }


LAYERS, WIDTH = (2, 1, 1, 1), 4
FEATURES = {"conv1": "0", "bn1": "1", "layer1": "4", "layer2": "5", "layer3": "6", "layer4": "7"}


def _layout(state: dict[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    if kind == "clip":  # MerlinArchitecture: image tower beside the text tower
        full = {f"encode_image.i3_resnet.{k}": v for k, v in {**state, **_heads(WIDTH)}.items()}
        text = {"encode_text.linear_layer.weight": torch.randn(512, 768), "logit_scale": torch.tensor(1.0)}
        return {**full, **text}
    if kind == "five_year":  # loaded straight into i3_resnet
        return {**state, **_heads(WIDTH)}
    if kind == "report_generation":  # ModifiedI3ResNet.features Sequential
        renamed = {}
        for key, value in state.items():
            module, _, rest = key.partition(".")
            renamed[f"encode_image.vision_model.features.{FEATURES[module]}.{rest}"] = value
        return {**renamed, "adapter.linear2.weight": torch.randn(16, WIDTH * 32)}
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["clip", "five_year", "report_generation"])
def test_merlin_checkpoint_loads_and_matches_merlin_forward(tmp_path, kind):
    state = random_merlin_state(LAYERS, WIDTH)
    path = tmp_path / "merlin.pt"
    torch.save(_layout(state, kind), path)

    encoder = fm3d.load_encoder(path).eval()

    merlin_input = torch.randn(2, 1, 64, 48, 32)  # MONAI (x, y, z)
    feature_map, embedding = merlin_reference(state, LAYERS, merlin_input)  # [B, C, z, x, y]
    with torch.no_grad():
        out = encoder(merlin_input.permute(0, 1, 4, 3, 2))  # fm3d (D, H, W) = (z, y, x)
    torch.testing.assert_close(out.pooled, embedding, atol=ATOL, rtol=RTOL)
    expected_tokens = feature_map.transpose(-1, -2).flatten(2).transpose(1, 2)  # (z, y, x) order
    torch.testing.assert_close(out.tokens, expected_tokens, atol=ATOL, rtol=RTOL)
    assert out.grid == (feature_map.shape[2], feature_map.shape[4], feature_map.shape[3])
    assert encoder.config.layers == LAYERS and encoder.embed_dim == WIDTH * 32
    assert encoder.config.source["format"] == "merlin"
    # Merlin's published preprocessing in fm3d's axes: its kernels were transposed to take (z, y, x).
    assert encoder.config.input_spec == InputSpec(
        (3.0, 1.5, 1.5), (-1000, 1000), (0, 1), "zyx", (160, 224, 224)
    )


def test_missing_block_is_named(tmp_path):
    state = random_merlin_state(LAYERS, WIDTH)
    del state["layer1.1.bn2.running_var"]
    path = tmp_path / "merlin.pt"
    torch.save(_layout(state, "clip"), path)

    with pytest.raises(PeerWeightsError, match=r"layer1\.1\.bn2\.running_var") as caught:
        fm3d.load_encoder(path)
    assert str(path) in str(caught.value)


def test_full_resnet152_key_set_covers_resnet3d_i3d():
    # Merlin's published encoder: torchvision ResNet-152 inflated, shapes only (meta device).
    with torch.device("meta"):
        state = {
            f"encode_image.i3_resnet.{k}": torch.empty(shape)
            for k, shape in merlin_i3_resnet_shapes(RESNET152, 64).items()
        }
        conversion = convert_peer_weights(state, "merlin.pt")
        encoder = create_encoder(conversion.encoder_name, **conversion.config)
    report = check_conversion(encoder, conversion, "merlin.pt")

    assert conversion.format == "merlin" and conversion.config["layers"] == RESNET152
    assert report.complete and report.matched == len(state) == len(encoder.state_dict())
    assert encoder.embed_dim == 2048
