"""The one list evaluator: ranked item lists per row -> every list metric of docs/metrics.md.

Teachers' top-K, re-ranked lists, grounded LLM answers and generative beams all end as `lists` LongTensor [U, W]
(item ids, best first, -1 = empty slot) scored against the same relevant items by `score_lists`:
§2.1 accuracy (HR, Recall, Precision, NDCG, MRR, MAP @K), §2.3 list-set metrics (coverage, DivRatio, ORRatio, AvgPop,
MGU/DGU) and, for generated answers, §2.4 validity (ValidRatio, NonExist, Repeat, InHistory, CorrectCount,
NotInCandidateRate). An empty or unparsable answer is an all -1 row: a miss that counts, never a dropped row.

More metrics plug in with `@list_metric(name, needs=...)`: a function (ListInputs, ks) -> {key: value} that runs
whenever the inputs it needs are given (RecLM-gen's category metrics are one, reading `extra`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import torch

from recalign.data.dataset import UserSequences
from recalign.errors import ConfigError
from recalign.eval import beyond
from recalign.eval.metrics import padded_sets, ranking_metrics

NOT_GROUNDED = -1  # a generated title that names no catalog item
NO_ENTRY = -2      # past the end of a shorter answer

# ---- what a list model is ----------------------------------------------------------------------------------------

@dataclass
class GeneratedLists:
    """Grounded generated answers: `grounded` [U, k] (item id, NOT_GROUNDED or NO_ENTRY), titles per answer [U]."""

    grounded: torch.Tensor
    n_outputs: torch.Tensor | None = None  # |o_u| before truncation to k (CorrectCount)

    def lists(self) -> torch.Tensor:
        """The final lists L_u (§1): grounded items in answer order, unknown entries and repeats dropped."""
        return final_lists(self.grounded)


@runtime_checkable
class ListRecommender(Protocol):
    """Anything that answers users with ranked item lists: LongTensor [len(users), <= k] (-1 = empty slot).

    `histories` is the split's history (the same `UserSequences` `Recommender.score` gets). A generator may return
    `GeneratedLists` instead, so that its validity metrics (§2.4) are scored as well.
    """

    def recommend(self, users: np.ndarray, histories: UserSequences, k: int) -> "torch.Tensor | GeneratedLists":
        """Top-k lists of `users`, best first, -1 padded."""


class TopKLists:
    """A score-based `Recommender` seen as a `ListRecommender`: its own `recommend(...)` top-k items."""

    def __init__(self, model, exclude_history: bool = True):
        self.model, self.exclude_history = model, exclude_history

    def recommend(self, users: np.ndarray, histories: UserSequences, k: int) -> torch.Tensor:
        """The model's top-k items (history masked when `exclude_history`)."""
        return self.model.recommend(users, histories, k, exclude_history=self.exclude_history)[0]


def final_lists(grounded: torch.Tensor) -> torch.Tensor:
    """L_u: the grounded items in answer order, ungrounded entries and repeats dropped, shifted left, -1 padded."""
    keep = (grounded >= 0) & ~repeat_mask(grounded)
    # Stable sort on "not kept" moves kept entries to the front without changing their order.
    order = torch.sort((~keep).to(torch.int8), dim=1, stable=True).indices
    out = grounded.gather(1, order)
    return torch.where(keep.gather(1, order), out, torch.full_like(out, -1))


def repeat_mask(grounded: torch.Tensor) -> torch.Tensor:
    """True at every grounded entry equal to an earlier grounded entry of the same row."""
    valid = grounded >= 0
    # Unique negative keys for ungrounded slots so that they never count as repeats of each other.
    cols = torch.arange(grounded.shape[1], device=grounded.device)
    keys = torch.where(valid, grounded, -1 - cols[None, :])
    sorted_keys, order = torch.sort(keys, dim=1, stable=True)  # stable: the earliest occurrence comes first
    dup_sorted = torch.zeros_like(valid)
    dup_sorted[:, 1:] = (sorted_keys[:, 1:] == sorted_keys[:, :-1]) & (sorted_keys[:, 1:] >= 0)
    return torch.zeros_like(valid).scatter_(1, order, dup_sorted)


# ---- the inputs every metric reads -------------------------------------------------------------------------------

