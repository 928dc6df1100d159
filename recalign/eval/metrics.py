"""Top-K accuracy metrics over ranked lists, exactly as docs/metrics.md §2.1 (parity options §4).

Every function takes `lists: LongTensor [U, W]` (ranked item ids, -1 = empty slot) and the relevant items as
one of: targets LongTensor [U] (single target), padded LongTensor [U, R] (-1 = none), a list of sets, or a
boolean hit matrix [U, W] (then give `n_relevant`, default 1 per user). A list is cut to its first K entries;
a list shorter than K counts its missing slots as misses; a repeated item counts once (L_u is de-duplicated).
Functions return the mean over users (a 0-dim tensor), or per-user values with `reduce="none"`.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

from recalign.errors import ConfigError
from recalign.eval.ranking import first_occurrence

# List-set metrics live in beyond.py; re-exported so every metric is reachable from this module.
from recalign.eval.beyond import avg_popularity, coverage, div_ratio, mgu_dgu, or_ratio  # noqa: E402,F401

Relevant = torch.Tensor | Sequence[Iterable[int]]
PARITY_OPTIONS = (None, "daisy")


def _check_parity(parity: str | None, metric: str) -> None:
    if parity not in PARITY_OPTIONS:
        raise ConfigError(f"{metric}: unknown parity option {parity!r}; expected one of {PARITY_OPTIONS}")


def padded_sets(relevant: Sequence[Iterable[int]]) -> torch.Tensor:
    """Item sets as a sorted, de-duplicated LongTensor [U, R], -1 padded."""
    sets = [sorted(set(int(i) for i in r)) for r in relevant]
    width = max((len(s) for s in sets), default=0)
    out = torch.full((len(sets), max(width, 1)), -1, dtype=torch.long)
    for row, items in enumerate(sets):  # one row per user: building the padded tensor, not a metric loop
        out[row, :len(items)] = torch.tensor(items, dtype=torch.long)
    return out


def hits_and_counts(lists: torch.Tensor, relevant: Relevant, k: int | None = None,
                    n_relevant: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(hits BoolTensor [U, K], |Rel_u| LongTensor [U]) for the first K slots, K = k (padded with misses)."""
    lists = torch.as_tensor(lists, dtype=torch.long)
    n_users, width = lists.shape
    k = width if k is None else int(k)
    if isinstance(relevant, torch.Tensor) and relevant.dtype == torch.bool:
        hits = relevant[:, :k]
        counts = torch.ones(n_users, dtype=torch.long) if n_relevant is None else torch.as_tensor(n_relevant)
    else:
        rel = relevant if isinstance(relevant, torch.Tensor) else padded_sets(relevant)
        rel = rel.long().reshape(n_users, -1)
        top = lists[:, :k]
        if rel.shape[1] == 1:
            hits = top == rel
        else:
            # Membership by sorted search: each user's relevant ids sorted, padded with a sentinel.
            sentinel = torch.iinfo(torch.long).max
            rel_sorted = torch.sort(torch.where(rel >= 0, rel, sentinel), dim=1).values
            pos = torch.searchsorted(rel_sorted, top.contiguous()).clamp_(max=rel_sorted.shape[1] - 1)
            hits = torch.gather(rel_sorted, 1, pos) == top
        hits = hits & first_occurrence(top)
        if n_relevant is not None:
            counts = torch.as_tensor(n_relevant)
        else:
            rel_sorted = torch.sort(rel, dim=1).values
            distinct = torch.ones_like(rel_sorted, dtype=torch.bool)
            distinct[:, 1:] = rel_sorted[:, 1:] != rel_sorted[:, :-1]
            counts = (distinct & (rel_sorted >= 0)).sum(dim=1)
    if hits.shape[1] < k:  # list shorter than K: missing slots are misses
        hits = torch.cat([hits, torch.zeros((n_users, k - hits.shape[1]), dtype=torch.bool)], dim=1)
    return hits, counts.long()


def _reduce(values: torch.Tensor, reduce: str) -> torch.Tensor:
    if reduce == "none":
        return values
    if reduce == "mean":
        return values.double().mean() if values.numel() else torch.tensor(float("nan"), dtype=torch.float64)
    raise ConfigError(f"reduce must be 'mean' or 'none', got {reduce!r}")


