"""fm3d.text: report cleaning, the Hugging Face text tower (tiny offline BERT), init_text_model."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from fm3d import text_models
from fm3d.text import TextTower, TextTowerError, clean_report, init_text_model, pool_states, text_settings
from fm3d.text_models import PACKAGED_MODELS, PackagedModelError, resolve_text_model

WORDS = ["the", "liver", "is", "normal", "no", "nodule", "lung", "mass", "in", "right", "left", "lobe", "."]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    """A tiny BERT + WordPiece tokenizer written with save_pretrained, loaded back by path."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s"]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(WORDS) + 6,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def test_clean_report_collapses_whitespace_and_handles_missing():
    assert clean_report("  Liver:\n\tnormal.   No  mass.\r\n") == "Liver: normal. No mass."
    assert clean_report("Liver NORMAL", lowercase=True) == "liver normal"
    assert clean_report(None) == ""
    assert clean_report(math.nan) == ""


def test_tower_cls_pooling_equals_first_hidden_state(tiny_bert):
    tower = TextTower(tiny_bert, pooling="cls", max_length=16).eval()
    texts = ["The liver is normal.", "no nodule in the right lobe"]
    tokens = tower.tokenize(texts)
    assert tokens["input_ids"][0, 0].item() == tower.tokenizer.cls_token_id
    with torch.no_grad():
        pooled = tower(texts)
        reference = tower.model(**tokens).last_hidden_state[:, 0]
    assert pooled.shape == (2, 16)
    torch.testing.assert_close(pooled, reference)


def test_tower_mean_pooling_ignores_padding(tiny_bert):
    tower = TextTower(tiny_bert, pooling="mean", max_length=16).eval()
    with torch.no_grad():
        together = tower(["lung mass", "the liver is normal in the left lobe"])
        alone = tower(["lung mass"])
    # Padding the short text to the long one's length must not change its mean embedding.
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


def test_tower_truncates_and_caps_max_length(tiny_bert):
    tower = TextTower(tiny_bert, max_length=1000)
    assert tower.max_length == 32  # the model's position embeddings
    tokens = tower.tokenize(["the liver " * 50])
    assert tokens["input_ids"].shape[1] == 32


def test_tower_starts_in_train_mode_with_dropout(tiny_bert):
    # Hugging Face's from_pretrained returns an eval-mode model; the tower must train like any module.
    tower = TextTower(tiny_bert)
    assert tower.training and all(module.training for module in tower.modules())
    torch.manual_seed(0)
    assert not torch.equal(tower(["the liver is normal"]), tower(["the liver is normal"]))  # dropout
    tower.eval()
    assert not any(module.training for module in tower.modules())
    torch.testing.assert_close(tower(["the liver is normal"]), tower(["the liver is normal"]))


def test_every_parameter_gets_a_gradient(tiny_bert):
    tower = TextTower(tiny_bert)
    # BERT's pooler is unused by fm3d's pooling: frozen, so DDP does not wait for its gradient.
    assert not any(p.requires_grad for p in tower.model.pooler.parameters())
    tower(["the liver is normal", "lung mass"]).sum().backward()
    assert all(p.grad is not None for p in tower.parameters() if p.requires_grad)


def test_save_pretrained_round_trip(tiny_bert, tmp_path):
    tower = TextTower(tiny_bert).eval()
    again = TextTower(tower.save_pretrained(tmp_path / "copy")).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            tower(["lung mass in the left lobe"]), again(["lung mass in the left lobe"])
        )


def test_missing_model_names_the_path(tmp_path):
    with pytest.raises(TextTowerError, match=r"the text model folder .*nothing-here does not exist"):
        TextTower(tmp_path / "nothing-here")
    with pytest.raises(TextTowerError, match="pooling"):
        TextTower(tmp_path, pooling="max")