def row_sequences(histories: "UserSequences | torch.Tensor | Iterable[Iterable[int]]", n_items: int = 0
                  ) -> UserSequences:
    """Per-row item sequences (row r = the r-th evaluated row) from sequences, a -1 padded tensor or lists."""
    if isinstance(histories, UserSequences):
        return histories
    if isinstance(histories, torch.Tensor):
        padded = histories.long().reshape(histories.shape[0], -1)
        valid = padded >= 0
        counts, items = valid.sum(1).numpy(), padded[valid].numpy()
    else:
        rows = [list(int(i) for i in h) for h in histories]
        counts = np.array([len(h) for h in rows], dtype=np.int64)
        items = np.fromiter((i for h in rows for i in h), dtype=np.int64, count=int(counts.sum()))
    indptr = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    return UserSequences(indptr=indptr, items=items.astype(np.int64), n_items=n_items)


def users_sequences(history: UserSequences, users: np.ndarray) -> UserSequences:
    """The histories of `users` as per-row sequences (row r = users[r]; repeats allowed)."""
    rows, items = history.mask_coordinates(users)
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows.numpy(), minlength=len(users)), out=indptr[1:])
    return UserSequences(indptr=indptr, items=items.numpy(), n_items=history.n_items)


def in_rows(entries: torch.Tensor, sequences: UserSequences) -> torch.Tensor:
    """[U, W] bool: entry (an item id >= 0) occurs in its row's sequence."""
    rows, items = sequences.mask_coordinates(np.arange(entries.shape[0]))
    width = int(max(int(entries.max()) if entries.numel() else 0, int(items.max()) if items.numel() else 0)) + 1
    keys = torch.unique(rows * width + items)  # sorted
    query = torch.arange(entries.shape[0])[:, None] * width + entries.clamp(min=0)
    if keys.numel() == 0:
        return torch.zeros_like(entries, dtype=torch.bool)
    pos = torch.searchsorted(keys, query.contiguous()).clamp_(max=keys.numel() - 1)
    return (keys[pos] == query) & (entries >= 0)


@dataclass
class ListInputs:
    """Everything the list metrics read, one row per evaluated row; optional fields switch metrics on."""

    lists: torch.Tensor                        # [U, W] ranked item ids, -1 = empty slot
    relevant: "torch.Tensor | Sequence[Iterable[int]]"  # targets [U], padded [U, R] (-1 = none) or item sets
    n_items: int                               # |I|, for Coverage
    n_relevant: torch.Tensor | None = None     # |Rel_u| when `relevant` is truncated (e.g. many test items)
    parity: str | None = None                  # §4 parity option of the accuracy metrics
    popularity: torch.Tensor | None = None     # pop(i) [n_items]: AvgPop
    history: "UserSequences | torch.Tensor | Iterable[Iterable[int]] | None" = None  # per-row input history
    genre_table: torch.Tensor | None = None    # `beyond.genre_weights` [n_items, |G|]: MGU/DGU (needs history)
    grounded: torch.Tensor | None = None       # generated answers (`GeneratedLists.grounded`): §2.4 metrics
    n_outputs: torch.Tensor | None = None      # titles per answer before truncation: CorrectCount
    candidates: "torch.Tensor | Sequence[Iterable[int]] | None" = None  # per-row candidates: NotInCandidateRate
    extra: dict[str, Any] = field(default_factory=dict)  # inputs of later metrics; "row_*" keys are per row

    def __post_init__(self) -> None:
        self.lists = torch.as_tensor(self.lists, dtype=torch.long).reshape(len(self.lists), -1)
        rel = self.relevant
        if isinstance(rel, np.ndarray) or (not isinstance(rel, torch.Tensor) and len(rel)
                                           and isinstance(rel[0], (int, np.integer))):
            rel = torch.as_tensor(np.asarray(rel, dtype=np.int64))  # one target per row
        elif not isinstance(rel, torch.Tensor):
            rel = padded_sets(rel)
        self.relevant = rel.long().reshape(self.lists.shape[0], -1)
        if self.n_relevant is not None:
            self.n_relevant = torch.as_tensor(self.n_relevant, dtype=torch.long)
        if self.history is not None:
            self.history = row_sequences(self.history, self.n_items)
        if self.candidates is not None and not isinstance(self.candidates, torch.Tensor):
            self.candidates = padded_sets(self.candidates)

    @classmethod
    def from_generated(cls, generated: GeneratedLists, relevant, n_items: int, **fields) -> "ListInputs":
        """Inputs of grounded generated answers: the final lists plus the grounded entries."""
        return cls(generated.lists(), relevant, n_items, grounded=generated.grounded,
                   n_outputs=generated.n_outputs, **fields)

    def __len__(self) -> int:
        return self.lists.shape[0]

    def take(self, index: "np.ndarray | torch.Tensor | Sequence[int]") -> "ListInputs":
        """The rows at `index` (repeats allowed, e.g. a bootstrap resample)."""
        idx = torch.as_tensor(np.asarray(index, dtype=np.int64))
        pick = (lambda t: None if t is None else t[idx])
        history = None if self.history is None else users_sequences(self.history, idx.numpy())
        return replace(self, lists=self.lists[idx], relevant=self.relevant[idx], n_relevant=pick(self.n_relevant),
                       history=history, grounded=pick(self.grounded), n_outputs=pick(self.n_outputs),
                       candidates=pick(self.candidates),
                       extra={k: torch.as_tensor(v)[idx] if k.startswith("row_") else v for k, v in self.extra.items()})

    def known_targets(self) -> torch.Tensor:
        """[U] bool: the row has at least one relevant catalog item (others are removed before scoring, §1)."""
        return (self.relevant >= 0).any(dim=1)


