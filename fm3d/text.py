"""Text towers for CT-report models: any Hugging Face encoder by local path or hub name.

`TextTower` wraps `transformers.AutoModel` + `AutoTokenizer` and returns one embedding per
report: pooled from the last hidden states ("cls": the first token; "mean": the attention-
masked mean; "last": the last real token, for decoder-only embedding models; "auto": what the
model's own sentence-transformers files say, else "cls"), after the model's own instruction
prefix where it has one, L2-normalised where the model's own pipeline normalises. Long reports
are either cut at `max_length` ("truncate") or split into sentence chunks that each fit the
window, embedded and averaged weighted by their token counts ("chunks"), so findings past the
model's window still count.

The tower trains in one of three modes, chosen by the CLIP objective: `full` (every weight),
`lora` (`add_lora`: peft adapters on the projections, the model's weights frozen; saved
merged), `frozen` (no gradients: embeddings computed once by `fm3d text-cache build`, whose
cache the data loader reads, so training never loads the model). `text_settings` names
everything that changes an embedding, read from the model's files without loading its weights,
so a cache made with other settings is refused.

Nothing is downloaded at run time: a hub name resolves to a registry package that ships the
model (`fm3d.text_models`), a local folder written by `save_pretrained`, or the hub's local
cache. `init_text_model` writes a from-scratch model (a WordPiece vocabulary learned on your
reports and a randomly initialised small BERT) for tests and air-gapped clusters.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fm3d.data.atomic import content_hash, files_of
from fm3d.errors import Fm3dError
from fm3d.text_models import install_hint, resolve_text_model

logger = logging.getLogger(__name__)

POOLINGS = ("cls", "mean", "last")
LONG_REPORTS = ("truncate", "chunks")
_WHITESPACE = re.compile(r"\s+")
# A sentence ends at . ! or ? followed by whitespace (clean_report has made newlines spaces).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# sentence-transformers' pooling flags, in the order its Pooling module reads them.
_ST_POOLING = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}
# Prompt names a sentence-transformers model may give the texts to be retrieved (reports).
_DOCUMENT_PROMPTS = ("document", "passage", "doc")


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


def split_sentences(text: str) -> list[str]:
    """The sentences of a cleaned report (split after . ! ?), empty pieces dropped."""
    return [piece for piece in _SENTENCE_END.split(text) if piece]


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


def _read_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text()) if file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TextTowerError(f"{file} is not valid JSON ({error}); save the text model again") from error


@dataclass(frozen=True)
class SentenceTransformerFiles:
    """What a sentence-transformers folder says of its own pipeline (None: it does not say)."""

    pooling: str | None
    normalize: bool
    document_prefix: str

    @classmethod
    def read(cls, folder: Path) -> SentenceTransformerFiles:
        modules = _read_json(folder / "modules.json") or []
        kinds = {
            str(m.get("type", "")).rsplit(".", 1)[-1]: m.get("path", "")
            for m in modules
            if isinstance(m, dict)
        }
        pooling = None
        if "Pooling" in kinds:
            flags = _read_json(folder / kinds["Pooling"] / "config.json") or {}
            pooling = next((name for flag, name in _ST_POOLING.items() if flags.get(flag)), None)
        config = _read_json(folder / "config_sentence_transformers.json") or {}
        prompts = config.get("prompts") or {}
        named = next((prompts[key] for key in _DOCUMENT_PROMPTS if key in prompts), None)
        default = prompts.get(config.get("default_prompt_name") or "", "")
        return cls(pooling=pooling, normalize="Normalize" in kinds, document_prefix=named or default or "")


@dataclass(frozen=True)
class TextSettings:
    """Everything that changes the embedding of a given report text (a cache's identity).

    `model_hash` is the content hash of the model folder's files (weights, tokenizer, configs),
    so a retrained or re-tokenised model is another model even under the same name.
    """

    model: str
    model_hash: str
    pooling: str
    max_length: int
    lowercase: bool
    prefix: str
    normalize: bool
    long_reports: str

    def to_dict(self) -> dict[str, str | int | bool]:
        return asdict(self)


def text_model_folder(source: str | Path) -> Path:
    """The local folder holding a text model's files: itself, a registry package's, or the hub cache's.

    Never downloads: a name found nowhere is a `TextTowerError` saying how to get it.
    """
    source = str(source)
    resolved = Path(resolve_text_model(source))
    if resolved.is_dir():
        return resolved
    if resolved.is_absolute() or source.startswith(".") or source.count("/") > 1:  # a path, not org/name
        raise TextTowerError(
            f"the text model folder {source} does not exist; pass a folder written by save_pretrained "
            "(fm3d text-model writes a small from-scratch one) or a hub name"
        )
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception as error:  # the hub client raises several types for "not cached"
        raise TextTowerError(
            f"the text model {source!r} is not on this machine (not a folder, not in the Hugging Face "
            f"cache; fm3d never downloads while it runs).{install_hint(source)} Or fetch it once where "
            f"the hub is reachable (`hf download {source}`), or pass a folder written by save_pretrained."
        ) from error


def _check_choices(pooling: str, long_reports: str) -> None:
    if pooling not in ("auto", *POOLINGS):
        raise TextTowerError(f"pooling must be 'auto' or one of {POOLINGS}, got {pooling!r}")
    if long_reports not in LONG_REPORTS:
        raise TextTowerError(f"long_reports must be one of {LONG_REPORTS}, got {long_reports!r}")


def text_settings(
    model_name_or_path: str | Path,
    pooling: str = "auto",
    max_length: int = 256,
    lowercase: bool = False,
    prefix: str | None = None,
    long_reports: str = "truncate",
    normalize: bool | None = None,
) -> TextSettings:
    """The settings `TextTower(...)` with these arguments embeds with, read without loading weights.

    "auto" pooling, a `prefix` of None and a `normalize` of None take the model's own
    sentence-transformers settings (pooling "cls", no prefix and no normalisation when it has
    none); `max_length` is capped at the model's position embeddings.
    """
    _check_choices(pooling, long_reports)
    source = str(model_name_or_path)
    folder = text_model_folder(source)
    own = SentenceTransformerFiles.read(folder)
    limit = (_read_json(folder / "config.json") or {}).get("max_position_embeddings")
    return TextSettings(
        model=source,
        model_hash=content_hash(files_of(folder)),
        pooling=(own.pooling or "cls") if pooling == "auto" else pooling,
        max_length=min(max_length, limit) if isinstance(limit, int) else max_length,
        lowercase=lowercase,
        prefix=own.document_prefix if prefix is None else prefix,
        normalize=own.normalize if normalize is None else normalize,
        long_reports=long_reports,
    )


def text_hidden_size(model_name_or_path: str | Path) -> int:
    """Width of a text model's embeddings, from its config (no weights loaded)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(text_model_folder(model_name_or_path)))
    return int(config.hidden_size)


def pool_states(states: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row [B, H] from hidden states [B, L, H] and their attention mask [B, L].

    "last" takes the last position the mask keeps, so left- and right-padded batches agree.
    """
    if pooling == "cls":
        return states[:, 0]
    if pooling == "last":
        last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # [B]
        return states[torch.arange(states.shape[0], device=states.device), last]
    weights = mask.unsqueeze(-1).to(states.dtype)  # [B, L, 1]
    return (states * weights).sum(1) / weights.sum(1).clamp_min(1)


class TextTower(nn.Module):
    """A Hugging Face text encoder and its tokenizer, pooled to one vector per report.

    Args:
        model_name_or_path: a folder written by `save_pretrained` (model + tokenizer), or a hub
            name (a registry package's offline copy, or the local Hugging Face cache).
        pooling: "auto" (the model's own; else "cls"), "cls", "mean" or "last".
        max_length: tokens per input (capped at the model's `max_position_embeddings`).
        lowercase: lowercase texts in `clean_report` before tokenising.
        trust_remote_code: run the model's own code from its folder (models that ship a
            custom class, e.g. CXR-BERT, which CT-CLIP uses). Only for sources you trust.
        prefix: text put before every report (e.g. "passage: "); None takes the model's own
            document prompt, "" none.
        long_reports: "truncate" cuts at `max_length`; "chunks" embeds sentence chunks that
            each fit and averages them weighted by their token counts.
        normalize: L2-normalise the embeddings; None as the model's own pipeline does.

    A pooler layer (BERT's tanh dense over [CLS]) is frozen: fm3d pools itself, and a
    trainable layer without gradients would make DDP wait for them forever. It stays in the
    model so saving and reloading round-trip every weight.
    """

    def __init__(
        self,
        model_name_or_path: str | Path,
        pooling: str = "auto",
        max_length: int = 256,
        lowercase: bool = False,
        trust_remote_code: bool = False,
        prefix: str | None = None,
        long_reports: str = "truncate",
        normalize: bool | None = None,
    ) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        _check_choices(pooling, long_reports)
        source = str(model_name_or_path)
        local = text_model_folder(source)
        if not trust_remote_code:
            _refuse_shipped_code(local)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(local, trust_remote_code=trust_remote_code)
            self.model = AutoModel.from_pretrained(local, trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as error:
            raise TextTowerError(
                f"cannot load the text model {source!r} from {local}: {error}. Pass a folder holding a "
                "Hugging Face model and its tokenizer (save_pretrained); fm3d.text.init_text_model writes "
                "a small from-scratch one."
            ) from error
        # from_pretrained hands back the model in eval mode; a new module starts in train mode
        # (dropout on) like every other fm3d module, and Lightning keeps the modes it finds at fit.
        self.model.train()
        if getattr(self.model, "pooler", None) is not None:
            self.model.pooler.requires_grad_(False)
        self.source = source
        # The name as given, not the folder it resolved to: caches stay valid across machines.
        self.settings = replace(
            text_settings(local, pooling, max_length, lowercase, prefix, long_reports, normalize),
            model=source,
        )
        if self.settings.max_length < max_length:
            logger.info(
                "text max_length %d capped at the model's %d positions", max_length, self.settings.max_length
            )
        self.has_lora = False

    @property
    def hidden_size(self) -> int:
        """Width of the pooled text embedding."""
        return int(self.model.config.hidden_size)

    @property
    def max_length(self) -> int:
        return self.settings.max_length

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: Sequence[str | None]) -> dict[str, torch.Tensor]:
        """Cleaned, prefixed, padded and truncated token ids for `texts`, on the tower's device."""
        prefix = self.settings.prefix
        cleaned = [prefix + clean_report(t, self.settings.lowercase) for t in texts]
        tokens = self.tokenizer(
            cleaned, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {key: value.to(self._device()) for key, value in tokens.items()}

    def chunk_texts(self, text: str | None) -> list[str]:
        """The pieces "chunks" embeds for `text`, each fitting `max_length` with prefix and specials.

        Whole sentences are packed greedily into chunks; a sentence longer than a chunk is cut
        at token boundaries into windows. An empty report is one empty chunk.
        """
        prefix = self.tokenizer(self.settings.prefix, add_special_tokens=False)["input_ids"]
        budget = self.max_length - self.tokenizer.num_special_tokens_to_add() - len(prefix)
        if budget < 1:
            raise TextTowerError(f"max_length {self.max_length} leaves no room for text after the prefix")
        chunks: list[str] = []
        current: list[str] = []
        used = 0
        for sentence in split_sentences(clean_report(text, self.settings.lowercase)):
            spans = self.tokenizer(sentence, add_special_tokens=False, return_offsets_mapping=True)
            offsets = spans["offset_mapping"]
            if current and used + len(offsets) > budget:
                chunks.append(" ".join(current))
                current, used = [], 0
            while len(offsets) > budget:  # one sentence longer than a chunk: a window of it
                chunks.append(sentence[offsets[0][0] : offsets[budget - 1][1]])
                offsets = offsets[budget:]
            if offsets:
                current.append(sentence[offsets[0][0] :])
                used += len(offsets)
        if current or not chunks:
            chunks.append(" ".join(current))
        return chunks

    def _chunk_batch(self, texts: Sequence[str | None]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Padded inputs of every text's chunks, and the index of the text each chunk belongs to [C]."""
        chunks = [(index, chunk) for index, text in enumerate(texts) for chunk in self.chunk_texts(text)]
        owners = torch.tensor([index for index, _ in chunks], device=self._device())
        # Chunks are cleaned already (lowercased too when asked): only the prefix goes in front.
        tokens = self.tokenizer(
            [self.settings.prefix + chunk for _, chunk in chunks],
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        )
        return {key: value.to(self._device()) for key, value in tokens.items()}, owners

    def forward_tokens(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> torch.Tensor:
        """Pooled embeddings [B, hidden_size] from token ids [B, L] and their mask [B, L] (not normalised)."""
        states = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return pool_states(states, attention_mask, self.settings.pooling)

    def forward(self, texts: Sequence[str | None]) -> torch.Tensor:
        """Embeddings [B, hidden_size] of raw report texts (cleaned and tokenised here)."""
        if self.settings.long_reports == "truncate":
            pooled = self.forward_tokens(**self.tokenize(texts))
        else:
            inputs, owners = self._chunk_batch(texts)
            per_chunk = self.forward_tokens(**inputs)  # [C, H]
            weights = inputs["attention_mask"].sum(1, keepdim=True).to(per_chunk.dtype)  # [C, 1]
            total = per_chunk.new_zeros(len(texts), per_chunk.shape[1]).index_add(
                0, owners, per_chunk * weights
            )
            count = weights.new_zeros(len(texts), 1).index_add(0, owners, weights)
            pooled = total / count
        return F.normalize(pooled, dim=-1) if self.settings.normalize else pooled

    @torch.no_grad()
    def embed(self, texts: Sequence[str | None], batch_size: int = 32) -> torch.Tensor:
        """Embeddings [N, hidden_size] (float32, CPU) in eval mode, `batch_size` texts at a time.

        Texts go through in order of length so a batch pads little; rows come back in input order.
        """
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i] or ""))
        rows = torch.zeros(len(texts), self.hidden_size)
        try:
            for start in range(0, len(order), batch_size):
                chosen = order[start : start + batch_size]
                rows[chosen] = self([texts[i] for i in chosen]).float().cpu()
        finally:
            self.train(was_training)
        return rows

    def add_lora(
        self, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] | None = None
    ) -> int:
        """Freeze the model and train peft LoRA adapters on its projections; returns their parameter count.

        `targets` are Linear module names (last name part, e.g. query value); None adapts every
        Linear but the pooler's: the attention and MLP projections of each layer.
        """
        from peft import LoraConfig, inject_adapter_in_model

        names = [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, nn.Linear)
            and not name.startswith("pooler")
            and (targets is None or name.rsplit(".", 1)[-1] in targets)
        ]
        if not names:
            raise TextTowerError(
                f"LoRA found no Linear named {list(targets or [])} in {type(self.model).__name__}; "
                "set the text tower's lora_targets to its projection names (e.g. query value)"
            )
        self.model.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names)
        self.model = inject_adapter_in_model(config, self.model)
        for name, param in self.model.named_parameters():
            param.requires_grad_("lora_" in name)
        self.has_lora = True
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        logger.info(
            "LoRA rank %d on %d text projections: %d trainable parameters", rank, len(names), trainable
        )
        return trainable

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write model and tokenizer to `directory` so `TextTower(directory)` reloads them.

        LoRA adapters are merged into a copy first, so the folder is a plain model of the base
        architecture that any Hugging Face loader reads.
        """
        from fm3d.models.lora import merge_lora

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model = merge_lora(copy.deepcopy(self.model)) if self.has_lora else self.model
        model.save_pretrained(directory)
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
