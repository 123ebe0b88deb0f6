"""The language model side of report generation: load any Hugging Face causal LM, add LoRA, or
write a small from-scratch one offline.

`load_causal_lm(path_or_name)` is `AutoModelForCausalLM` + `AutoTokenizer` (GPT-2, LLaMA, Phi,
... by local folder, or by hub name where the hub or the HF cache has it); a tokenizer without a
padding token pads with its end-of-sequence token. `add_lora` wraps the LM with peft LoRA
adapters (on the projections peft knows for the architecture unless `targets` are given) and
freezes everything else. `init_causal_lm` writes a randomly initialised GPT-2 or LLaMA with a
byte-level BPE vocabulary learned on your reports: for tests, the demo, and air-gapped smoke runs.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from fm3d.errors import Fm3dError
from fm3d.text import save_random_model

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}


class LanguageModelError(Fm3dError, RuntimeError):
    """A causal LM or tokenizer that cannot be loaded or adapted."""


def load_causal_lm(name_or_path: str | Path, dtype: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a Hugging Face causal LM; `dtype` e.g. "bfloat16" (None: as saved)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = str(name_or_path)
    # Never run code shipped with a model folder, and never ask about it on a terminal.
    kwargs: dict[str, Any] = {"trust_remote_code": False}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        if dtype:
            kwargs["dtype"] = getattr(torch, dtype)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise LanguageModelError(
            f"cannot load the causal LM {source!r}: {exc}. Pass a folder holding a Hugging Face causal LM "
            "and its tokenizer (save_pretrained), or a hub name on a machine that can reach the hub; "
            "`fm3d causal-lm` writes a small from-scratch one."
        ) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token is None:
        raise LanguageModelError(
            f"the tokenizer of {source} has no end-of-sequence token to end reports with"
        )
    return model, tokenizer


def add_lora(
    model: nn.Module,
    rank: int = 8,
    alpha: float = 16.0,
    dropout: float = 0.05,
    targets: Sequence[str] | None = None,
) -> nn.Module:
    """`model` wrapped with LoRA adapters (peft); only the adapters train."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets) if targets else None,
        task_type="CAUSAL_LM",
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as exc:
        raise LanguageModelError(
            f"LoRA cannot be added to {type(model).__name__}: {exc}; set model.lora_targets to the LM's "
            "projection module names (e.g. [q_proj, v_proj])"
        ) from exc
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info("LoRA rank %d on the language model: %d trainable parameters", rank, trainable)
    return wrapped


def init_causal_lm(
    directory: str | Path,
    texts: Iterable[str],
    family: Literal["gpt2", "llama"] = "gpt2",
    vocab_size: int = 1000,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    max_length: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random GPT-2 or LLaMA causal LM with a byte-level BPE vocabulary learned on `texts`.

    Returns `directory`, loadable with `load_causal_lm(directory)`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise LanguageModelError(
            "init_causal_lm needs at least one non-empty text to learn a vocabulary from"
        )
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,  # away from a terminal it prints only blank lines, into the caller's stdout
    )
    tokenizer.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, model_max_length=max_length, **SPECIAL_TOKENS)
    ids = {name: tokenizer.token_to_id(token) for name, token in SPECIAL_TOKENS.items()}
    common = {
        "bos_token_id": ids["bos_token"],
        "eos_token_id": ids["eos_token"],
        "pad_token_id": ids["pad_token"],
    }
    if family == "gpt2":
        config = GPT2Config(
            vocab_size=tokenizer.get_vocab_size(),
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_length,
            **common,
        )
        model_class = GPT2LMHeadModel
    elif family == "llama":
        config = LlamaConfig(
            vocab_size=tokenizer.get_vocab_size(),
            hidden_size=hidden_size,
            intermediate_size=4 * hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_length,
            **common,
        )
        model_class = LlamaForCausalLM
    else:
        raise LanguageModelError(f"init_causal_lm family must be 'gpt2' or 'llama', got {family!r}")
    return save_random_model(model_class, config, fast, directory, seed)
