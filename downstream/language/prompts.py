"""Prompt sets and the prompt-pair arithmetic of zero-shot classification with a CLIP text side.

A prompt set (YAML in `downstream/prompts/`, or any YAML path) names findings and the templates
that turn a finding into a pair of sentences, e.g. CT-CLIP's ("{finding} is present.",
"{finding} is not present.")::

    name: ct_rate
    templates: [["{finding} is present.", "{finding} is not present."], ...]
    findings: {Lung nodule: lung nodule, ...}      # label column -> phrase (a list: column = phrase)

The probability that a finding is present in an embedding x (image or report, in CLIP's joint
space, L2-normalised) is CT-CLIP's softmax over the pair,

    p_m = exp(s * <x, t+_m>) / (exp(s * <x, t+_m>) + exp(s * <x, t-_m>)),

with s = CLIP's logit scale and t+/-_m the normalised text embeddings of template m's positive
and negative sentence; with several templates the p_m are averaged (Merlin-style averaging over
prompts). The same arithmetic reads findings from report text (`read_findings`), which is how
report generation scores the clinical findings of generated reports.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from fm3d.clip import ClipModel
from fm3d.errors import Fm3dError

logger = logging.getLogger(__name__)

PROMPT_DIR = Path(__file__).resolve().parents[1] / "prompts"
CT_CLIP_TEMPLATES: tuple[tuple[str, str], ...] = (("{finding} is present.", "{finding} is not present."),)


class PromptSetError(Fm3dError, ValueError):
    """A prompt set that cannot be read or does not cover the findings asked for."""


def format_prompt(template: str, phrase: str) -> str:
    """`template` with `phrase` filled in and its first letter capitalised."""
    text = template.format(finding=phrase)
    return text[:1].upper() + text[1:]


@dataclass
class PromptSet:
    """Findings (label column -> phrase) and the (positive, negative) templates applied to them."""

    name: str
    findings: dict[str, str] = field(default_factory=dict)
    templates: list[tuple[str, str]] = field(default_factory=lambda: list(CT_CLIP_TEMPLATES))

    def phrase(self, column: str) -> str:
        """The phrase for a label column: the set's own, else the column with "_" read as spaces."""
        return self.findings.get(column, column.replace("_", " ").lower())

    def prompts(self, columns: Sequence[str]) -> list[list[tuple[str, str]]]:
        """[finding][template] -> (positive sentence, negative sentence)."""
        return [
            [
                (format_prompt(pos, self.phrase(c)), format_prompt(neg, self.phrase(c)))
                for pos, neg in self.templates
            ]
            for c in columns
        ]


def list_prompt_sets() -> list[str]:
    """Names of the prompt sets shipped in `downstream/prompts/`."""
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


def load_prompt_set(
    name_or_path: str | Path | None, templates: Sequence[Sequence[str]] | None = None
) -> PromptSet:
    """A shipped prompt set by name ("ct_rate", "demo"), a YAML file, or None (CT-CLIP's template only).

    `templates`, when given, replaces the set's own templates.
    """
    if name_or_path is None:
        prompt_set = PromptSet(name="default")
    else:
        path = Path(name_or_path)
        if not path.suffix:
            path = PROMPT_DIR / f"{name_or_path}.yaml"
        if not path.is_file():
            raise PromptSetError(
                f"prompt set {name_or_path!r} not found ({path}); use one of {list_prompt_sets()} "
                "or a YAML path"
            )
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise PromptSetError(f"{path} is not valid YAML ({exc})") from exc
        findings = raw.get("findings") or {}
        if isinstance(findings, list):
            findings = {str(name): str(name) for name in findings}
        prompt_set = PromptSet(
            name=str(raw.get("name", path.stem)),
            findings={str(k): str(v) for k, v in findings.items()},
            templates=[tuple(t) for t in raw.get("templates") or CT_CLIP_TEMPLATES],
        )
    if templates is not None:
        prompt_set.templates = [tuple(t) for t in templates]
    for template in prompt_set.templates:
        if len(template) != 2 or not all("{finding}" in t for t in template):
            raise PromptSetError(
                f"prompt set {prompt_set.name!r}: template {list(template)} must be a "
                "[positive, negative] pair, "
                "each containing {finding}"
            )
    return prompt_set


@torch.no_grad()
def encode_prompts(
    clip: ClipModel, prompts: list[list[tuple[str, str]]], batch_size: int = 64
) -> torch.Tensor:
    """Normalised joint-space embeddings [K, M, 2, P] of `prompts` ([finding][template] pairs)."""
    sentences = [s for per_finding in prompts for pair in per_finding for s in pair]
    embeddings = torch.cat(
        [clip.encode_text(sentences[i : i + batch_size]) for i in range(0, len(sentences), batch_size)]
    )
    k, m = len(prompts), len(prompts[0])
    return embeddings.reshape(k, m, 2, -1)


def pair_probabilities(
    embeddings: torch.Tensor, prompts: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """P(present) [B, K] of normalised embeddings [B, P] against prompt embeddings [K, M, 2, P].

    Softmax over each (present, not present) pair of scaled cosine similarities, then the mean
    over the M templates.
    """
    logits = scale * torch.einsum("bp,kmsp->bkms", embeddings.float(), prompts.float())
    return logits.softmax(dim=-1)[..., 0].mean(dim=-1)


@torch.no_grad()
def read_findings(
    clip: ClipModel, texts: Sequence[str], prompts: torch.Tensor, batch_size: int = 16
) -> torch.Tensor:
    """P(present) [N, K] of each finding in each report text, by the prompt pairs of CLIP's text side."""
    if not texts:
        return torch.zeros(0, prompts.shape[0])
    out = [
        pair_probabilities(clip.encode_text(list(texts[i : i + batch_size])), prompts, clip.scale())
        for i in range(0, len(texts), batch_size)
    ]
    return torch.cat(out).cpu()
