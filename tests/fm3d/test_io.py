"""Encoder save/load: export folders, Lightning checkpoints, and refusing pickled objects."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import OrderedDict

import lightning as L
import pytest
import torch
from safetensors.torch import load_file, save_file

import fm3d
from fm3d.io import EncoderLoadError, UnsafeCheckpointError


class _Arbitrary:
    """A class weights-only unpickling does not know."""

    def __init__(self) -> None:
        self.note = "not a tensor"


class _TinyModule(L.LightningModule):
    """The smallest fm3d-style LightningModule: holds `self.encoder` and writes its config."""

    def __init__(self, lr: float = 0.1, encoder_name: str = "vit3d_tiny") -> None:
        super().__init__()
        self.save_hyperparameters()  # hyper-parameters ride in the checkpoint and must stay weights-only
        self.encoder = fm3d.create_encoder(encoder_name, depth=1, image_size=(32, 32, 32))
        self.head = torch.nn.Linear(self.encoder.embed_dim, 1)

    def training_step(self, batch, batch_idx):
        return self.head(self.encoder(batch[0]).pooled).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["fm3d_encoder_config"] = self.encoder.config.to_dict()


@pytest.mark.parametrize("name", ["vit3d_tiny", "swin3d_tiny"])
def test_save_load_round_trip_is_bit_identical(tmp_path, name):
    torch.manual_seed(0)
    overrides = (
        {"depth": 1, "pos_embed": "sincos", "target_spacing_mm": (2.0, 1.0, 1.0)} if "vit" in name else {}
    )
    encoder = fm3d.create_encoder(name, **overrides).eval()
    folder = fm3d.save_encoder(encoder, tmp_path / "enc")
    config = json.loads((folder / "config.json").read_text())
    assert config["name"] == name and "hu_window" in config and "target_spacing_mm" in config
    assert set(load_file(folder / "model.safetensors")) == set(encoder.state_dict())
    loaded = fm3d.load_encoder(folder).eval()
    assert loaded.config == encoder.config
    # Swin's instance norms need more than one voxel on the 1/32 grid, hence W = 64.
    x = torch.randn(1, 1, 32, 32, 64)
    with torch.no_grad():
        before, after = encoder(x), loaded(x)
    assert torch.equal(before.tokens, after.tokens) and torch.equal(before.pooled, after.pooled)


def test_pickled_object_is_refused_with_the_opt_in(tmp_path):
    encoder = fm3d.create_encoder("vit3d_tiny", depth=1)
    path = tmp_path / "evil.ckpt"
    torch.save(
        {
            "fm3d_encoder_config": encoder.config.to_dict(),
            "state_dict": {f"encoder.{k}": v for k, v in encoder.state_dict().items()},
            "extra": _Arbitrary(),
        },
        path,
    )
    with pytest.raises(UnsafeCheckpointError, match=r"evil\.ckpt.*_Arbitrary.*trust_pickle=True"):
        fm3d.load_encoder(path)
    loaded = fm3d.load_encoder(path, trust_pickle=True)
    assert torch.equal(loaded.pos_embed, encoder.pos_embed)


def test_lightning_checkpoint_from_a_real_trainer(tmp_path):
    torch.manual_seed(0)
    module = _TinyModule()
    data = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(2, 1, 32, 32, 32)), batch_size=2
    )
    trainer = L.Trainer(
        max_steps=1,
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, data)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    loaded = fm3d.load_encoder(path).eval()
    module.encoder.eval()
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x).pooled, module.encoder(x).pooled)


def test_merged_encoder_weights_win_over_adapter_keys(tmp_path):
    """A LoRA run's checkpoint: `state_dict` has adapter names, the merged plain weights are loaded."""
    encoder = fm3d.create_encoder("vit3d_tiny")
    adapter_state = {
        f"encoder.{name.replace('.weight', '.base_layer.weight')}": torch.zeros_like(value)
        for name, value in encoder.state_dict().items()
    }
    checkpoint = {
        "state_dict": adapter_state,
        "fm3d_encoder_config": encoder.config.to_dict(),
        "fm3d_encoder_state_dict": encoder.state_dict(),
    }
    path = tmp_path / "lora.ckpt"
    torch.save(checkpoint, path)
    loaded = fm3d.load_encoder(path)
    for name, value in encoder.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value)


def test_mismatched_weights_are_named(tmp_path):
    folder = fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", depth=2), tmp_path / "enc")
    config = json.loads((folder / "config.json").read_text())
    config["depth"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(EncoderLoadError, match=r"unexpected: \[blocks\.1\."):
        fm3d.load_encoder(folder)


def test_foreign_checkpoint_goes_to_the_peer_adapters(tmp_path):
    path = tmp_path / "peer.pt"
    torch.save(OrderedDict(weight=torch.zeros(2)), path)
    # Without fm3d metadata the file is a peer's: either the adapters reject the unknown keys
    # or, where they are not installed, load_encoder says so. Both name the file.
    with pytest.raises(Exception, match=r"peer\.pt"):
        fm3d.load_encoder(path)


def test_missing_path_and_wrong_format_are_clear(tmp_path):
    with pytest.raises(EncoderLoadError, match="does not exist"):
        fm3d.load_encoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderLoadError, match=r"config\.json"):
        fm3d.load_encoder(tmp_path / "empty", format="fm3d")


# The child's own peak is VmHWM: it belongs to the memory map exec gives the child, where
# ru_maxrss carries over the peak of the pytest process it was forked from (over 1.2 GiB late
# in a full run).
PEAK_SCRIPT = """
import re, sys
from pathlib import Path
import fm3d
from fm3d.errors import Fm3dError
try:
    fm3d.load_encoder(sys.argv[1])
    print("LOADED")
except Fm3dError as error:
    print("REFUSED", error)
peak_kib = int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text()).group(1))
print("PEAK_MIB", peak_kib / 1024)
"""
# Importing torch, MONAI and fm3d peaks near 650 MiB; the absurd models below would need
# hundreds of GiB, so anything allocated for them shows far above this bound.
PEAK_BOUND_MIB = 1200


