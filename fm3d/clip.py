"""The CT-report CLIP heads: image projection, text tower, text projection and logit scale.

Pretraining (`pretrain.objectives.clip.ClipObjective`) trains a `ClipModel`; downstream
zero-shot classification, retrieval and report generation load it with `load_clip` without
importing `pretrain`. The image encoder is not part of it: it is exported on its own
(`fm3d.save_encoder`), and `encode_image` takes that encoder's pooled output.

The text tower trains in one of `TEXT_MODES` (`fm3d.text`): "full", "lora" or "frozen". A
frozen tower is not even loaded: its report embeddings come precomputed from the data loader
(`project_text`), and the text model's files are copied into the saved folder as they are.

Folder written by `save_clip(model, directory)`:
- `config.json`: `ClipConfig` (sizes, text settings and mode, loss family),
- `heads.safetensors`: image/text projections, logit scale and bias,
- `text/`: the text model and tokenizer (LoRA merged), so the folder is self-contained and
  embeds new texts (zero-shot prompts, retrieval queries) exactly as training did.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fm3d.atomic import atomic_folder, write_text_atomic
from fm3d.errors import Fm3dError
from fm3d.models.weights import check_finite, read_safetensors, save_safetensors
from fm3d.text import TextSettings, TextTower, text_hidden_size, text_model_folder, text_settings

LOSSES = ("infonce", "siglip")
TEXT_MODES = ("full", "lora", "frozen")
MAX_LOGIT_SCALE = 100.0  # CLIP's clamp on exp(logit_scale)


class ClipLoadError(Fm3dError, RuntimeError):
    """A CLIP folder that cannot be read back (missing or inconsistent files)."""


@dataclass
class ClipConfig:
    """Everything needed to rebuild a ClipModel (its text weights live in `text/`).

    `logit_scale_init` / `logit_bias_init` default to CLIP's log(1/0.07) and no bias for
    "infonce", SigLIP's log(10) and -10 for "siglip". `pooling`, `max_length`, `lowercase`,
    `prefix`, `long_reports` and `normalize` are `fm3d.text.TextTower`'s; `text_mode` and the
    `lora_*` fields say how the tower trains.
    """

    image_embed_dim: int
    text_model: str
    proj_dim: int = 512
    pooling: str = "auto"
    max_length: int = 256
    lowercase: bool = False
    trust_remote_code: bool = False
    loss: str = "infonce"
    logit_scale_init: float | None = None
    logit_bias_init: float | None = None
    prefix: str | None = None
    long_reports: str = "truncate"
    normalize: bool | None = None
    text_mode: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_targets: list[str] | None = None

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"CLIP loss must be one of {LOSSES}, got {self.loss!r}")
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"text_mode must be one of {TEXT_MODES}, got {self.text_mode!r}")
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

    `text_tower` given (as `load_clip` does) is used as it is; otherwise the config's mode
    decides: "full" loads the tower, "lora" loads it and adds adapters, "frozen" loads nothing
    (`text` is None; `text_settings` still names what the cached embeddings must be).
    """

    def __init__(self, config: ClipConfig, text_tower: TextTower | None = None) -> None:
        super().__init__()
        self.config = config
        if text_tower is None and config.text_mode != "frozen":
            text_tower = TextTower(
                config.text_model,
                pooling=config.pooling,
                max_length=config.max_length,
                lowercase=config.lowercase,
                trust_remote_code=config.trust_remote_code,
                prefix=config.prefix,
                long_reports=config.long_reports,
                normalize=config.normalize,
            )
            if config.text_mode == "lora":
                text_tower.add_lora(
                    config.lora_rank, config.lora_alpha, config.lora_dropout, config.lora_targets
                )
        self.text = text_tower
        if text_tower is None:
            self.text_settings: TextSettings = text_settings(
                config.text_model, config.pooling, config.max_length, config.lowercase, config.prefix,
                config.long_reports, config.normalize,
            )  # fmt: skip
            text_width = text_hidden_size(config.text_model)
        else:
            self.text_settings, text_width = text_tower.settings, text_tower.hidden_size
        # No biases, as in CLIP: the projections are plain linear maps into the joint space.
        self.image_projection = nn.Linear(config.image_embed_dim, config.proj_dim, bias=False)
        self.text_projection = nn.Linear(text_width, config.proj_dim, bias=False)
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
        if self.text is None:
            raise ClipLoadError(
                "this CLIP model trains a frozen text tower that it does not load: it projects cached "
                "report embeddings (project_text). Save it and load_clip the folder to embed new texts"
            )
        return self.project_text(self.text(texts), normalize)

    def project_text(self, embeddings: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Joint-space text embeddings [B, proj_dim] from the tower's embeddings [B, hidden]."""
        projected = self.text_projection(embeddings)
        return F.normalize(projected, dim=-1) if normalize else projected


def save_clip(model: ClipModel, directory: str | Path) -> Path:
    """Write `model` to `directory` (config.json, heads.safetensors, text/) and return it.

    Each part is written atomically (a killed save leaves the previous complete part), the
    config last, so a reader never finds a config.json describing parts not yet written.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_folder(directory / "text") as text_folder:
        if model.text is None:  # frozen and never loaded: its files are the trained tower
            shutil.copytree(text_model_folder(model.config.text_model), text_folder, dirs_exist_ok=True)
        else:
            model.text.save_pretrained(text_folder)
    heads = {
        name: tensor.detach().cpu().contiguous()
        for name, tensor in model.state_dict().items()
        if not name.startswith("text.")
    }
    save_safetensors(heads, directory / "heads.safetensors")
    # The settings as resolved ("auto" pooling, the model's own prefix and normalisation): a
    # saved tower no longer carries the sentence-transformers files they were read from.
    settings = model.text_settings
    resolved = {
        "pooling": settings.pooling,
        "max_length": settings.max_length,
        "prefix": settings.prefix,
        "normalize": settings.normalize,
    }
    config = (
        model.config.to_dict() | resolved | {"text_model": "text", "format": "fm3d-clip", "format_version": 1}
    )
    write_text_atomic(directory / "config.json", json.dumps(config, indent=2))
    return directory


def _text_folder(directory: Path, raw: dict, config_path: Path) -> Path:
    """The text model folder named by config.json, refused unless it lies inside `directory`.

    A downloaded folder must not point its loader at files elsewhere on the machine (another
    model's code, a home folder); a caller who means that passes `text_model=` explicitly.
    """
    named = raw.get("text_model", "text")
    if not isinstance(named, str) or not named:
        raise ClipLoadError(
            f"{config_path}: `text_model` must be a folder name inside {directory}, got {named!r}"
        )
    folder = (directory / named).resolve()
    if not folder.is_relative_to(directory.resolve()):
        raise ClipLoadError(
            f"{config_path}: `text_model` {named!r} points outside the CLIP folder ({folder}). fm3d loads "
            "only the text model inside the folder; if you mean that other model, pass "
            "load_clip(..., text_model=PATH) yourself"
        )
    return folder


def load_clip(
    directory: str | Path,
    map_location: str | torch.device = "cpu",
    *,
    trust_remote_code: bool = False,
    text_model: str | Path | None = None,
) -> ClipModel:
    """Rebuild the ClipModel that `save_clip` wrote to `directory`.

    Nothing in the folder's own files can run code or reach outside it: a config.json asking
    for `trust_remote_code` is refused unless the caller passes `trust_remote_code=True`, and
    its `text_model` must be a folder inside `directory` unless the caller names one with
    `text_model=` (as `trust_pickle` guards pickles in `fm3d.load_encoder`).
    """
    directory = Path(directory)
    config_path, heads_path = directory / "config.json", directory / "heads.safetensors"
    for path in (config_path, heads_path):
        if not path.is_file():
            raise ClipLoadError(
                f"{path} is missing: {directory} is not a folder written by fm3d.clip.save_clip"
            )
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ClipLoadError(
            f"{config_path} is not valid JSON ({error}); save the CLIP model again"
        ) from error
    if not isinstance(raw, dict):
        raise ClipLoadError(f"{config_path} holds a {type(raw).__name__}, not a JSON object; save it again")
    if raw.get("trust_remote_code") and not trust_remote_code:
        raise ClipLoadError(
            f"{config_path} asks for trust_remote_code, which would run Python code shipped with the "
            "model. A file cannot turn that on: if you trust its source, call "
            "load_clip(..., trust_remote_code=True)"
        )
    folder = Path(text_model) if text_model is not None else _text_folder(directory, raw, config_path)
    if text_model is None and not folder.is_dir():
        raise ClipLoadError(
            f"{folder} is missing: {directory} is not a folder written by fm3d.clip.save_clip"
        )
    known = {f.name for f in fields(ClipConfig)}
    try:
        config = ClipConfig(**{key: value for key, value in raw.items() if key in known})
    except (TypeError, ValueError) as error:
        raise ClipLoadError(f"{config_path}: {error}; save the CLIP model again") from error
    config.text_model = str(folder)
    config.trust_remote_code = trust_remote_code
    # The saved tower as it is: LoRA was merged into it, a frozen one was copied whole.
    tower = TextTower(
        folder, config.pooling, config.max_length, config.lowercase, trust_remote_code, config.prefix,
        config.long_reports, config.normalize,
    )  # fmt: skip
    model = ClipModel(config, tower)
    heads = read_safetensors(heads_path, map_location)
    expected = {
        name: tuple(t.shape) for name, t in model.state_dict().items() if not name.startswith("text.")
    }
    wrong = [
        f"{name}: file {tuple(heads[name].shape)} vs config {shape}"
        for name, shape in expected.items()
        if name in heads and tuple(heads[name].shape) != shape
    ]
    missing = [name for name in expected if name not in heads]
    unexpected = [name for name in heads if name not in expected]
    if missing or unexpected or wrong:
        raise ClipLoadError(
            f"{heads_path} does not match its config.json: missing {missing}, unexpected {unexpected}, "
            f"wrong shapes {wrong}; save the CLIP model again"
        )
    check_finite(heads, heads_path)
    model.load_state_dict(heads, strict=False)
    return model.to(map_location)