# ---- the metric registry -----------------------------------------------------------------------------------------

ListMetric = Callable[[ListInputs, Sequence[int]], dict[str, float]]
LIST_METRICS: dict[str, tuple[ListMetric, tuple[str, ...]]] = {}


def list_metric(name: str, needs: tuple[str, ...] = ()) -> Callable[[ListMetric], ListMetric]:
    """Register a metric family that runs when every input in `needs` (a ListInputs field or `extra` key) is set."""
    def register(function: ListMetric) -> ListMetric:
        LIST_METRICS[name] = (function, needs)
        return function
    return register


def _has(inputs: ListInputs, name: str) -> bool:
    return getattr(inputs, name, None) is not None or inputs.extra.get(name) is not None


@list_metric("accuracy")
def _accuracy(x: ListInputs, ks: Sequence[int]) -> dict[str, float]:
    """§2.1: hr, recall, precision, ndcg, mrr, map @K."""
    return ranking_metrics(x.lists, x.relevant, ks, n_relevant=x.n_relevant, parity=x.parity)


@list_metric("coverage")
def _coverage(x: ListInputs, ks: Sequence[int]) -> dict[str, float]:
    """§2.3: Coverage@K, DivRatio@K, ORRatio@K."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"coverage@{k}"] = beyond.coverage(x.lists, k, x.n_items)
        out[f"div_ratio@{k}"] = beyond.div_ratio(x.lists, k)
        out[f"or_ratio@{k}"] = beyond.or_ratio(x.lists, k, x.n_items)
    return out


@list_metric("popularity", needs=("popularity",))
def _popularity(x: ListInputs, ks: Sequence[int]) -> dict[str, float]:
    """§2.3: AvgPop@K."""
    return {f"avg_pop@{k}": beyond.avg_popularity(x.lists, k, torch.as_tensor(x.popularity)) for k in ks}


@list_metric("genre", needs=("history", "genre_table"))
def _genre(x: ListInputs, ks: Sequence[int]) -> dict[str, float]:
    """§2.3: MGU@K and DGU@K (GH over every history item of the rows)."""
    out: dict[str, float] = {}
    genres = range(x.genre_table.shape[1])
    for k in ks:
        out[f"mgu@{k}"], out[f"dgu@{k}"] = beyond.mgu_dgu(x.lists, k, x.history.items, x.genre_table, genres)
    return out


@list_metric("valid_ratio")
def _valid_ratio(x: ListInputs, ks: Sequence[int]) -> dict[str, float]:
    """§2.4 ValidRatio: the row's list names a catalog item (a candidate, for generated answers with candidates)."""
    if x.grounded is not None:
        return {"valid_ratio": validity_metrics(x.grounded, candidates=x.candidates)["valid_ratio"]}
    return {"valid_ratio": _mean((x.lists >= 0).any(dim=1))}


@list_metric("generated", needs=("grounded",))
def _generated(x: ListInputs, ks: Sequence[int]) -> dict[str, float]:
    """§2.4: NonExist, Repeat, InHistory, CorrectCount, NotInCandidateRate of the grounded answers."""
    out = validity_metrics(x.grounded, n_outputs=x.n_outputs, history=x.history, candidates=x.candidates)
    out.pop("valid_ratio")
    out["k_generated"] = int(x.grounded.shape[1])
    return out