def test_init_text_model_learns_a_vocabulary(tmp_path):
    reports = ["Hepatic steatosis. No focal lesion.", "Pulmonary nodule in the right upper lobe."] * 10
    folder = init_text_model(tmp_path / "scratch", reports, vocab_size=200, hidden_size=32, num_heads=2)
    tower = TextTower(folder, max_length=64)
    assert tower.hidden_size == 32
    tokens = tower.tokenize(["Pulmonary nodule"])
    ids = tokens["input_ids"][0].tolist()
    assert ids[0] == tower.tokenizer.cls_token_id and ids[-1] == tower.tokenizer.sep_token_id
    assert tower.tokenizer.unk_token_id not in ids  # words seen in training are in the vocabulary
    assert tower(["pulmonary nodule", "hepatic steatosis"]).shape == (2, 32)
    with pytest.raises(TextTowerError, match="non-empty"):
        init_text_model(tmp_path / "empty", ["", "  "])


def test_folder_shipping_its_own_code_is_refused_unless_trusted(tiny_bert, tmp_path):
    folder = tmp_path / "bert"
    shutil.copytree(tiny_bert, folder)
    marker = tmp_path / "marker.txt"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        TextTowerError, match=r"bert/config\.json names its own Python code.*trust_remote_code=True"
    ):
        TextTower(folder)
    assert not marker.exists()


# --- pooling, prefixes, long reports, LoRA and the packaged pretrained model (issue 20) ---

MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def test_packaged_minilm_equals_sentence_transformers():
    """The demo's pretrained tower, loaded offline by its hub name, embeds as sentence-transformers does.

    sentence-transformers (an independent implementation: its own Transformer, Pooling and
    Normalize modules) reads the same folder; fm3d takes mean pooling and normalisation from
    that folder's own files.
    """
    from sentence_transformers import SentenceTransformer

    tower = TextTower(MINILM)
    assert tower.settings.pooling == "mean" and tower.settings.normalize and tower.settings.prefix == ""
    assert tower.settings.model == MINILM and tower.hidden_size == 384
    texts = ["No acute findings. The liver is normal.", "Right pleural effusion. Cardiomegaly.", ""]
    reference = SentenceTransformer(resolve_text_model(MINILM), device="cpu").encode(texts)
    torch.testing.assert_close(tower.embed(texts), torch.from_numpy(reference), atol=1e-5, rtol=0)


def test_packaged_model_with_other_weights_is_refused(tmp_path, monkeypatch):
    real = PACKAGED_MODELS[MINILM]
    forged = dataclasses.replace(real, weights_sha256="0" * 64)
    monkeypatch.setitem(PACKAGED_MODELS, MINILM, forged)
    monkeypatch.setattr(text_models, "_VERIFIED", set())
    with pytest.raises(PackagedModelError, match="not the published"):
        resolve_text_model(MINILM)


def test_unknown_hub_name_offline_says_how_to_get_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TextTowerError, match="not on this machine"):
        text_settings("no-such-org/no-such-model")


def test_last_token_pooling_takes_the_last_real_token(tiny_bert):
    states = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    torch.testing.assert_close(pool_states(states, right, "last"), states[[0, 1], [1, 3]])
    torch.testing.assert_close(pool_states(states, left, "last"), states[[0, 1], [3, 3]])
    tower = TextTower(tiny_bert, pooling="last", max_length=16).eval()
    with torch.no_grad():
        together = tower(["lung mass", "the liver is normal in the left lobe"])
        alone = tower(["lung mass"])
    torch.testing.assert_close(together[0], alone[0], atol=1e-5, rtol=1e-5)


def test_settings_come_from_the_models_own_sentence_transformers_files(tiny_bert, tmp_path):
    folder = tmp_path / "st"
    shutil.copytree(tiny_bert, folder)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))  # fmt: skip
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_lasttoken": True}))
    prompts = {"prompts": {"query": "query: ", "document": "passage: "}, "default_prompt_name": None}
    (folder / "config_sentence_transformers.json").write_text(json.dumps(prompts))
    settings = text_settings(folder, max_length=1000)
    assert (settings.pooling, settings.prefix, settings.normalize, settings.max_length) == (
        "last",
        "passage: ",
        False,
        32,
    )
    assert text_settings(folder, pooling="mean", prefix="").pooling == "mean"
    assert text_settings(folder, prefix="").prefix == ""
    assert text_settings(tiny_bert).pooling == "cls"  # no sentence-transformers files
    assert text_settings(folder).model_hash != text_settings(tiny_bert).model_hash
    tower = TextTower(folder, max_length=16).eval()
    expected = tower.tokenizer(["passage: lung mass"], return_tensors="pt")["input_ids"]
    torch.testing.assert_close(tower.tokenize(["lung mass"])["input_ids"], expected)
    assert expected.shape[1] == tower.tokenizer(["lung mass"], return_tensors="pt")["input_ids"].shape[1] + 2


