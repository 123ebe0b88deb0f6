"""Report-generation metrics: BLEU-1..4, ROUGE-L, METEOR (when available) and clinical-finding F1.

- BLEU-n (sacrebleu's corpus BLEU with `max_ngram_order=n`, one reference per report, its
  defaults otherwise: 13a tokenisation, case-sensitive, "exp" smoothing of n-gram orders without
  any match): the brevity penalty times the geometric mean of the modified 1..n-gram precisions
  pooled over the corpus (Papineni et al.). Reported on a 0-1 scale.
- ROUGE-L (rouge-score, stemming on): the mean over reports of the LCS F-measure.
- METEOR (nltk `meteor_score`): only where nltk and its WordNet data are installed
  (`python -m nltk.downloader wordnet`); otherwise it is absent from the results and
  `meteor_unavailable()` says why. It is never downloaded at run time.
- Clinical-finding F1: findings read from generated and reference reports ([N, K] booleans,
  from any reader, e.g. `downstream.language.prompts.read_findings`), scored with the reference's
  findings as truth: F1 per finding, micro (pooled counts) and macro (mean over findings that
  occur in the references or the predictions).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bleu_scores(hypotheses: Sequence[str], references: Sequence[str], max_order: int = 4) -> dict[str, float]:
    """Corpus BLEU-1..max_order in [0, 1] of generated reports against one reference each."""
    from sacrebleu.metrics import BLEU

    _check_pairs(hypotheses, references)
    return {
        f"bleu{n}": BLEU(max_ngram_order=n).corpus_score(list(hypotheses), [list(references)]).score / 100.0
        for n in range(1, max_order + 1)
    }


def rouge_l(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (rouge-score, Porter stemming) over report pairs."""
    from rouge_score import rouge_scorer

    _check_pairs(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [
        scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references, strict=True)
    ]
    return float(np.mean(scores)) if scores else float("nan")


def meteor_unavailable() -> str | None:
    """Why METEOR cannot be computed here (None when it can)."""
    try:
        import nltk
        from nltk.corpus import wordnet
    except ImportError:
        return (
            "METEOR skipped: nltk is not installed (pip install nltk, then python -m nltk.downloader wordnet)"
        )
    try:
        wordnet.ensure_loaded()
    except LookupError:
        return (
            f"METEOR skipped: nltk {nltk.__version__} has no WordNet data installed "
            "(python -m nltk.downloader wordnet)"
        )
    return None


def meteor(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Mean METEOR (nltk) over report pairs; raises RuntimeError where it is unavailable."""
    reason = meteor_unavailable()
    if reason:
        raise RuntimeError(reason)
    from nltk.translate.meteor_score import meteor_score

    _check_pairs(hypotheses, references)
    scores = [meteor_score([r.split()], h.split()) for h, r in zip(hypotheses, references, strict=True)]
    return float(np.mean(scores)) if scores else float("nan")


def finding_f1(predicted: np.ndarray, reference: np.ndarray) -> dict[str, np.ndarray | float]:
    """F1 of findings read from generated reports against those read from the references.

    predicted, reference: [N, K] boolean. Returns `per_finding` [K] (NaN where a finding is in
    neither), `micro` and `macro`, plus `precision_micro` and `recall_micro`.
    """
    predicted, reference = np.asarray(predicted, dtype=bool), np.asarray(reference, dtype=bool)
    if predicted.shape != reference.shape:
        raise ValueError(
            f"predicted {predicted.shape} and reference {reference.shape} findings differ in shape"
        )
    tp = (predicted & reference).sum(0).astype(np.float64)
    fp = (predicted & ~reference).sum(0).astype(np.float64)
    fn = (~predicted & reference).sum(0).astype(np.float64)
    denominator = 2 * tp + fp + fn
    with np.errstate(invalid="ignore", divide="ignore"):
        per_finding = np.where(denominator > 0, 2 * tp / denominator, np.nan)
    total_tp, total_fp, total_fn = tp.sum(), fp.sum(), fn.sum()
    finite = per_finding[np.isfinite(per_finding)]
    return {
        "per_finding": per_finding,
        "micro": float(2 * total_tp / (2 * total_tp + total_fp + total_fn))
        if total_tp + total_fp + total_fn
        else float("nan"),
        "macro": float(finite.mean()) if finite.size else float("nan"),
        "precision_micro": float(total_tp / (total_tp + total_fp)) if total_tp + total_fp else float("nan"),
        "recall_micro": float(total_tp / (total_tp + total_fn)) if total_tp + total_fn else float("nan"),
    }


def text_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU-1..4, ROUGE-L and (where available) METEOR of generated reports against references."""
    metrics = {**bleu_scores(hypotheses, references), "rouge_l": rouge_l(hypotheses, references)}
    if meteor_unavailable() is None:
        metrics["meteor"] = meteor(hypotheses, references)
    return metrics


def _check_pairs(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} generated reports but {len(references)} references")
