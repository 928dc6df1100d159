"""Metrics of generated recommendation lists (metrics.md §2.4) and their HR/NDCG through the shared evaluator.

A generated answer of row u is parsed into titles o_u and grounded; ``grounded`` [U, k] holds the first k
entries: an item id, ``NOT_GROUNDED`` (-1) for a title that names no catalog item, ``NO_ENTRY`` (-2) past the
end of a shorter answer. Every per-row value is a ratio over k and is averaged over all rows, empty answers
included.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import torch

from recalign.errors import ConfigError

NOT_GROUNDED = -1
NO_ENTRY = -2


def ground_lists(title_lists: Sequence[Sequence[str]], grounder, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground the first k titles of every answer with one grounder call.

    Returns (grounded LongTensor [U, k] with -1 = not grounded and -2 = no entry, n_outputs LongTensor [U] = the
    number of titles before truncation, for CorrectCount).
    """
    n_outputs = torch.tensor([len(t) for t in title_lists], dtype=torch.long)
    kept = n_outputs.clamp(max=k)
    flat = [title for titles in title_lists for title in titles[:k]]
    grounded = torch.full((len(title_lists), k), NO_ENTRY, dtype=torch.long)
    if flat:
        rows = torch.repeat_interleave(torch.arange(len(title_lists)), kept)
        cols = torch.arange(rows.shape[0]) - (torch.cumsum(kept, 0) - kept)[rows]
        grounded[rows, cols] = grounder.ground(flat)
    return grounded, n_outputs


def final_lists(grounded: torch.Tensor) -> torch.Tensor:
    """L_u: the grounded items in answer order, ungrounded entries and repeats dropped, shifted left, -1 padded."""
    valid = grounded >= 0
    keep = valid & ~_repeat_mask(grounded)
    # Stable sort on "not kept" moves kept entries to the front without changing their order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    out = grounded.gather(1, order)
    return torch.where(keep.gather(1, order), out, torch.full_like(out, -1))


def _repeat_mask(grounded: torch.Tensor) -> torch.Tensor:
    """True at every grounded entry equal to an earlier grounded entry of the same row."""
    valid = grounded >= 0
    # Unique negative keys for ungrounded slots so that they never count as repeats of each other.
    cols = torch.arange(grounded.shape[1], device=grounded.device)
    keys = torch.where(valid, grounded, -1 - cols[None, :])
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)  # stable: the earliest occurrence comes first
    dup_sorted = torch.zeros_like(valid)
    dup_sorted[:, 1:] = (sorted_keys[:, 1:] == sorted_keys[:, :-1]) & (sorted_keys[:, 1:] >= 0)
    return torch.zeros_like(valid).scatter_(1, order, dup_sorted)


def _padded(rows: torch.Tensor | Iterable[Iterable[int]] | None) -> torch.Tensor | None:
    """Per-row item sets as a -1 padded LongTensor [U, H] (accepts an already padded tensor)."""
    if rows is None or isinstance(rows, torch.Tensor):
        return rows
    lists = [list(r) for r in rows]
    width = max((len(r) for r in lists), default=0)
    out = torch.full((len(lists), max(width, 1)), -1, dtype=torch.long)
    for i, r in enumerate(lists):  # building the input once; the metrics themselves are vectorised
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def _member(grounded: torch.Tensor, sets: torch.Tensor) -> torch.Tensor:
    """[U, k] bool: the grounded entry occurs in the row's padded item set (negative = padding)."""
    return ((grounded[:, :, None] == sets[:, None, :]) & (sets[:, None, :] >= 0)).any(-1) & (grounded >= 0)