def test_chunked_long_report_is_the_token_weighted_mean_of_its_sentence_chunks(tiny_bert):
    """Hand computation: chunks of whole sentences within max_length, each mean-pooled, averaged by tokens."""
    tower = TextTower(tiny_bert, pooling="mean", max_length=8, long_reports="chunks").eval()
    report = "The liver is normal. No nodule in the right lobe. Lung mass in the left lobe."
    # 6 + 7 + 7 tokens (with the full stops): a chunk holds 8 - 2 special tokens, so each
    # sentence is its own chunk except the 7-token ones, cut into a window of 6 and the rest.
    chunks = tower.chunk_texts(report)
    assert chunks == [
        "The liver is normal.",
        "No nodule in the right lobe",
        ".",
        "Lung mass in the left lobe",
        ".",
    ]
    expected_total, expected_tokens = torch.zeros(16), 0
    with torch.no_grad():
        for chunk in chunks:
            ids = tower.tokenizer(chunk, return_tensors="pt")
            states = tower.model(**ids).last_hidden_state[0]  # [L, 16]
            expected_total += states.sum(0)  # mean over its L tokens, weighted by L
            expected_tokens += states.shape[0]
        embedded = tower([report])[0]
    torch.testing.assert_close(embedded, expected_total / expected_tokens, atol=1e-5, rtol=1e-5)
    truncated = TextTower(tiny_bert, pooling="mean", max_length=8).eval()
    with torch.no_grad():
        assert not torch.allclose(truncated([report])[0], embedded, atol=1e-3)
        # A report that fits one window is embedded the same either way.
        torch.testing.assert_close(tower(["lung mass."]), truncated(["lung mass."]), atol=1e-6, rtol=0)


def test_chunks_pack_short_sentences_together(tiny_bert):
    tower = TextTower(tiny_bert, max_length=16, long_reports="chunks")
    assert tower.chunk_texts("Lung mass. Liver normal. No nodule.") == ["Lung mass. Liver normal. No nodule."]
    assert tower.chunk_texts("") == [""]


def test_lora_trains_only_adapters_and_saves_merged_weights_that_equal_the_unmerged_forward(
    tiny_bert, tmp_path
):
    tower = TextTower(tiny_bert, pooling="mean", max_length=16)
    trainable = tower.add_lora(rank=2, alpha=4.0, dropout=0.0)
    names = [name for name, p in tower.named_parameters() if p.requires_grad]
    assert (
        names
        and all("lora_" in name for name in names)
        and trainable == sum(p.numel() for p in tower.parameters() if p.requires_grad)
    )
    assert not any("pooler" in name for name in names)  # unused by fm3d's pooling: no adapter
    tower(["the liver is normal", "lung mass"]).sum().backward()
    assert all(p.grad is not None for p in tower.parameters() if p.requires_grad)
    with torch.no_grad():  # trained adapters: B is zero at initialisation, so give it values
        for name, param in tower.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    tower.eval()
    texts = ["the liver is normal", "no nodule in the left lobe"]
    with torch.no_grad():
        unmerged = tower(texts)
        merged = TextTower(tower.save_pretrained(tmp_path / "merged"), pooling="mean", max_length=16).eval()
        torch.testing.assert_close(merged(texts), unmerged, atol=1e-5, rtol=1e-5)
        base = TextTower(tiny_bert, pooling="mean", max_length=16).eval()
        assert not torch.allclose(base(texts), unmerged, atol=1e-3)  # the adapters do change it
    assert any("lora_" in name for name, _ in tower.named_parameters())  # saving left the tower as it was
    assert not any("lora_" in key for key in merged.state_dict())
