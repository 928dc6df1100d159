"""List-set (beyond-accuracy) metrics, docs/metrics.md §2.3: coverage, DivRatio, ORRatio, AvgPop, MGU/DGU.

`lists: LongTensor [U, W]` are ranked item ids (-1 = empty slot); each function looks at the first K entries
L_u^K, counting an item at most once per list. Empty slots recommend nothing but still count in |U|·K.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from recalign.eval.ranking import first_occurrence


def _top_items(lists: torch.Tensor, k: int) -> torch.Tensor:
    """The distinct items of every L_u^K, flattened (empty slots and repeats dropped)."""
    top = torch.as_tensor(lists, dtype=torch.long)[:, :k]
    return top[first_occurrence(top)]


def item_counts(lists: torch.Tensor, k: int, n_items: int) -> torch.Tensor:
    """c_i = number of top-K lists that contain item i: LongTensor [n_items]."""
    return torch.bincount(_top_items(lists, k), minlength=n_items)


def coverage(lists: torch.Tensor, k: int, n_items: int) -> float:
    """Coverage@K = |∪_u L_u^K| / |I|."""
    return float(torch.unique(_top_items(lists, k)).numel() / max(1, n_items))


def div_ratio(lists: torch.Tensor, k: int) -> float:
    """DivRatio@K = |∪_u L_u^K| / (|U|·K)."""
    n_users = lists.shape[0]
    return float(torch.unique(_top_items(lists, k)).numel() / max(1, n_users * k))


def or_ratio(lists: torch.Tensor, k: int, n_items: int | None = None, top: int = 3) -> float:
    """ORRatio@K = (sum of the 3 largest c_i) / (|U|·K): slots taken by the 3 most-recommended items."""
    items = _top_items(lists, k)
    size = n_items if n_items is not None else (int(items.max()) + 1 if items.numel() else 1)
    counts = torch.bincount(items, minlength=size)
    largest = torch.topk(counts, min(top, counts.numel())).values
    return float(largest.sum() / max(1, lists.shape[0] * k))


def popularity(train: "np.ndarray | torch.Tensor | Sequence[int]", n_items: int) -> torch.Tensor:
    """pop(i) = number of training interactions of item i, from the training item ids: LongTensor [n_items]."""
    return torch.bincount(torch.as_tensor(np.array(train, dtype=np.int64)), minlength=n_items)


def avg_popularity(lists: torch.Tensor, k: int, pop: torch.Tensor) -> float:
    """AvgPop@K = (1/|U|) Σ_u (1/K) Σ_{i ∈ L_u^K} pop(i)."""
    top = torch.as_tensor(lists, dtype=torch.long)[:, :k]
    keep = first_occurrence(top)
    values = torch.where(keep, pop.double()[top.clamp(min=0)], torch.zeros(top.shape, dtype=torch.float64))
    return float((values.sum(dim=1) / k).mean()) if top.shape[0] else float("nan")


def genre_weights(item_genres: Sequence[Sequence[str]], genres: Sequence[str]) -> torch.Tensor:
    """[n_items, |G|]: item i adds 1/|g(i)| to each tracked genre in g(i) = its genres ∩ G (nothing if empty)."""
    index = {g: j for j, g in enumerate(genres)}
    weights = torch.zeros((len(item_genres), len(genres)), dtype=torch.float64)
    rows, cols = [], []
    for item, names in enumerate(item_genres):  # once per catalog item, to build a sparse table
        tracked = sorted({index[g] for g in names if g in index})
        rows.extend([item] * len(tracked))
        cols.extend(tracked)
    if rows:
        r = torch.tensor(rows, dtype=torch.long)
        c = torch.tensor(cols, dtype=torch.long)
        per_item = torch.bincount(r, minlength=len(item_genres)).double()
        weights[r, c] = 1.0 / per_item[r]
    return weights


def catalog_genre_table(item_genres: Sequence[Sequence[str]]) -> torch.Tensor | None:
    """`genre_weights` over every genre in the catalog (G sorted), or None when no item has one."""
    genres = sorted({g for names in item_genres for g in names})
    return genre_weights(item_genres, genres) if genres else None


def _distribution(items: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    mass = weights[items].sum(dim=0) if items.numel() else torch.zeros(weights.shape[1], dtype=torch.float64)
    total = mass.sum()
    return mass / total if total > 0 else mass


def mgu_dgu(lists: torch.Tensor, k: int, history_items: "torch.Tensor | np.ndarray",
            item_genres: "Sequence[Sequence[str]] | torch.Tensor", genres: Sequence[str]) -> tuple[float, float]:
    """(MGU@K, DGU@K): with d_g = GP_g - GH_g, MGU = mean_g |d_g| and DGU = max_g d_g - min_g d_g.

    history_items: all history item ids of the evaluated users, concatenated (GH sums over every one,
    repeats included); GP sums over the items of every L_u^K. item_genres[i] lists item i's genres, or
    item_genres is the `genre_weights(item_genres, genres)` table already built (for repeated calls).
    """
    weights = item_genres if isinstance(item_genres, torch.Tensor) else genre_weights(item_genres, genres)
    gh = _distribution(torch.as_tensor(np.array(history_items, dtype=np.int64)).reshape(-1), weights)
    gp = _distribution(_top_items(lists, k), weights)
    d = gp - gh
    if d.numel() == 0:
        return 0.0, 0.0
    return float(d.abs().mean()), float(d.max() - d.min())
