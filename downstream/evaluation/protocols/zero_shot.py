"""Zero-shot finding classification with the encoder's CLIP text side, on the suite's test studies.

The downstream zero-shot task's arithmetic (`downstream.tasks.zero_shot`) on the cached pooled
features: each test study's joint-space embedding (CLIP's image projection of its features) is
compared with the prompt pairs of every finding ("{finding} is present." / "... is not
present.", from the task's prompt sets); CT-CLIP's softmax over a pair gives P(present),
averaged over the set's templates (`downstream.language.prompts`). Nothing is fitted, so only the
test split is used. The probabilities are scored as the probes score theirs
(`downstream.evaluation.multilabel`): per finding AUROC, balanced accuracy and F1 at P = 0.5
(a pair's own decision point), and their macro means.
"""

from __future__ import annotations

import polars as pl
import torch

from downstream.evaluation.encoders import EncoderEntry
from downstream.evaluation.multilabel import MultiLabelScores, MultiLabelTable
from downstream.evaluation.protocol import (
    EvalContext,
    Protocol,
    ProtocolError,
    ProtocolResult,
    register_protocol,
)
from downstream.evaluation.protocols.retrieval import NO_TEXT_SIDE, clip_image_embeddings
from downstream.language.prompts import PromptSetError, encode_prompts, load_prompt_set, pair_probabilities

SETTING = "protocols.zero_shot"


@register_protocol("zero_shot")
class ZeroShot(Protocol):
    """Zero-shot multi-label classification by prompt pairs (see the module docstring).

    Args:
        labels: the label table (study_id + one boolean column per finding).
        label_columns: the findings to read; null takes every boolean column.
        prompts: a shipped prompt set ("ct_rate", "demo") or a prompt-set YAML path; null, as the
            task's default, reads each column name as its phrase ("lung_nodule" -> "lung nodule").
    """

    headline = "auroc_macro"

    def __init__(
        self, labels: str, label_columns: list[str] | None = None, prompts: str | None = None
    ) -> None:
        self.table = MultiLabelTable(labels, label_columns, SETTING)
        try:
            self.prompt_set = load_prompt_set(prompts)
        except PromptSetError as exc:
            raise ProtocolError(f"{SETTING}.prompts: {exc}") from exc

    def unavailable(self, encoder: EncoderEntry) -> str | None:
        return NO_TEXT_SIDE if encoder.clip is None else None

    @torch.no_grad()
    def run(self, context: EvalContext) -> ProtocolResult:
        test = context.studies.ids("test")
        clip, image = clip_image_embeddings(context, test)  # [N, P]
        prompts = self.prompt_set.prompts(self.table.names)  # [K][M] (positive, negative)
        probabilities = pair_probabilities(image, encode_prompts(clip, prompts).cpu(), clip.scale().cpu())
        scores = MultiLabelScores(probabilities.double().numpy(), self.table.matrix(test))  # [N, K]
        per_label = scores.table().with_columns(pl.Series("prompt", [pairs[0][0] for pairs in prompts]))
        return ProtocolResult(test, scores, tables={"per_label": per_label})