@list_metric("category", needs=("item_categories", "row_category"))
def _category(x: ListInputs, ks: Sequence[int]) -> dict[str, float]:
    """§2.4: TargetCategoryRate (and CategoryRateCorrect with `extra` p and rule) of the grounded answers."""
    entries = x.grounded if x.grounded is not None else x.lists
    e = x.extra
    return category_metrics(entries, e["item_categories"], e["row_category"], p=e.get("p"), rule=e.get("rule"),
                            strict=bool(e.get("strict", False)))


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else 0.0


def score_lists(inputs: ListInputs, ks: Sequence[int], metrics: Sequence[str] | None = None) -> dict:
    """Every registered metric whose inputs are given (or only `metrics`), at every K, plus row counts.

    Rows without any relevant catalog item are removed first (`n_removed_unknown_target`); every other row
    counts, an empty list scoring 0. Keys: "hr@5", "div_ratio@5", "valid_ratio", ..., "n_rows".
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ConfigError(f"ks: expected positive integers, got {list(ks)}")
    names = list(LIST_METRICS) if metrics is None else list(metrics)
    unknown = [n for n in names if n not in LIST_METRICS]
    if unknown:
        raise ConfigError(f"unknown list metrics {unknown}; expected some of {sorted(LIST_METRICS)}")
    known = inputs.known_targets()
    removed = int((~known).sum())
    if removed:
        inputs = inputs.take(torch.nonzero(known).flatten())
    if inputs.lists.shape[1] < ks[-1]:  # a shorter list: its missing slots are empty (misses)
        pad = torch.full((len(inputs), ks[-1] - inputs.lists.shape[1]), -1, dtype=torch.long)
        inputs = replace(inputs, lists=torch.cat([inputs.lists, pad], dim=1))
    out: dict = {}
    for name in names:
        function, needs = LIST_METRICS[name]
        if all(_has(inputs, need) for need in needs):
            out.update(function(inputs, ks))
    out["n_rows"] = len(inputs)
    out["n_removed_unknown_target"] = removed
    return out


# ---- §2.4 functions, usable on their own -------------------------------------------------------------------------

def validity_metrics(
    grounded: torch.Tensor,
    *,
    n_outputs: torch.Tensor | None = None,
    history: "UserSequences | torch.Tensor | Iterable[Iterable[int]] | None" = None,
    candidates: "torch.Tensor | Sequence[Iterable[int]] | None" = None,
) -> dict[str, float]:
    """NonExist, Repeat, InHistory, CorrectCount, NotInCandidateRate and ValidRatio (docs/metrics.md §2.4).

    k is ``grounded.shape[1]``. Repeat counts grounded entries equal to an earlier grounded entry; ungrounded
    titles count only as NonExist. CorrectCount needs ``n_outputs``; InHistory needs ``history``; with
    ``candidates`` a row is valid when it names a candidate, and NotInCandidateRate is reported.
    """
    k = grounded.shape[1]
    entry = grounded != NO_ENTRY
    out = {
        "non_exist": _mean((grounded == NOT_GROUNDED).sum(1) / k),
        "repeat": _mean(repeat_mask(grounded).sum(1) / k),
    }
    if history is not None:
        out["in_history"] = _mean(in_rows(grounded, row_sequences(history)).sum(1) / k)
    if n_outputs is not None:
        out["correct_count"] = _mean(torch.as_tensor(n_outputs) == k)
    if candidates is not None:
        cands = candidates if isinstance(candidates, torch.Tensor) else padded_sets(candidates)
        in_cands = in_rows(grounded, row_sequences(cands))
        out["not_in_candidate"] = _mean((entry & ~in_cands).sum(1) / k)
        out["valid_ratio"] = _mean(in_cands.any(1))
    else:
        out["valid_ratio"] = _mean((grounded >= 0).any(1))
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
    """TargetCategoryRate and (with p and rule) CategoryRateCorrect of each row's target category (§2.4).

    ``item_categories`` is a bool [n_items, n_categories] table; ``row_category`` [U] the target category C of
    each row. With m = floor(p*k/100): LP n_in + n_ne <= m, MP n_in >= m, EP |n_in - m| <= 1 (paper rules);
    ``strict`` uses the RL reward's versions LP n_in <= m, MP n_in >= m, EP n_in = m.
    """
    k = grounded.shape[1]
    valid = grounded >= 0
    in_c = item_categories[grounded.clamp(min=0), row_category[:, None]] & valid
    n_in = in_c.sum(1)
    out = {"target_category_rate": _mean(n_in / k)}
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
    out["category_rate_correct"] = _mean(ok)
    return out