def _discounts(k: int) -> torch.Tensor:
    """1 / log2(p + 1) for 1-based positions p = 1..k."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64))


def hit_ratio(lists: torch.Tensor, relevant: Relevant, k: int, n_relevant: torch.Tensor | None = None,
              reduce: str = "mean") -> torch.Tensor:
    """HR@K: 1 if at least one relevant item is in the top K."""
    hits, _ = hits_and_counts(lists, relevant, k, n_relevant)
    return _reduce(hits.any(dim=1).double(), reduce)


def recall(lists: torch.Tensor, relevant: Relevant, k: int, n_relevant: torch.Tensor | None = None,
           reduce: str = "mean") -> torch.Tensor:
    """Recall@K: hits in the top K / |Rel_u| (0 for a user with no relevant item)."""
    hits, counts = hits_and_counts(lists, relevant, k, n_relevant)
    return _reduce(hits.sum(dim=1).double() / counts.clamp(min=1).double(), reduce)


def precision(lists: torch.Tensor, relevant: Relevant, k: int, n_relevant: torch.Tensor | None = None,
              reduce: str = "mean") -> torch.Tensor:
    """Precision@K: hits in the top K / K (K, not the list length)."""
    hits, _ = hits_and_counts(lists, relevant, k, n_relevant)
    return _reduce(hits.sum(dim=1).double() / k, reduce)


def ndcg(lists: torch.Tensor, relevant: Relevant, k: int, n_relevant: torch.Tensor | None = None,
         parity: str | None = None, reduce: str = "mean") -> torch.Tensor:
    """NDCG@K = DCG/IDCG with IDCG over min(|Rel_u|, K) positions; parity="daisy" uses min(h_u(K), K)."""
    _check_parity(parity, "ndcg")
    hits, counts = hits_and_counts(lists, relevant, k, n_relevant)
    disc = _discounts(k)
    dcg = (hits.double() * disc).sum(dim=1)
    ideal_len = hits.sum(dim=1) if parity == "daisy" else counts.clamp(max=k)
    cumulative = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(disc, 0)])
    idcg = cumulative[ideal_len]
    return _reduce(torch.where(idcg > 0, dcg / idcg.clamp(min=1e-12), torch.zeros_like(dcg)), reduce)


def mrr(lists: torch.Tensor, relevant: Relevant, k: int, n_relevant: torch.Tensor | None = None,
        parity: str | None = None, reduce: str = "mean") -> torch.Tensor:
    """MRR@K: 1/rank of the first relevant item in the top K; parity="daisy" sums 1/p over all hits."""
    _check_parity(parity, "mrr")
    hits, _ = hits_and_counts(lists, relevant, k, n_relevant)
    reciprocal = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    if parity == "daisy":
        return _reduce((hits.double() * reciprocal).sum(dim=1), reduce)
    first = hits & (torch.cumsum(hits, dim=1) == 1)
    return _reduce((first.double() * reciprocal).sum(dim=1), reduce)


def map_at_k(lists: torch.Tensor, relevant: Relevant, k: int, n_relevant: torch.Tensor | None = None,
             parity: str | None = None, reduce: str = "mean") -> torch.Tensor:
    """MAP@K: sum over hit positions p of Precision@p, / min(|Rel_u|, K); parity="daisy" divides by K."""
    _check_parity(parity, "map")
    hits, counts = hits_and_counts(lists, relevant, k, n_relevant)
    precision_at = torch.cumsum(hits, dim=1).double() / torch.arange(1, k + 1, dtype=torch.float64)
    summed = (precision_at * hits.double()).sum(dim=1)
    denominator = torch.full_like(summed, float(k)) if parity == "daisy" else counts.clamp(max=k).double()
    return _reduce(torch.where(denominator > 0, summed / denominator.clamp(min=1), torch.zeros_like(summed)),
                   reduce)


RANKING_METRICS = ("hr", "recall", "precision", "ndcg", "mrr", "map")


def ranking_metrics(lists: torch.Tensor, relevant: Relevant, ks: Sequence[int],
                    n_relevant: torch.Tensor | None = None, parity: str | None = None,
                    metrics: Sequence[str] = RANKING_METRICS) -> dict[str, float]:
    """{"hr@K", "recall@K", "precision@K", "ndcg@K", "mrr@K", "map@K"} for every K in ks (means over users)."""
    _check_parity(parity, "ranking_metrics")
    unknown = set(metrics) - set(RANKING_METRICS)
    if unknown:
        raise ConfigError(f"unknown metrics {sorted(unknown)}; expected some of {RANKING_METRICS}")
    # Match relevance once at the largest K; every smaller K is a column slice of the same hit matrix.
    hits, counts = hits_and_counts(lists, relevant, max(ks))
    functions = {"hr": hit_ratio, "recall": recall, "precision": precision, "ndcg": ndcg, "mrr": mrr,
                 "map": map_at_k}
    out: dict[str, float] = {}
    for k in ks:
        for name in metrics:
            extra = {"parity": parity} if name in ("ndcg", "mrr", "map") else {}
            out[f"{name}@{k}"] = float(functions[name](lists, hits, k, n_relevant=counts, **extra))
    return out
