"""fm3d.metrics.report_text: BLEU / ROUGE-L against hand-computed cases and against sacrebleu and
rouge-score called directly on real CT-RATE reports; METEOR's availability; finding F1 vs sklearn."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
from rouge_score import rouge_scorer
from sacrebleu.metrics import BLEU
from sklearn.metrics import f1_score

from fm3d.metrics.report_text import (
    bleu_scores,
    finding_f1,
    meteor,
    meteor_unavailable,
    rouge_l,
    text_metrics,
)

CT_RATE = "reports/ct_rate/validation_reports_subset.csv"


def test_bleu_and_rouge_l_by_hand() -> None:
    hyp, ref = ["the cat sat on the mat"], ["the cat is on the mat"]
    scores = bleu_scores(hyp, ref)
    # unigrams: the x2, cat, on, mat match 5 of 6; bigrams: "the cat", "on the", "the mat" 3 of 5;
    # equal lengths: brevity penalty 1.
    assert scores["bleu1"] == pytest.approx(5 / 6)
    assert scores["bleu2"] == pytest.approx(math.sqrt(5 / 6 * 3 / 5))
    # LCS "the cat on the mat" = 5 tokens of 6 each way: F = 5/6
    assert rouge_l(hyp, ref) == pytest.approx(5 / 6)
    # a short hypothesis is penalised: BP = exp(1 - 6/3)
    assert bleu_scores(["the cat sat"], ref)["bleu1"] == pytest.approx(2 / 3 * math.exp(1 - 6 / 3))
    with pytest.raises(ValueError, match="2 generated reports but 1"):
        bleu_scores(hyp * 2, ref)


def test_metrics_match_sacrebleu_and_rouge_score_on_ct_rate_reports(shared_data) -> None:
    table = pl.read_csv(shared_data / CT_RATE).drop_nulls().head(300)
    # impressions as "generated" reports scored against findings: realistic, partial overlap
    hyps, refs = table["Impressions_EN"].to_list(), table["Findings_EN"].to_list()
    scores = text_metrics(hyps, refs)
    for n in range(1, 5):
        direct = BLEU(max_ngram_order=n).corpus_score(hyps, [refs]).score / 100
        assert scores[f"bleu{n}"] == pytest.approx(direct, rel=1e-12)
    assert 0 < scores["bleu4"] < scores["bleu1"] < 1
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    direct = np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs, strict=True)])
    assert scores["rouge_l"] == pytest.approx(direct, rel=1e-12)
    # identical reports score 1
    same = text_metrics(refs[:20], refs[:20])
    assert same["bleu4"] == pytest.approx(1.0) and same["rouge_l"] == pytest.approx(1.0)


def test_meteor_only_where_wordnet_is_installed() -> None:
    reason = meteor_unavailable()
    metrics = text_metrics(["no pleural effusion"], ["no pleural effusion is seen"])
    if reason is None:
        from nltk.translate.meteor_score import meteor_score

        expected = meteor_score([["no", "pleural", "effusion", "is", "seen"]], ["no", "pleural", "effusion"])
        assert metrics["meteor"] == pytest.approx(expected)
    else:
        assert "METEOR skipped" in reason and "wordnet" in reason.lower()
        assert "meteor" not in metrics
        with pytest.raises(RuntimeError, match="METEOR skipped"):
            meteor(["a"], ["a"])


def test_finding_f1_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    reference = rng.random((40, 5)) < 0.3
    predicted = reference ^ (rng.random((40, 5)) < 0.2)
    predicted[:, 4] = reference[:, 4] = False  # a finding nobody has or predicts: left out of macro
    scores = finding_f1(predicted, reference)
    assert scores["micro"] == pytest.approx(f1_score(reference, predicted, average="micro"))
    per = f1_score(reference, predicted, average=None, zero_division=np.nan)
    assert np.allclose(scores["per_finding"][:4], per[:4]) and np.isnan(scores["per_finding"][4])
    assert scores["macro"] == pytest.approx(per[:4].mean())
    with pytest.raises(ValueError, match="differ in shape"):
        finding_f1(predicted[:, :3], reference)