def _load_in_subprocess(path) -> tuple[str, float]:
    result = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, str(path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    message = result.stdout.splitlines()[0]
    return message, float(result.stdout.split("PEAK_MIB")[1])


def test_absurd_config_json_is_refused_before_allocation(tmp_path):
    folder = fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", depth=1), tmp_path / "enc")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(
        json.dumps(config | {"embed_dim": 65_536, "num_heads": 1, "depth": 100_000})
    )
    message, peak_mib = _load_in_subprocess(folder)
    assert message.startswith(f"REFUSED {folder / 'config.json'}: vit3d_tiny config would build about")
    assert "embed_dim 65536, depth 100000" in message and "FM3D_MAX_ENCODER_PARAMS" in message
    assert peak_mib < PEAK_BOUND_MIB


def test_peer_file_describing_an_absurd_depth_is_refused_before_allocation(tmp_path):
    """MONAI files give depth as the highest block index + 1: one tiny tensor can claim 1e8 blocks."""
    from monai.networks.nets import ViT

    net = ViT(
        in_channels=1, img_size=16, patch_size=8, hidden_size=64, mlp_dim=128, num_layers=1, num_heads=1
    )
    state = dict(net.state_dict()) | {"blocks.99999999.norm1.weight": torch.ones(64)}
    path = tmp_path / "monai_vit.pt"
    torch.save(state, path)
    message, peak_mib = _load_in_subprocess(path)
    assert message.startswith(f"REFUSED {path}: the monai_vit weights describe an unusable encoder")
    assert "depth 100000000" in message and "over the limit" in message
    assert peak_mib < PEAK_BOUND_MIB


def test_nan_weights_are_refused_at_load(tmp_path):
    encoder = fm3d.create_encoder("vit3d_tiny", depth=1)
    folder = fm3d.save_encoder(encoder, tmp_path / "enc")
    state = load_file(folder / "model.safetensors")
    state["blocks.0.mlp.fc1.weight"][0, :3] = float("nan")
    state["norm.bias"][1] = float("inf")
    save_file(state, folder / "model.safetensors")
    with pytest.raises(
        EncoderLoadError,
        match=r"model\.safetensors: 2 tensor\(s\) hold NaN or infinite values: blocks\.0\.mlp\.fc1\.weight "
        r"\(3 values\), norm\.bias \(1 values\)\. .*export them again",
    ):
        fm3d.load_encoder(folder)


def test_safetensors_of_the_wrong_shape_are_named_not_a_torch_error(tmp_path):
    folder = fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", depth=1), tmp_path / "enc")
    state = load_file(folder / "model.safetensors")
    state["norm.weight"] = torch.ones(7)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(
        EncoderLoadError, match=r"wrong shapes: \[norm\.weight: file \(7,\) vs config \(192,\)\]"
    ):
        fm3d.load_encoder(folder)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"embed_dim": "192"}, r"`embed_dim` must be int, got str '192'"),
        ({"family": "vit3dd"}, r"unknown encoder family 'vit3dd' \(did you mean 'vit3d'"),
        ({"name": "vit3d_tinny"}, r"unknown encoder 'vit3d_tinny' \(did you mean 'vit3d_tiny'"),
    ],
)
def test_config_errors_name_the_config_file(tmp_path, change, named):
    folder = fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", depth=1), tmp_path / "enc")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | change))
    with pytest.raises(EncoderLoadError, match=rf"enc/config\.json: .*{named}"):
        fm3d.load_encoder(folder)


def test_save_encoder_writes_atomically_over_an_old_export(tmp_path):
    folder = fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", depth=1), tmp_path / "enc")
    fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", depth=2), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert fm3d.load_encoder(folder).config.depth == 2


def _as_written_before_the_rename(config: dict) -> dict:
    """A config dict as fm3d wrote it before `img_size` became `image_size` (and before `axis_order`)."""
    old = {("img_size" if key == "image_size" else key): value for key, value in config.items()}
    del old["axis_order"]
    return old


@pytest.mark.parametrize("name", ["vit3d_tiny", "swin3d_tiny"])
def test_exports_and_checkpoints_written_with_img_size_still_load(tmp_path, name):
    torch.manual_seed(0)
    encoder = fm3d.create_encoder(name, **({"depth": 1, "image_size": (16, 32, 32)} if "vit" in name else {}))
    folder = fm3d.save_encoder(encoder, tmp_path / "old_export")
    old = _as_written_before_the_rename(json.loads((folder / "config.json").read_text()))
    (folder / "config.json").write_text(json.dumps(old, indent=2))
    ckpt = tmp_path / "old.ckpt"
    state = {f"encoder.{key}": value for key, value in encoder.state_dict().items()}
    torch.save({"fm3d_encoder_config": old, "state_dict": state}, ckpt)

    for path in (folder, ckpt):
        loaded = fm3d.load_encoder(path)
        assert loaded.config == encoder.config and loaded.config.axis_order == "zyx"
        assert all(
            torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), state.values(), strict=True)
        )


def test_a_config_with_both_crop_size_names_is_refused_naming_them(tmp_path):
    folder = fm3d.save_encoder(fm3d.create_encoder("vit3d_tiny", depth=1), tmp_path / "both")
    config = json.loads((folder / "config.json").read_text())
    config["img_size"] = config["image_size"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        EncoderLoadError, match=r"config\.json: config holds both 'img_size'.*keep only 'image_size'"
    ):
        fm3d.load_encoder(folder)
