"""Ranking primitives shared by teachers and the evaluator: tie-exact top-k, full ranking, sampled ranking."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, Sequence

import numpy as np
import torch

from recalign.data.dataset import UserSequences
from recalign.data.sampling import first_in_row

ScoreFn = Callable[[np.ndarray], torch.Tensor]


def first_occurrence(lists: torch.Tensor) -> torch.Tensor:
    """True where an item appears for the first time in its row (and is not an empty slot)."""
    return first_in_row(lists) & (lists >= 0)


def _order_ties_by_id(indices: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Re-order [B, k] (indices, values) so values descend and equal values have ascending ids."""
    by_id, pos = torch.sort(indices, dim=1)
    vals = torch.gather(values, 1, pos)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    return torch.gather(by_id, 1, order), vals


def topk_items(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k columns of each row, scores descending, ties broken by ascending column id (docs/metrics.md §1).

    Returns (indices LongTensor [B, k], values [B, k]); k is clipped to the number of columns.
    torch.topk alone does not fix the order of equal scores, so: take top-(k+1); rows whose k-th and
    (k+1)-th values are equal have a tie across the boundary and get the smallest ids among the tied
    scores; then every row's k entries are re-ordered by (value desc, id asc). NaN scores are not supported.
    """
    n_cols = scores.shape[1]
    k = min(k, n_cols)
    if k == 0 or scores.shape[0] == 0:
        return (torch.empty((scores.shape[0], k), dtype=torch.long),
                torch.empty((scores.shape[0], k), dtype=scores.dtype))
    if k == n_cols:
        values, indices = torch.sort(scores, dim=1, descending=True, stable=True)
        return indices, values
    values, indices = torch.topk(scores, k + 1, dim=1, largest=True, sorted=True)
    boundary = values[:, k - 1] == values[:, k]
    values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    rows = torch.nonzero(boundary).flatten()
    if len(rows):
        sub = scores[rows]
        kth = values[rows, k - 1].unsqueeze(1)
        above = sub > kth
        tied = sub == kth
        room = k - above.sum(dim=1, keepdim=True)
        keep = above | (tied & (torch.cumsum(tied, dim=1) <= room))
        picked = torch.nonzero(keep)[:, 1].view(len(rows), k)
        indices[rows] = picked
        values[rows] = torch.gather(sub, 1, picked)
    return _order_ties_by_id(indices, values)


def _progress(enabled: bool):
    """A transient rich progress bar (or a no-op context when disabled)."""
    if not enabled:
        return nullcontext(None)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                    transient=True)


def _empty_slots(items: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """-1 where the score is -inf (masked items fill a row only when too few items are left)."""
    return items.masked_fill_(values == -torch.inf, -1)


def full_ranking(
    score_fn: ScoreFn,
    users: Sequence[int] | np.ndarray | torch.Tensor,
    history: UserSequences,
    k: int,
    exclude_history: bool = True,
    chunk: int = 1024,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over the whole catalog for each user: (items [U, k], scores [U, k]); -1 marks empty slots.

    score_fn(users_chunk) -> FloatTensor [len(chunk), n_items] (e.g. `lambda u: model.score(u, history)`).
    """
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    out_items, out_scores = [], []
    buffer = None
    with _progress(progress) as bar:
        task = bar.add_task("full ranking", total=len(users)) if bar is not None else None
        for start in range(0, len(users), chunk):
            batch = users[start:start + chunk]
            raw = score_fn(batch).detach()
            n_items = raw.shape[1]
            if buffer is None:  # padded to whole blocks for `_blocked_topk`; pad columns stay -inf
                buffer = torch.full((min(chunk, len(users)), -(-n_items // _BLOCK) * _BLOCK), -torch.inf)
            # A copy, never the model's tensor: models may hand back views of their own state.
            scores = buffer[:len(batch)]
            scores[:, :n_items].copy_(raw)
            if exclude_history:
                rows, cols = history.mask_coordinates(batch)
                scores.view(-1).index_fill_(0, rows * scores.shape[1] + cols, -torch.inf)
            items, values = _blocked_topk(scores, n_items, k)
            out_items.append(_empty_slots(items, values))
            out_scores.append(values)
            if bar is not None:
                bar.advance(task, len(batch))
    if not out_items:
        return torch.empty((0, k), dtype=torch.long), torch.empty((0, k))
    return torch.cat(out_items), torch.cat(out_scores)


# Column block width for the blocked top-k: block maxima prune the row to k blocks before the exact top-k.
_BLOCK = 32


def _blocked_topk(scores: torch.Tensor, n_valid: int, k: int, block: int = _BLOCK
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """`topk_items` on a [B, n_pad] buffer whose columns >= n_valid are -inf and n_pad % block == 0.

    The top k items lie in the k blocks with the largest maxima, so only k * block candidates are searched.
    Rows where that is not provably exact (a tie with an item outside the candidates, or across the k-th
    position) are recomputed with `topk_items` on the full row.
    """
    n_rows, n_pad = scores.shape
    n_blocks = n_pad // block
    if n_blocks < 2 * (k + 1):  # too few blocks for pruning to pay off
        return topk_items(scores[:, :n_valid], k)
    blocks = scores.view(n_rows, n_blocks, block)
    block_values, block_ids = torch.topk(blocks.amax(dim=2), k + 1, dim=1)
    chosen = block_ids[:, :k]
    candidates = blocks[torch.arange(n_rows).unsqueeze(1), chosen].view(n_rows, k * block)
    values, positions = torch.topk(candidates, k + 1, dim=1)
    indices = torch.gather(chosen, 1, positions // block) * block + positions % block
    # Anything outside the chosen blocks is <= the (k+1)-th block maximum (<= the k-th value), so the set
    # is exact unless that maximum or the (k+1)-th candidate equals the k-th value.
    kth = values[:, k - 1]
    unsure = (block_values[:, k] == kth) | (values[:, k] == kth)
    values, indices = values[:, :k].contiguous(), indices[:, :k].contiguous()
    rows = torch.nonzero(unsure).flatten()
    if len(rows):
        exact_items, exact_values = topk_items(scores[rows, :n_valid], k)
        indices[rows], values[rows] = exact_items, exact_values
    return _order_ties_by_id(indices, values)


def full_ranking_topk(
    user_emb: torch.Tensor,
    item_emb: torch.Tensor,
    history: UserSequences | None,
    users: Sequence[int] | np.ndarray | torch.Tensor,
    k: int,
    chunk: int = 512,
    progress: bool = False,
    threads: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k by dot product for factor models, history items masked: (items [U, k], scores [U, k]).

    Same result as `full_ranking` with `topk_items` (ties by ascending item id; -1 = empty slot), faster:
    scores go chunk by chunk into one reused, cache-sized buffer whose width is padded to whole blocks,
    history items are masked in place with one flat index_fill_, and `_blocked_topk` prunes by block maxima.
    threads: torch intra-op threads for this call (restored after); on a CPU shared with other busy jobs,
    1 avoids multi-threaded barriers that wait for a descheduled thread (benchmarks/fullrank.py).
    """
    if threads is not None and threads != torch.get_num_threads():
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return full_ranking_topk(user_emb, item_emb, history, users, k, chunk, progress)
        finally:
            torch.set_num_threads(previous)
    users_np = np.asarray(users, dtype=np.int64).reshape(-1)
    users_t = torch.from_numpy(users_np)
    n_items, dim = item_emb.shape
    k_eff = min(k, n_items)
    n_pad = -(-n_items // _BLOCK) * _BLOCK
    item_t = torch.zeros((dim, n_pad), dtype=torch.float32)
    item_t[:, :n_items] = item_emb.detach().float().T
    user_emb = user_emb.detach().float()
    out_items = torch.empty((len(users_np), k_eff), dtype=torch.long)
    out_scores = torch.empty((len(users_np), k_eff), dtype=torch.float32)
    if len(users_np) == 0:
        return out_items, out_scores
    buffer = torch.empty((min(chunk, len(users_np)), n_pad), dtype=torch.float32)
    if history is not None:
        # Flat buffer positions of every history item, computed once; rows are positions in `users`.
        rows, cols = history.mask_coordinates(users_np)
        flat = rows * n_pad + cols
        row_starts = np.searchsorted(rows.numpy(), np.arange(0, len(users_np) + chunk, chunk))
    with _progress(progress) as bar, torch.no_grad():
        task = bar.add_task("full ranking", total=len(users_np)) if bar is not None else None
        for index, start in enumerate(range(0, len(users_np), chunk)):
            batch = users_t[start:start + chunk]
            scores = buffer[:len(batch)]
            torch.mm(user_emb[batch], item_t, out=scores)
            scores[:, n_items:] = -torch.inf
            if history is not None:
                local = flat[row_starts[index]:row_starts[index + 1]] - start * n_pad
                scores.view(-1).index_fill_(0, local, -torch.inf)
            items, values = _blocked_topk(scores, n_items, k_eff)
            out_items[start:start + len(batch)] = _empty_slots(items, values)
            out_scores[start:start + len(batch)] = values
            if bar is not None:
                bar.advance(task, len(batch))
    return out_items, out_scores


def rank_candidates(scores: torch.Tensor, candidates: torch.Tensor, k: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Order each row's candidate items by score (desc), ties by ascending item id: (items, scores).

    scores: [B, n_items] full scores; candidates: LongTensor [B, C] (-1 = no candidate, ranked last as -1).
    """
    valid = candidates >= 0
    # Sort candidates by item id first so a stable score sort breaks ties by id, not by list position
    # (the target sits first in a candidate list and must not win ties).
    by_id = torch.sort(torch.where(valid, candidates, torch.iinfo(torch.long).max), dim=1).values
    valid = by_id != torch.iinfo(torch.long).max
    cand = torch.where(valid, by_id, torch.zeros_like(by_id))
    vals = torch.gather(scores, 1, cand).float().masked_fill_(~valid, -torch.inf)
    vals, order = torch.sort(vals, dim=1, descending=True, stable=True)
    items = torch.gather(torch.where(valid, by_id, torch.full_like(by_id, -1)), 1, order)
    if k is not None:
        items, vals = items[:, :k], vals[:, :k]
    return _empty_slots(items.clone(), vals), vals


def sampled_ranking(
    score_fn: ScoreFn,
    users: Sequence[int] | np.ndarray | torch.Tensor,
    history: UserSequences,
    candidates: torch.Tensor,
    k: int | None = None,
    exclude_history: bool = True,
    chunk: int = 1024,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank each user's candidate list (target + negatives): (items [U, C or k], scores); -1 = empty slot."""
    users = np.asarray(users, dtype=np.int64).reshape(-1)
    out_items, out_scores = [], []
    with _progress(progress) as bar:
        task = bar.add_task("sampled ranking", total=len(users)) if bar is not None else None
        for start in range(0, len(users), chunk):
            batch = users[start:start + chunk]
            scores = score_fn(batch).detach().float().clone()
            if exclude_history:
                scores.index_put_(history.mask_coordinates(batch), torch.tensor(-torch.inf))
            items, values = rank_candidates(scores, candidates[start:start + chunk], k)
            out_items.append(items)
            out_scores.append(values)
            if bar is not None:
                bar.advance(task, len(batch))
    if not out_items:
        width = k if k is not None else candidates.shape[1]
        return torch.empty((0, width), dtype=torch.long), torch.empty((0, width))
    return torch.cat(out_items), torch.cat(out_scores)
