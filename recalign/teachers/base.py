"""The Recommender protocol every teacher implements: fit / score / recommend / save / load."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field

from recalign.data.dataset import Dataset, UserSequences
from recalign.errors import ConfigError, RecalignError
from recalign.eval.ranking import topk_items
from recalign.io import atomic_path, make_dirs, read_json, write_json


class TeacherConfig(BaseModel):
    """Base of every teacher config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    seed: int = 0
    threads: int | None = Field(None, ge=1, description="torch CPU threads for fit and scoring (None: recalign's "
                                "default, 1; see recalign/threads.py)")


class Recommender(ABC):
    """A recommender over dense item ids 0..n_items-1.

    `fit` learns from training interactions and returns self; learned state ends in `_`.
    `score` gives a [len(users), n_items] float tensor given each user's history (time-ordered).
    `recommend` ranks (optionally a candidate set), masks history, filters a category, takes top-k.
    """

    name: ClassVar[str]
    Config: ClassVar[type[TeacherConfig]] = TeacherConfig
    # True when `score` reads the user id (a learned user embedding) instead of the history
    user_based: ClassVar[bool] = False

    def __init__(self, config: TeacherConfig | None = None, **overrides):
        base = config.model_dump() if config is not None else {}
        base.update(overrides)
        try:
            self.config = self.Config(**base)
        except Exception as exc:  # pydantic.ValidationError -> one readable line
            raise ConfigError(f"{self.name}: {_first_error(exc)}") from None

    # ---- learning ----------------------------------------------------------------------------
    @abstractmethod
    def fit(self, dataset: Dataset, train: pd.DataFrame, valid: pd.DataFrame | None = None,
            progress: bool = True) -> "Recommender":
        """Learn from `train` interactions (dense ids); `valid` may be used for early stopping."""

    @abstractmethod
    def score(self, users: np.ndarray | torch.Tensor, history: UserSequences) -> torch.Tensor:
        """Scores [len(users), n_items] (higher is better) given each user's history."""

    # ---- inference ---------------------------------------------------------------------------
    def recommend(
        self,
        users: np.ndarray | torch.Tensor,
        history: UserSequences,
        k: int,
        candidates: torch.Tensor | None = None,
        exclude_history: bool = True,
        category: str | None = None,
        batch_size: int = 1024,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items per user: (items LongTensor [B, k], scores [B, k]); -1 / -inf pad short lists.

        candidates: LongTensor [B, C] of item ids to rank among (others are excluded).
        category:   "+C" keeps only items of category C, "-C" drops them.
        """
        self._check_fitted()
        users = torch.as_tensor(np.array(users, dtype=np.int64))  # a copy: pandas arrays may be read-only
        allowed = self._category_mask(category)
        out_items, out_scores = [], []
        for start in range(0, len(users), batch_size):
            batch = users[start:start + batch_size]
            scores = self.score(batch.numpy(), history).float().clone()
            if candidates is not None:
                keep = torch.zeros_like(scores, dtype=torch.bool)
                cand = candidates[start:start + batch_size]
                valid = cand >= 0
                rows = torch.arange(len(batch)).unsqueeze(1).expand_as(cand)
                keep[rows[valid], cand[valid]] = True
                scores[~keep] = -torch.inf
            if exclude_history:
                rows, cols = history.mask_coordinates(batch.numpy())
                scores[rows, cols] = -torch.inf
            if allowed is not None:
                scores[:, ~allowed] = -torch.inf
            items, values = topk_items(scores, k)
            items = torch.where(torch.isinf(values) & (values < 0), torch.full_like(items, -1), items)
            out_items.append(items)
            out_scores.append(values)
        return torch.cat(out_items), torch.cat(out_scores)

    def _category_mask(self, category: str | None) -> torch.Tensor | None:
        if category is None:
            return None
        if len(category) < 2 or category[0] not in "+-":
            raise RecalignError(f"category filter must look like '+Name' or '-Name', got {category!r}")
        members = self.category_items_.get(category[1:])
        if members is None:
            raise RecalignError(f"unknown category {category[1:]!r}")
        mask = torch.zeros(self.n_items_, dtype=torch.bool)
        mask[torch.as_tensor(members, dtype=torch.long)] = True
        return mask if category[0] == "+" else ~mask

    def _remember_catalog(self, dataset: Dataset) -> None:
        """Store what recommend needs from the dataset (sizes, categories)."""
        self.n_users_ = dataset.n_users
        self.n_items_ = dataset.n_items
        self.category_items_ = {c: v.tolist() for c, v in dataset.category_index().items()}

    def _finish_fit(self, monitor) -> None:
        """Copy a teacher's training record (`teachers.training.EpochMonitor`) into its fitted attributes."""
        self.loss_history_: list[float] = monitor.losses
        self.valid_history_: list[tuple[int, float]] = monitor.valid
        self.best_epoch_ = monitor.best_epoch
        self.epochs_trained_ = len(monitor.losses)
        self.curve_ = monitor.curve.rows

    def _check_fitted(self) -> None:
        if not hasattr(self, "n_items_"):
            raise RecalignError(f"{self.name} is not fitted: call fit() or load() first")

    # ---- persistence: config.json + tensors.pt (loaded with weights_only=True, never plain pickle) ----
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Learned tensors to save; subclasses extend."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore learned tensors; subclasses extend."""

    def save(self, directory: str | os.PathLike) -> Path:
        """Write teacher.json (name, config, catalog sizes, categories) and tensors.pt into `directory`.

        Each file is written under a temporary name and renamed into place (recalign.io), tensors first.
        """
        self._check_fitted()
        out = make_dirs(directory)
        meta = {"teacher": self.name, "config": self.config.model_dump(), "n_users": self.n_users_,
                "n_items": self.n_items_, "category_items": self.category_items_}
        with atomic_path(out / "tensors.pt") as tmp:
            torch.save(self.state_tensors(), tmp)
        write_json(out / "teacher.json", meta, indent=None)
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Recommender":
        """Read a folder written by `save`."""
        path = Path(directory)
        meta = read_json(path / "teacher.json")
        if meta["teacher"] != cls.name:
            raise RecalignError(f"{path}: holds a {meta['teacher']} teacher, not {cls.name}")
        model = cls(cls.Config(**meta["config"]))
        model.n_users_, model.n_items_ = meta["n_users"], meta["n_items"]
        model.category_items_ = meta["category_items"]
        model.load_state_tensors(torch.load(path / "tensors.pt", weights_only=True))
        return model


def _first_error(exc: Exception) -> str:
    errors = getattr(exc, "errors", None)
    if callable(errors):
        first = errors()[0]
        loc = ".".join(str(x) for x in first.get("loc", ()))
        return f"field '{loc}': {first.get('msg')}"
    return str(exc)
