"""Embeddings cached on disk by study_id, invalidated when the models or the inputs change.

Layout: `<directory>/<fingerprint>/{image,text}.safetensors`, one tensor per study_id. The
fingerprint hashes the content of the encoder and CLIP files (or, for an encoder given as a
module or registry name, its weights) and the preprocessing settings, so a new export or another
crop size lands in a new folder instead of reusing stale vectors. The text file also records a
hash of each study's report text in its metadata: a study whose report changed is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

logger = logging.getLogger(__name__)

KINDS = ("image", "text")


def text_hash(text: str) -> str:
    """Short content hash of a report text."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def _hash_path(digest: Any, path: Path) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode())
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)


def fingerprint(sources: list[str | Path | nn.Module], settings: dict[str, Any]) -> str:
    """A short hash of model files (content) or modules (weights) and the settings dict."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for source in sources:
        if isinstance(source, nn.Module):
            for name, tensor in sorted(source.state_dict().items()):
                digest.update(name.encode())
                digest.update(
                    tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                )
        else:
            _hash_path(digest, Path(source))
    return digest.hexdigest()[:20]


class EmbeddingCache:
    """Image and text embeddings of one (models, settings) fingerprint, by study_id."""

    def __init__(self, directory: str | Path, key: str) -> None:
        self.folder = Path(directory) / key
        self.entries: dict[str, dict[str, torch.Tensor]] = {kind: {} for kind in KINDS}
        self.text_hashes: dict[str, str] = {}
        self._dirty = False
        for kind in KINDS:
            path = self.folder / f"{kind}.safetensors"
            if not path.is_file():
                continue
            with safe_open(str(path), framework="pt") as handle:
                self.entries[kind] = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (safe_open is not a dict)
                if kind == "text":
                    self.text_hashes = json.loads((handle.metadata() or {}).get("text_hashes", "{}"))
        logger.info(
            "embedding cache %s: %d image, %d text", self.folder, *(len(self.entries[k]) for k in KINDS)
        )

    def get(self, kind: str, study_ids: list[str], texts: list[str] | None = None) -> torch.Tensor | None:
        """The stacked embeddings of `study_ids`, or None unless every one is cached (and current)."""
        found = self.entries[kind]
        if any(s not in found for s in study_ids):
            return None
        if texts is not None and any(
            self.text_hashes.get(s) != text_hash(t) for s, t in zip(study_ids, texts, strict=True)
        ):
            return None
        return torch.stack([found[s] for s in study_ids])

    def put(
        self, kind: str, study_ids: list[str], embeddings: torch.Tensor, texts: list[str] | None = None
    ) -> None:
        """Remember the embeddings [B, P] of `study_ids` (written by `save`)."""
        for i, study_id in enumerate(study_ids):
            self.entries[kind][study_id] = embeddings[i].detach().float().cpu().clone()
            if texts is not None:
                self.text_hashes[study_id] = text_hash(texts[i])
        self._dirty = True

    def save(self) -> None:
        """Write what changed since loading."""
        if not self._dirty:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        for kind in KINDS:
            if self.entries[kind]:
                metadata = {"text_hashes": json.dumps(self.text_hashes)} if kind == "text" else None
                tmp = self.folder / f".{kind}.safetensors.tmp"
                save_file(self.entries[kind], str(tmp), metadata=metadata)
                tmp.replace(self.folder / f"{kind}.safetensors")  # a crash never leaves half a file
        self._dirty = False
