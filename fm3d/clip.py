"""The CT-report CLIP heads: image projection, text tower, text projection and logit scale.

Pretraining (`pretrain.objectives.clip.ClipObjective`) trains a `ClipModel`; downstream
zero-shot classification, retrieval and report generation load it with `load_clip` without
importing `pretrain`. The image encoder is not part of it: it is exported on its own
(`fm3d.save_encoder`), and `encode_image` takes that encoder's pooled output.

Folder written by `save_clip(model, directory)`:
- `config.json`: `ClipConfig` (sizes, pooling, max length, loss family, fm3d version),
- `heads.safetensors`: image/text projections, logit scale and bias,
- `text/`: the text model and tokenizer (`save_pretrained`), so the folder is self-contained.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from fm3d.errors import Fm3dError
from fm3d.text import TextTower

LOSSES = ("infonce", "siglip")
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale)


class ClipLoadError(Fm3dError, RuntimeError):
    """A CLIP folder that cannot be read back (missing or inconsistent files)."""


@dataclass
class ClipConfig:
    """Everything needed to rebuild a ClipModel (its text weights live in `text/`).

    `logit_scale_init` / `logit_bias_init` default to CLIP's log(1/0.07) and no bias for
    "infonce", SigLIP's log(10) and -10 for "siglip".
    """

    image_embed_dim: int
    text_model: str
    proj_dim: int = 512
    pooling: str = "cls"
    max_length: int = 256
    lowercase: bool = False
    trust_remote_code: bool = False
    loss: str = "infonce"
    logit_scale_init: float | None = None
    logit_bias_init: float | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"CLIP loss must be one of {LOSSES}, got {self.loss!r}")
        if self.logit_scale_init is None:
            self.logit_scale_init = math.log(1 / 0.07) if self.loss == "infonce" else math.log(10.0)
        if self.logit_bias_init is None:
            self.logit_bias_init = 0.0 if self.loss == "infonce" else -10.0

    def to_dict(self) -> dict:
        return asdict(self)


class ClipModel(nn.Module):
    """Projects pooled CT embeddings and report embeddings into one normalised space.

    `logit_scale` is a learnable log temperature; `scale()` returns exp(logit_scale) clamped
    at 100 as CLIP does. `logit_bias` is SigLIP's learnable bias (kept at its initial value
    and unused by the InfoNCE loss, but stored so one class serves both).
    """

    def __init__(self, config: ClipConfig, text_tower: TextTower | None = None) -> None:
        super().__init__()
        self.config = config
        self.text = text_tower or TextTower(
            config.text_model,
            pooling=config.pooling,
            max_length=config.max_length,
            lowercase=config.lowercase,
            trust_remote_code=config.trust_remote_code,
        )
        # No biases, as in CLIP: the projections are plain linear maps into the joint space.
        self.image_projection = nn.Linear(config.image_embed_dim, config.proj_dim, bias=False)
        self.text_projection = nn.Linear(self.text.hidden_size, config.proj_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init)))
        self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))

    def scale(self) -> torch.Tensor:
        """exp(logit_scale) clamped at 100 (the gradient stops while clamped, as in CLIP)."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)

    def encode_image(self, pooled: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Joint-space image embeddings [B, proj_dim] from the encoder's pooled output [B, C]."""
        projected = self.image_projection(pooled)
        return F.normalize(projected, dim=-1) if normalize else projected

    def encode_text(self, texts: list[str], normalize: bool = True) -> torch.Tensor:
        """Joint-space text embeddings [B, proj_dim] of raw report texts."""
        projected = self.text_projection(self.text(texts))
        return F.normalize(projected, dim=-1) if normalize else projected


def save_clip(model: ClipModel, directory: str | Path) -> Path:
    """Write `model` to `directory` (config.json, heads.safetensors, text/) and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.text.save_pretrained(directory / "text")
    heads = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith("text.")
    }
    save_file(heads, str(directory / "heads.safetensors"))
    config = model.config.to_dict() | {"text_model": "text", "format": "fm3d-clip", "format_version": 1}
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def load_clip(directory: str | Path, map_location: str | torch.device = "cpu") -> ClipModel:
    """Rebuild the ClipModel that `save_clip` wrote to `directory`."""
    directory = Path(directory)
    config_path, heads_path = directory / "config.json", directory / "heads.safetensors"
    for path in (config_path, heads_path, directory / "text"):
        if not path.exists():
            raise ClipLoadError(
                f"{path} is missing: {directory} is not a folder written by fm3d.clip.save_clip"
            )
    raw = json.loads(config_path.read_text())
    known = {f.name for f in fields(ClipConfig)}
    config = ClipConfig(**{key: value for key, value in raw.items() if key in known})
    config.text_model = str(directory / raw.get("text_model", "text"))
    model = ClipModel(config)
    heads = load_file(str(heads_path), device=str(map_location))
    missing, unexpected = model.load_state_dict(heads, strict=False)
    missing = [name for name in missing if not name.startswith("text.")]
    if missing or unexpected:
        raise ClipLoadError(
            f"{heads_path} does not match its config.json: missing {missing}, unexpected {unexpected}"
        )
    return model.to(map_location)
