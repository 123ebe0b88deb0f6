"""fm3d.text: report cleaning, the Hugging Face text tower (tiny offline BERT), init_text_model."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from fm3d.text import TextTower, TextTowerError, clean_report, init_text_model

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
    with pytest.raises(TextTowerError, match="cannot load the text model"):
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
