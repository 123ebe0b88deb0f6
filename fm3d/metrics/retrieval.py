"""Cross-modal retrieval metrics: recall@K in both directions and mean average precision.

Inputs are a similarity matrix `scores` [Q, G] (query rows, gallery columns) and, optionally,
a boolean `relevance` [Q, G] saying which gallery items are correct for each query; without
it, query i's only correct item is gallery item i (paired CT and report). Queries without
any relevant item are left out of the averages.

Ties are handled so that constant (degenerate) scores score exactly chance, never better:
- recall@K is the expected value under a uniformly random order of tied items: with g
  irrelevant items scoring strictly above the best relevant score s*, and n irrelevant plus
  p relevant items tied at s*, the chance that a relevant item lands in the top K is
  `1 - C(n, m) / C(n + p, m)` with m = K - g slots left for the tie group (1 when m >= n + 1,
  0 when m <= 0); with a single relevant item this is m / (n + 1).
- average precision follows scikit-learn's `label_ranking_average_precision_score`: a
  relevant item's rank counts every item scoring at least as high (ties share the worst
  rank), so the precision at each relevant item is (relevant items scoring >= it) / (items
  scoring >= it); constant scores give AP = p / G, the prevalence.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def cosine_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[Qa, C] x [Qb, C] -> [Qa, Qb] cosine similarities (float32)."""
    return F.normalize(a.float(), dim=-1) @ F.normalize(b.float(), dim=-1).T


def _relevance(scores: torch.Tensor, relevance: torch.Tensor | None) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [queries, gallery] matrix, got shape {tuple(scores.shape)}")
    if relevance is None:
        if scores.shape[0] != scores.shape[1]:
            raise ValueError(
                "without a relevance matrix, scores must be square (query i matches item i); "
                f"got {tuple(scores.shape)}"
            )
        return torch.eye(scores.shape[0], dtype=torch.bool, device=scores.device)
    relevance = torch.as_tensor(relevance, device=scores.device).to(torch.bool)
    if relevance.shape != scores.shape:
        raise ValueError(
            f"relevance {tuple(relevance.shape)} and scores {tuple(scores.shape)} differ in shape"
        )
    return relevance


def _log_choose(n: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def recall_at_k(
    scores: torch.Tensor, relevance: torch.Tensor | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[int, float]:
    """Share of queries with a relevant item among their top K, ties broken at random (expected)."""
    scores = scores.detach().double()
    relevance = _relevance(scores, relevance)
    has_relevant = relevance.any(1)
    scores, relevance = scores[has_relevant], relevance[has_relevant]
    if scores.shape[0] == 0:
        return {int(k): float("nan") for k in ks}
    best = torch.where(relevance, scores, torch.full_like(scores, -torch.inf)).amax(1, keepdim=True)  # s*
    above = ((scores > best) & ~relevance).sum(1).double()  # g
    tied_irrelevant = ((scores == best) & ~relevance).sum(1).double()  # n
    tied_relevant = ((scores == best) & relevance).sum(1).double()  # p
    out = {}
    for k in ks:
        slots = (k - above).clamp_min(0)  # m
        all_irrelevant = slots <= tied_irrelevant
        # C(n, m) / C(n + p, m): probability the m free slots hold only irrelevant tied items.
        safe_slots = torch.where(all_irrelevant, slots, torch.zeros_like(slots))
        miss = torch.exp(
            _log_choose(tied_irrelevant, safe_slots)
            - _log_choose(tied_irrelevant + tied_relevant, safe_slots)
        )
        hit = torch.where(all_irrelevant, 1 - miss, torch.ones_like(miss))
        out[int(k)] = float(hit.mean())
    return out


def mean_average_precision(scores: torch.Tensor, relevance: torch.Tensor | None = None) -> float:
    """Mean over queries of average precision (scikit-learn's LRAP tie convention)."""
    scores = scores.detach().double()
    relevance = _relevance(scores, relevance)
    has_relevant = relevance.any(1)
    scores, relevance = scores[has_relevant], relevance[has_relevant]
    if scores.shape[0] == 0:
        return float("nan")
    total = []
    for row, rel in zip(
        scores, relevance, strict=True
    ):  # one [G, G] comparison per query keeps memory O(G^2)
        at_least = row[None, :] >= row[rel][:, None]  # [p, G]: items scoring >= each relevant item
        precision = (at_least & rel[None, :]).sum(1).double() / at_least.sum(1).double()
        total.append(precision.mean())
    return float(torch.stack(total).mean())


def retrieval_metrics(
    scores: torch.Tensor,
    relevance: torch.Tensor | None = None,
    ks: Sequence[int] = (1, 5, 10),
    prefixes: tuple[str, str] = ("i2t", "t2i"),
) -> dict[str, float]:
    """Recall@K and mAP in both directions from a [A, B] similarity matrix.

    Rows of `scores` retrieve columns for the first prefix (e.g. image -> text), columns
    retrieve rows (the transpose) for the second. Keys: f"{prefix}_recall_at_{k}", f"{prefix}_mAP"
    (names MLflow and file systems take as they are).
    K larger than the gallery is reported as is (recall 1).
    """
    rel = _relevance(scores, relevance)
    out: dict[str, float] = {}
    for prefix, s, r in ((prefixes[0], scores, rel), (prefixes[1], scores.T, rel.T)):
        out.update({f"{prefix}_recall_at_{k}": v for k, v in recall_at_k(s, r, ks).items()})
        out[f"{prefix}_mAP"] = mean_average_precision(s, r)
    return out
