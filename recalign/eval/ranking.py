"""Ranking primitives shared by teachers and the evaluator."""

from __future__ import annotations

import torch


def topk_items(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of each row, scores descending, ties broken by ascending column id (metrics.md §1).

    Returns (indices LongTensor [B, k], values [B, k]); k is clipped to the number of columns.
    """
    k = min(k, scores.shape[1])
    values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
    return indices[:, :k], values[:, :k]
