"""The teacher operations of RecLM-gen in process, batched over every row.

`TeacherService.topk` is the teacher's top-K over given candidates, over `+C` (C minus history), over `-C` (all
minus C minus history) or over all minus history; `TeacherService.ranks` is the 0-based rank of each candidate among
all items. Histories are explicit item lists, so any caller (an RL reward, the HTTP server) can ask about any
sequence. One score call serves the whole batch; candidates, categories and history become boolean masks.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from recalign.data.dataset import UserSequences
from recalign.errors import RecalignError, RequestError, shorten
from recalign.eval.ranking import topk_items
from recalign.io import read_json
from recalign.teachers.base import Recommender
from recalign.teachers.registry import get_teacher

DEFAULT_MAX_HISTORY = 10  # the original client sends the last 10 items


class TeacherService:
    """A fitted teacher plus its item categories, answering top-K and rank questions for whole batches."""

    def __init__(self, teacher: Recommender, category_items: Mapping[str, Sequence[int]] | None = None,
                 max_history: int | None = DEFAULT_MAX_HISTORY, chunk_rows: int = 2048):
        teacher._check_fitted()
        if max_history is not None and max_history < 1:
            raise RecalignError(f"max_history must be a positive integer or None, got {max_history!r}")
        self.teacher = teacher
        self.n_items: int = int(teacher.n_items_)
        self.n_users: int = int(teacher.n_users_)
        self.max_history = max_history
        self.chunk_rows = max(1, int(chunk_rows))  # rows scored at once: memory ~ chunk_rows x n_items
        categories = teacher.category_items_ if category_items is None else category_items
        names = sorted(str(c) for c in categories)
        self.category_ids: dict[str, int] = {name: i for i, name in enumerate(names)}
        members = torch.zeros(len(names), self.n_items, dtype=torch.bool)
        for name, items in categories.items():  # once per category at start-up, not per request
            members[self.category_ids[str(name)], torch.as_tensor(list(items), dtype=torch.long)] = True
        self.category_members = members  # [n_categories, n_items]

    @classmethod
    def from_stage(cls, folder: str | os.PathLike, max_history: int | None = DEFAULT_MAX_HISTORY) -> "TeacherService":
        """Load the teacher of a finished teacher stage (RUN/stages/NAME, or its model/ folder)."""
        path = Path(folder)
        model_dir = path / "model" if (path / "model" / "teacher.json").is_file() else path
        meta_file = model_dir / "teacher.json"
        if not meta_file.is_file():
            raise RecalignError(f"{shorten(path, 200)}: not a teacher stage (no model/teacher.json)")
        try:
            name = read_json(meta_file)["teacher"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RecalignError(f"{meta_file}: not a teacher description") from None
        return cls(get_teacher(name).load(model_dir), max_history=max_history)

    @property
    def name(self) -> str:
        """The teacher's registry name (sasrec, bprmf, popularity)."""
        return self.teacher.name

    @property
    def categories(self) -> list[str]:
        """Category names, sorted."""
        return list(self.category_ids)

    # ---- the two operations -------------------------------------------------------------------------
    def topk(self, histories: list[list[int]], k: int, *, users: list[int] | None = None,
             candidates: list[list[int] | None] | None = None, categories: list[str | None] | None = None,
             exclude_history: bool = True) -> torch.Tensor:
        """Top-k item ids per row, LongTensor [B, k], -1 padding rows with fewer than k eligible items.

        candidates[i] (None: every item) limits row i; categories[i] is "+C" (items of C), "-C" (items not in C)
        or None; with exclude_history, the row's history items (the whole given list) are never returned.
        """
        if not _is_id(k) or k < 1:
            raise RequestError(f"k must be a positive integer, got {shorten(k)}")
        self.check(histories, users=users, candidates=candidates, categories=categories)
        parts = []
        for rows in self._chunks(len(histories)):  # bounds the [rows, n_items] score matrix of huge requests
            parts.append(self._topk_rows(histories[rows], int(k), None if users is None else users[rows],
                                         None if candidates is None else candidates[rows],
                                         None if categories is None else categories[rows], exclude_history))
        return torch.cat(parts) if parts else torch.empty(0, int(k), dtype=torch.long)

    def ranks(self, histories: list[list[int]], candidates: list[list[int]], users: list[int] | None = None
              ) -> torch.Tensor:
        """0-based rank of each candidate among all items (history not excluded), ties broken by ascending item id.

        Returns LongTensor [B, C] where C is the longest candidate list; shorter rows are padded with -1.
        """
        if candidates is None:
            raise RequestError("ranking needs candidates (one list per row)")
        self.check(histories, users=users, candidates=candidates)
        if any(c is None for c in candidates):
            raise RequestError("ranking needs a candidate list for every row")
        width = max((len(c) for c in candidates), default=0)
        parts = [self._rank_rows(histories[rows], None if users is None else users[rows], candidates[rows], width)
                 for rows in self._chunks(len(histories))]
        return torch.cat(parts) if parts else torch.empty(0, width, dtype=torch.long)

    # ---- validation ---------------------------------------------------------------------------------
    def check(self, histories: list[list[int]], *, users: list[int] | None = None,
              candidates: list[list[int] | None] | None = None, categories: list[str | None] | None = None) -> None:
        """Raise RequestError naming the first problem: row counts, unknown item/user ids or category names."""
        rows = len(histories)
        for what, values in (("users", users), ("candidates", candidates), ("categories", categories)):
            if values is not None and len(values) != rows:
                raise RequestError(f"{what} has {len(values)} rows but there are {rows} histories")
        self._check_items("history", histories)
        if candidates is not None:
            self._check_items("candidate", [c for c in candidates if c is not None])
        if users is not None:
            bad = [u for u in users if not _is_id(u) or not 0 <= u < self.n_users]
            if bad:
                raise RequestError(f"unknown user id {shorten(bad[0])} (users are 0..{self.n_users - 1})")
        elif self.teacher.user_based:
            raise RequestError(f"the {self.name} teacher scores by user id: pass `users`")
        if categories is not None:
            for category in categories:
                self._parse_category(category)

    def _check_items(self, what: str, lists: list[list[int]]) -> None:
        flat = [i for row in lists for i in row]
        if not flat:
            return
        if not all(_is_id(i) for i in flat):
            bad = next(i for i in flat if not _is_id(i))
            raise RequestError(f"{what} item ids must be integers, got {shorten(bad)}")
        outside = [i for i in flat if not 0 <= i < self.n_items]  # checked before int64 (2**63 would overflow)
        if outside:
            shown = ", ".join(shorten(v) for v in sorted(set(outside))[:5])
            raise RequestError(f"unknown {what} item id(s) {shown} (items are 0..{self.n_items - 1})")

    def _parse_category(self, category: str | None) -> tuple[int, bool] | None:
        """(category index, keep members?) of "+C"/"-C"; None for no filter."""
        if category is None:
            return None
        if not isinstance(category, str) or len(category) < 2 or category[0] not in "+-":
            raise RequestError(f"a target category must look like '+Name' or '-Name', got {shorten(category)!r}")
        index = self.category_ids.get(category[1:])
        if index is None:
            raise RequestError(f"unknown category {shorten(category[1:])!r}")
        return index, category[0] == "+"

    # ---- masks and scores ---------------------------------------------------------------------------
    def _scores(self, histories: list[list[int]], users: list[int] | None) -> torch.Tensor:
        """Teacher scores [B, n_items] for each row's history (its last max_history items) or user id."""
        if self.teacher.user_based:
            empty = UserSequences(indptr=np.zeros(self.n_users + 1, dtype=np.int64),
                                  items=np.zeros(0, dtype=np.int64), n_items=self.n_items)
            return self.teacher.score(np.asarray(users, dtype=np.int64), empty).float()
        # history-based teachers read row r's sequence from the user slot r of a per-request UserSequences
        return self.teacher.score(np.arange(len(histories)),
                                  _sequences(histories, self.max_history, self.n_items)).float()

    def _chunks(self, n_rows: int) -> list[slice]:
        return [slice(start, start + self.chunk_rows) for start in range(0, n_rows, self.chunk_rows)]

    def _topk_rows(self, histories: list[list[int]], k: int, users: list[int] | None,
                   candidates: list[list[int] | None] | None, categories: list[str | None] | None,
                   exclude_history: bool) -> torch.Tensor:
        """topk for rows already checked: one score call, then masks for candidates, category and history."""
        scores = self._scores(histories, users)
        allowed = torch.ones_like(scores, dtype=torch.bool)
        if candidates is not None:
            allowed &= self._candidate_mask(candidates)
        if categories is not None:
            allowed &= self._category_mask(categories)
        if exclude_history:
            rows, cols = _sequences(histories, None, self.n_items).mask_coordinates(np.arange(len(histories)))
            allowed[rows, cols] = False
        scores = scores.masked_fill(~allowed, -torch.inf)
        items, values = topk_items(scores, k)
        items = torch.where(torch.isneginf(values), torch.full_like(items, -1), items)
        if items.shape[1] < k:  # fewer items than k in the catalog
            items = torch.cat([items, items.new_full((len(items), k - items.shape[1]), -1)], dim=1)
        return items

    def _rank_rows(self, histories: list[list[int]], users: list[int] | None, candidates: list[list[int]],
                   width: int) -> torch.Tensor:
        """ranks for rows already checked: each item's position in the (score desc, id asc) order."""
        scores = self._scores(histories, users)
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices  # stable: equal scores by id
        position = torch.empty_like(order)
        position.scatter_(1, order, torch.arange(self.n_items).expand_as(order).contiguous())
        cand = pad_lists(candidates, width)
        ranks = position.gather(1, cand.clamp(min=0))
        return torch.where(cand >= 0, ranks, torch.full_like(ranks, -1))

    def _candidate_mask(self, candidates: list[list[int] | None]) -> torch.Tensor:
        """[B, n_items]: True at each row's candidates; rows without a list allow every item."""
        free = torch.tensor([c is None for c in candidates], dtype=torch.bool)
        cand = pad_lists([[] if c is None else c for c in candidates])
        mask = torch.zeros(len(candidates), self.n_items, dtype=torch.bool)
        rows = torch.arange(len(candidates)).unsqueeze(1).expand_as(cand)
        valid = cand >= 0
        mask[rows[valid], cand[valid]] = True
        mask[free] = True
        return mask

    def _category_mask(self, categories: list[str | None]) -> torch.Tensor:
        """[B, n_items]: members of C for "+C", non-members for "-C", everything for None."""
        parsed = [self._parse_category(c) for c in categories]
        index = torch.tensor([p[0] if p else 0 for p in parsed], dtype=torch.long)
        keep_members = torch.tensor([p[1] if p else True for p in parsed], dtype=torch.bool)
        free = torch.tensor([p is None for p in parsed], dtype=torch.bool)
        if len(self.category_members) == 0:
            return free.unsqueeze(1).expand(len(parsed), self.n_items).clone()
        members = self.category_members[index]
        mask = torch.where(keep_members.unsqueeze(1), members, ~members)
        mask[free] = True
        return mask


def _is_id(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def pad_lists(lists: list[list[int]], width: int | None = None) -> torch.Tensor:
    """Ragged int lists -> LongTensor [B, width] (default: the longest) padded with -1 on the right."""
    lists = lists if width is None else [x[:width] for x in lists]
    width = max((len(x) for x in lists), default=0) if width is None else width
    out = torch.full((len(lists), width), -1, dtype=torch.long)
    lengths = torch.tensor([len(x) for x in lists], dtype=torch.long)
    if width and int(lengths.sum()):
        keep = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
        out[keep] = torch.tensor([i for x in lists for i in x], dtype=torch.long)
    return out


def _sequences(histories: list[list[int]], max_history: int | None, n_items: int) -> UserSequences:
    """One UserSequences row per history, keeping its last max_history items (None: all)."""
    kept = histories if max_history is None else [h[-max_history:] if len(h) > max_history else h
                                                  for h in histories]
    lengths = np.fromiter((len(h) for h in kept), dtype=np.int64, count=len(kept))
    indptr = np.zeros(len(kept) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    items = np.fromiter((i for h in kept for i in h), dtype=np.int64, count=int(indptr[-1]))
    return UserSequences(indptr=indptr, items=items, n_items=n_items)