def validity_metrics(
    grounded: torch.Tensor,
    *,
    n_outputs: torch.Tensor | None = None,
    history: torch.Tensor | Iterable[Iterable[int]] | None = None,
    candidates: torch.Tensor | Iterable[Iterable[int]] | None = None,
) -> dict[str, float]:
    """NonExist, Repeat, InHistory, CorrectCount, NotInCandidateRate and ValidRatio (metrics.md §2.4).

    k is ``grounded.shape[1]``. Repeat counts grounded entries equal to an earlier grounded entry; ungrounded
    titles count only as NonExist. CorrectCount needs ``n_outputs``; InHistory needs ``history``; with
    ``candidates`` a row is valid when it names a candidate, and NotInCandidateRate is reported.
    """
    k = grounded.shape[1]
    entry = grounded != NO_ENTRY
    valid = grounded >= 0
    out = {
        "non_exist": float(((grounded == NOT_GROUNDED).sum(1) / k).mean()),
        "repeat": float((_repeat_mask(grounded).sum(1) / k).mean()),
    }
    hist = _padded(history)
    if hist is not None:
        out["in_history"] = float((_member(grounded, hist).sum(1) / k).mean())
    if n_outputs is not None:
        out["correct_count"] = float((n_outputs == k).float().mean())
    cands = _padded(candidates)
    if cands is not None:
        in_cands = _member(grounded, cands)
        out["not_in_candidate"] = float(((entry & ~in_cands).sum(1) / k).mean())
        out["valid_ratio"] = float(in_cands.any(1).float().mean())
    else:
        out["valid_ratio"] = float(valid.any(1).float().mean())
    return out


def category_metrics(
    grounded: torch.Tensor,
    item_categories: torch.Tensor,
    row_category: torch.Tensor,
    *,
    p: int | torch.Tensor | None = None,
    rule: Literal["LP", "MP", "EP"] | Sequence[str] | None = None,
    strict: bool = False,
) -> dict[str, float]:
    """TargetCategoryRate and (with p and rule) CategoryRateCorrect of each row's target category.

    ``item_categories`` is a bool [n_items, n_categories] table; ``row_category`` [U] the target category C of
    each row. With m = floor(p*k/100): LP n_in + n_ne <= m, MP n_in >= m, EP |n_in - m| <= 1 (paper rules);
    ``strict`` uses the RL reward's versions LP n_in <= m, MP n_in >= m, EP n_in = m.
    """
    k = grounded.shape[1]
    valid = grounded >= 0
    in_c = item_categories[grounded.clamp(min=0), row_category[:, None]] & valid
    n_in = in_c.sum(1)
    out = {"target_category_rate": float((n_in / k).mean())}
    if p is None or rule is None:
        return out
    rules = [rule] * grounded.shape[0] if isinstance(rule, str) else list(rule)
    if any(r not in ("LP", "MP", "EP") for r in rules) or len(rules) != grounded.shape[0]:
        raise ConfigError("category rule: expected 'LP', 'MP' or 'EP' (one, or one per row)")
    m = torch.div(torch.as_tensor(p) * k, 100, rounding_mode="floor").expand(grounded.shape[0])
    n_ne = (grounded == NOT_GROUNDED).sum(1)
    code = torch.tensor([("LP", "MP", "EP").index(r) for r in rules])
    lp = (n_in <= m) if strict else (n_in + n_ne <= m)
    mp = n_in >= m
    ep = (n_in == m) if strict else ((n_in - m).abs() <= 1)
    ok = torch.where(code == 0, lp, torch.where(code == 1, mp, ep))
    out["category_rate_correct"] = float(ok.float().mean())
    return out


def evaluate_generated(
    grounded: torch.Tensor,
    targets: torch.Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    n_outputs: torch.Tensor | None = None,
    history: torch.Tensor | Iterable[Iterable[int]] | None = None,
    candidates: torch.Tensor | Iterable[Iterable[int]] | None = None,
) -> dict[str, float]:
    """HR/NDCG/... @ks of the final lists (through `recalign.eval.metrics`) plus the validity metrics.

    Rows whose target is not a catalog item (negative id) are removed first and counted in
    ``n_removed_unknown_target``; every other row counts, empty answers scoring 0.
    """
    from recalign.eval.metrics import ranking_metrics

    known = targets >= 0
    hist, cands = _padded(history), _padded(candidates)
    grounded, targets = grounded[known], targets[known]
    hist = hist[known] if hist is not None else None
    cands = cands[known] if cands is not None else None
    n_outputs = n_outputs[known] if n_outputs is not None else None
    lists = final_lists(grounded)
    if lists.shape[1] < max(ks):  # the evaluator reads K columns; an answer of k titles has no more
        lists = torch.cat([lists, torch.full((lists.shape[0], max(ks) - lists.shape[1]), -1)], 1)
    out = dict(ranking_metrics(lists, targets, list(ks)))
    out.update(validity_metrics(grounded, n_outputs=n_outputs, history=hist, candidates=cands))
    out["n_rows"] = int(known.sum())
    out["n_removed_unknown_target"] = int((~known).sum())
    out["k_generated"] = int(grounded.shape[1])
    return out
