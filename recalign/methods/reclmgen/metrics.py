"""RecLM-gen's controllable-recommendation metrics as one list metric (docs/metrics.md §2.5).

Each evaluated row carries its own request: k (10, or 11..15 for ItemCount), the target item, the control category C
(+C, -C and the category-rate tasks), the category-rate rule (LP/MP/EP) with m = floor(p*k/100), the row's SeqRec
reference list (SRTargetCategoryRate) and candidates (SeqRanking). `control_inputs` packs them into a `ListInputs`
whose per-row fields live in `extra["row_control_*"]` (so `ListInputs.take`, i.e. bootstrap resampling, keeps them
aligned), and the `control` family below scores them, every row counting (an empty answer scores 0 and counts as
not meeting a rule; it is never dropped, unlike the original: docs/systems/reclmgen.md, "Defects").

Per-row values, each a ratio over the row's k (l_u = the first k parsed titles after grounding):
recall / mrr / ndcg (target in L_u, the de-duplicated grounded list), non_exist, repeat, in_history, correct_count,
target_category_rate, sr_target_category_rate, category_rate_correct, not_in_candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from recalign.errors import ConfigError
from recalign.eval.lists import (
    NO_ENTRY,
    NOT_GROUNDED,
    ListInputs,
    final_lists,
    in_rows,
    list_metric,
    repeat_mask,
    row_sequences,
    score_lists,
)
from recalign.eval.metrics import padded_sets

RULES = ("LP", "MP", "EP")  # codes 1, 2, 3 in `row_control_rule`; 0 = no category-rate rule
CONTROL_PARITY = (None, "reclmgen")
# the control metrics' keys, in report order (a task has those its rows support)
CONTROL_KEYS = ("recall", "mrr", "ndcg", "non_exist", "repeat", "in_history", "correct_count", "target_category_rate",
                "sr_target_category_rate", "category_rate_correct", "not_in_candidate")


@dataclass(frozen=True)
class CategoryTable:
    """Item -> category membership: `names` [n_categories] and `table` bool [n_items, n_categories]."""

    names: tuple[str, ...]
    table: torch.Tensor

    @classmethod
    def from_item_categories(cls, item_categories: Sequence[Iterable[str]]) -> "CategoryTable":
        """The table of `Dataset.item_categories()`: an item is in C when C is among its categories."""
        lists = [[str(c) for c in cats] for cats in item_categories]
        names = tuple(sorted({c for cats in lists for c in cats}))
        column = {name: j for j, name in enumerate(names)}
        rows = np.fromiter((i for i, cats in enumerate(lists) for _ in cats), dtype=np.int64)
        cols = np.fromiter((column[c] for cats in lists for c in cats), dtype=np.int64)
        table = torch.zeros((len(lists), len(names)), dtype=torch.bool)
        table[torch.from_numpy(rows), torch.from_numpy(cols)] = True
        return cls(names, table)

    @property
    def n_items(self) -> int:
        """Catalog size."""
        return self.table.shape[0]

    def index(self, name: str) -> int:
        """Column of category `name` (unknown names are config errors)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise ConfigError(f"unknown category {name!r}; the dataset has {len(self.names)} categories") from None

    def sizes(self) -> torch.Tensor:
        """|C| for every category [n_categories]."""
        return self.table.sum(0)

    def contains(self, items: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """[U, W] bool: entry (an item id >= 0) is in its row's category (`category` [U], -1 = none)."""
        hit = self.table[items.clamp(min=0), category.clamp(min=0)[:, None].expand_as(items)]
        return hit & (items >= 0) & (category[:, None] >= 0)


def truncate(grounded: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """l_u: each row's first k entries, later columns set to NO_ENTRY."""
    cols = torch.arange(grounded.shape[1])[None, :]
    return torch.where(cols < k[:, None], grounded, torch.full_like(grounded, NO_ENTRY))


def _padded(rows: "torch.Tensor | Sequence[Iterable[int]]", ordered: bool = False) -> torch.Tensor:
    """Per-row item lists as a -1 padded LongTensor (kept in order when `ordered`)."""
    if isinstance(rows, torch.Tensor):
        return rows.long()
    if not ordered:
        return padded_sets(rows)
    lists = [list(r) for r in rows]
    out = torch.full((len(lists), max([len(r) for r in lists] + [1])), -1, dtype=torch.long)
    for i, r in enumerate(lists):  # building a padded tensor, one row at a time
        out[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return out


def control_inputs(
    grounded: torch.Tensor,
    targets: "torch.Tensor | Sequence[int]",
    k: "torch.Tensor | Sequence[int] | int",
    n_items: int,
    *,
    n_outputs: "torch.Tensor | Sequence[int] | None" = None,
    history: "torch.Tensor | Sequence[Iterable[int]] | None" = None,
    categories: CategoryTable | None = None,
    row_category: "torch.Tensor | Sequence[int] | None" = None,
    rule: "str | Sequence[str | None] | None" = None,
    m: "torch.Tensor | Sequence[int] | None" = None,
    sr_grounded: torch.Tensor | None = None,
    candidates: "torch.Tensor | Sequence[Iterable[int]] | None" = None,
    parity: str | None = None,
) -> ListInputs:
    """The `ListInputs` of one controllable test task (grounded [U, W] with NOT_GROUNDED / NO_ENTRY entries)."""
    grounded = torch.as_tensor(grounded, dtype=torch.long)
    rows = grounded.shape[0]
    k = torch.as_tensor(k, dtype=torch.long).expand(rows).clone()
    if (k < 1).any():
        raise ConfigError("control metrics: every row needs k >= 1")
    if parity not in CONTROL_PARITY:
        raise ConfigError(f"control metrics: unknown parity option {parity!r}; expected one of {CONTROL_PARITY}")
    if grounded.shape[1] < int(k.max()):
        pad = torch.full((rows, int(k.max()) - grounded.shape[1]), NO_ENTRY, dtype=torch.long)
        grounded = torch.cat([grounded, pad], dim=1)
    extra: dict = {"row_control_grounded": grounded, "row_control_k": k, "control_parity": parity}
    if n_outputs is not None:
        extra["row_control_n_outputs"] = torch.as_tensor(n_outputs, dtype=torch.long)
    if history is not None:
        extra["row_control_history"] = _padded(history, ordered=True)
    if row_category is not None:
        if categories is None:
            raise ConfigError("control metrics: row categories need the category table")
        extra["row_control_category"] = torch.as_tensor(row_category, dtype=torch.long)
        extra["control_categories"] = categories
    if rule is not None:
        rules = [rule] * rows if isinstance(rule, str) else list(rule)
        if len(rules) != rows or any(r not in RULES + (None,) for r in rules):
            raise ConfigError("control metrics: rule must be 'LP', 'MP', 'EP' or None (one, or one per row)")
        if m is None or row_category is None:
            raise ConfigError("control metrics: a category-rate rule needs m and the row category")
        extra["row_control_rule"] = torch.tensor([0 if r is None else RULES.index(r) + 1 for r in rules])
        extra["row_control_m"] = torch.as_tensor(m, dtype=torch.long).expand(rows).clone()
    if sr_grounded is not None:
        if row_category is None:
            raise ConfigError("control metrics: SRTargetCategoryRate needs the row category")
        extra["row_control_sr"] = torch.as_tensor(sr_grounded, dtype=torch.long)
    if candidates is not None:
        extra["row_control_candidates"] = _padded(candidates)
    lists = final_lists(truncate(grounded, k))
    return ListInputs(lists, torch.as_tensor(np.asarray(targets, dtype=np.int64)), n_items, extra=extra)


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else 0.0


def _target_position(entries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """0-based first position of the target in each row, or -1 when absent."""
    hit = entries == targets[:, None]
    first = hit.to(torch.int8).argmax(1)
    return torch.where(hit.any(1), first, torch.full_like(first, -1))


@list_metric("control", needs=("row_control_grounded", "row_control_k"))
def _control(x: ListInputs, ks: Sequence[int]) -> dict[str, float]:
    """The control metrics of every row's own request (k, C, rule, candidates, SeqRec reference)."""
    e = x.extra
    k = e["row_control_k"]
    kf = k.double()
    ell = truncate(e["row_control_grounded"], k)
    targets = x.relevant[:, 0]
    # Standard: the target's position in L_u (grounded, de-duplicated); reclmgen parity: in the truncated l_u.
    entries = ell if e.get("control_parity") == "reclmgen" else final_lists(ell)
    pos = _target_position(entries, targets).double()
    hit = pos >= 0
    zero = torch.zeros_like(pos)
    out = {
        "recall": _mean(hit),
        "mrr": _mean(torch.where(hit, 1 / (pos + 1), zero)),
        "ndcg": _mean(torch.where(hit, 1 / torch.log2(pos.clamp(min=0) + 2), zero)),
        "non_exist": _mean((ell == NOT_GROUNDED).sum(1) / kf),
        "repeat": _mean(repeat_mask(ell).sum(1) / kf),
    }
    if e.get("row_control_n_outputs") is not None:
        out["correct_count"] = _mean(e["row_control_n_outputs"] == k)
    if e.get("row_control_history") is not None:
        out["in_history"] = _mean(in_rows(ell, row_sequences(e["row_control_history"])).sum(1) / kf)
    if e.get("row_control_candidates") is not None:
        inside = in_rows(ell, row_sequences(e["row_control_candidates"]))
        out["not_in_candidate"] = _mean(((ell != NO_ENTRY) & ~inside).sum(1) / kf)
    if e.get("row_control_category") is not None:
        out.update(_category_values(x, ell, k))
    return out


def _category_values(x: ListInputs, ell: torch.Tensor, k: torch.Tensor) -> dict[str, float]:
    """TargetCategoryRate, SRTargetCategoryRate and CategoryRateCorrect over the rows that have a category."""
    e = x.extra
    table: CategoryTable = e["control_categories"]
    category = e["row_control_category"]
    has = category >= 0
    n_in = table.contains(ell, category).sum(1)
    out = {"target_category_rate": _mean((n_in / k.double())[has])}
    if e.get("row_control_sr") is not None:
        sr = e["row_control_sr"]
        width = max(sr.shape[1], int(k.max()))
        sr = torch.cat([sr, torch.full((sr.shape[0], width - sr.shape[1]), NO_ENTRY, dtype=torch.long)], 1)
        sr_in = table.contains(truncate(sr, k), category).sum(1)
        out["sr_target_category_rate"] = _mean((sr_in / k.double())[has])
    if e.get("row_control_rule") is not None:
        code, m = e["row_control_rule"], e["row_control_m"]
        n_ne = (ell == NOT_GROUNDED).sum(1)
        ok = torch.where(code == 1, n_in + n_ne <= m, torch.where(code == 2, n_in >= m, (n_in - m).abs() <= 1))
        ruled = code > 0
        if ruled.any():
            out["category_rate_correct"] = _mean(ok[ruled])
    return out


def score_control(inputs: ListInputs) -> dict:
    """The control metrics of one test task (`CONTROL_KEYS` where they apply), plus ValidRatio and the row counts."""
    return score_lists(inputs, ks=(int(inputs.extra["row_control_k"].max()),), metrics=("control", "valid_ratio"))
