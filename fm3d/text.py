"""Text towers for CT-report models: any Hugging Face encoder by local path or hub name.

`TextTower` wraps `transformers.AutoModel` + `AutoTokenizer` and returns one embedding per
text (the first token's state, "cls", or the attention-masked mean, "mean"). Nothing is
downloaded at run time unless the name is not a local folder and the hub is reachable; offline
clusters pass a folder written by `save_pretrained`. `init_text_model` writes such a folder
from scratch (a WordPiece vocabulary learned on your reports and a randomly initialised small
BERT) for when no pretrained clinical text model is at hand, e.g. the demo and the tests.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fm3d.errors import Fm3dError

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean")
_WHITESPACE = re.compile(r"\s+")


class TextTowerError(Fm3dError, RuntimeError):
    """A text model or tokenizer that cannot be loaded, or a setting it cannot use."""


def clean_report(text: str | None, lowercase: bool = False) -> str:
    """A report as the text tower should see it: whitespace runs collapsed to one space, trimmed.

    Missing reports (None, NaN) become "". Choosing findings and/or impression is the data
    module's `report_columns`; this only normalises the chosen text. Lowercasing is for
    uncased tokenizers trained on lowercased text (it changes nothing the tokenizer does not
    already do when the tokenizer lowercases itself).
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    cleaned = _WHITESPACE.sub(" ", str(text)).strip()
    return cleaned.lower() if lowercase else cleaned


def _refuse_shipped_code(folder: Path) -> None:
    """Refuse a local model folder whose config names its own Python classes (`auto_map`).

    Transformers would refuse too, but with a message about hub repositories; this names the
    file and the one argument that allows it, which a file can never set for itself.
    """
    for name in ("config.json", "tokenizer_config.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            content = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise TextTowerError(f"{file} is not valid JSON ({error}); save the text model again") from error
        if isinstance(content, dict) and content.get("auto_map"):
            raise TextTowerError(
                f"{file} names its own Python code (auto_map {content['auto_map']}), which loading would "
                "run. fm3d runs a model's code only when the caller passes trust_remote_code=True; do so "
                "only for a source you trust"
            )


class TextTower(nn.Module):
    """A Hugging Face text encoder and its tokenizer, pooled to one vector per text.

    Args:
        model_name_or_path: a folder written by `save_pretrained` (model + tokenizer), or a hub
            name (only when the hub is reachable or the model is in the local HF cache).
        pooling: "cls" (first token, BERT-style) or "mean" (mean over non-padding tokens).
        max_length: texts are truncated to this many tokens (capped at the model's
            `max_position_embeddings` when it has one).
        lowercase: lowercase texts in `clean_report` before tokenising.
        trust_remote_code: run the model's own code from its folder (models that ship a
            custom class, e.g. CXR-BERT, which CT-CLIP uses). Only for sources you trust.

    A pooler layer (BERT's tanh dense over [CLS]) is frozen: fm3d pools itself, and a
    trainable layer without gradients would make DDP wait for them forever. It stays in the
    model so saving and reloading round-trip every weight.
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        pooling: str = "cls",
        max_length: int = 256,
        lowercase: bool = False,
        trust_remote_code: bool = False,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise TextTowerError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        source = str(model_name_or_path)
        if not trust_remote_code:
            _refuse_shipped_code(Path(source))
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            self.model = AutoModel.from_pretrained(source, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise TextTowerError(
                f"cannot load the text model {source!r}: {error}. Pass a local folder holding a "
                "Hugging Face model and its tokenizer (save_pretrained), or a hub name on a machine "
                "that can reach the hub; fm3d.text.init_text_model writes a small from-scratch one."
            ) from error
        # from_pretrained hands back the model in eval mode; a new module starts in train mode
        # (dropout on) like every other fm3d module, and Lightning keeps the modes it finds at fit.
        self.model.train()
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler.requires_grad_(False)
        self.source = source
        self.pooling = pooling
        self.lowercase = lowercase
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if isinstance(limit, int) else max_length
        if self.max_length < max_length:
            logger.info("text max_length %d capped at the model's %d positions", max_length, self.max_length)

    @property
    def hidden_size(self) -> int:
        """Width of the pooled text embedding."""
        return int(self.model.config.hidden_size)

    def tokenize(self, texts: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """Cleaned, padded and truncated token ids for `texts`, on the tower's device."""
        cleaned = [clean_report(t, self.lowercase) for t in texts]
        tokens = self.tokenizer(
            cleaned, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        return {key: value.to(device) for key, value in tokens.items()}

    def forward_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> torch.Tensor:
        """Pooled embeddings [B, hidden_size] from token ids [B, L] and their mask [B, L]."""
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        if self.pooling == "cls":
            return states[:, 0]
        weights = attention_mask.unsqueeze(-1).to(states.dtype)  # [B, L, 1]
        return (states * weights).sum(1) / weights.sum(1).clamp_min(1)

    def forward(self, texts: Sequence[str | None]) -> torch.Tensor:
        """Pooled embeddings [B, hidden_size] of raw texts (cleaned, tokenised here)."""
        return self.forward_tokens(**self.tokenize(texts))

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model and tokenizer to `directory` so `TextTower(directory)` reloads them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        return directory


def init_text_model(
    directory: str | Path,
    texts: Iterable[str],
    vocab_size: int = 4000,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int | None = None,
    max_length: int = 512,
    lowercase: bool = True,
    seed: int = 0,
) -> Path:
    """Write a from-scratch BERT text model whose WordPiece vocabulary is learned on `texts`.

    For pretraining CLIP without any pretrained text model available offline (the demo, air-
    gapped clusters, tests). The model weights are random; CLIP pretraining trains them.
    Returns `directory`, loadable with `TextTower(directory)`. Pool it with "mean": at random
    initialisation the [CLS] state is the same for every text (to float precision), so "cls"
    pooling starts CLIP with identical text embeddings.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    cleaned = [clean_report(t) for t in texts]
    if not any(cleaned):
        raise TextTowerError("init_text_model needs at least one non-empty text to learn a vocabulary from")
    # No progress bar: away from a terminal it prints only blank lines, into the caller's stdout.
    tokenizer.train_from_iterator(
        cleaned,
        trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False),
    )
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=max_length,
    )
    config = BertConfig(
        vocab_size=tokenizer.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size or 4 * hidden_size,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.token_to_id("[PAD]"),
    )
    return save_random_model(BertModel, config, fast, directory, seed)


def save_random_model(
    model_class: type, config: Any, tokenizer: Any, directory: str | Path, seed: int
) -> Path:
    """Build `model_class(config)` with weights drawn from `seed` and save it beside its tokenizer.

    The seed is drawn in a forked RNG, so writing a model leaves the caller's random stream as it was.
    """
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = model_class(config)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    logger.info(
        "wrote a from-scratch %s (vocabulary %d) to %s", config.model_type, config.vocab_size, directory
    )
    return directory
