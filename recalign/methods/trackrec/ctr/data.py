"""Labelled CTR impressions from a rated Dataset: (user, item, label), time-ordered history, user features, user split."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from recalign.data.dataset import Dataset
from recalign.errors import ConfigError, DataError

__all__ = ["HISTORY_LEN", "USER_FEATURES", "Impressions", "build_impressions", "split_users", "to_batch"]

HISTORY_LEN = 10
USER_FEATURES = ("age", "gender", "occupation")  # MovieLens u.user / users.dat; used when the user table has them
AGE_BINS = np.array([18, 25, 35, 45, 50, 56])  # MovieLens-1M's age groups; ML-100K's raw ages fall into the same bins


@dataclass(frozen=True)
class Impressions:
    """One row per rated (user, item): label = rating >= threshold; arrays aligned row by row.

    history:          [N, H] item ids rated strictly before the row's timestamp, oldest first, left-padded with -1
    history_rating:   [N, H] their ratings (0 where padded)
    user_features:    [N, F] category codes per feature in `feature_names`, 1..size-1 (0 = missing)
    """

    user: np.ndarray
    item: np.ndarray
    label: np.ndarray
    rating: np.ndarray
    timestamp: np.ndarray
    history: np.ndarray
    history_rating: np.ndarray
    user_features: np.ndarray
    feature_names: tuple[str, ...]
    feature_sizes: tuple[int, ...]
    n_users: int
    n_items: int

    def __len__(self) -> int:
        return len(self.label)

    def take(self, rows: np.ndarray) -> "Impressions":
        """The impressions at the given row indices (row arrays indexed, metadata kept)."""
        arrays = {f.name: getattr(self, f.name)[rows] for f in fields(self)
                  if isinstance(getattr(self, f.name), np.ndarray)}
        return replace(self, **arrays)


def build_impressions(dataset: Dataset, history_len: int = HISTORY_LEN, threshold: float = 4.0,
                      min_history: int = 1) -> Impressions:
    """Every rating of `dataset` as an impression with the user's last `history_len` items rated before it.

    Ties in time are not "before": items rated at the same timestamp as the impression never enter its history.
    Rows with fewer than `min_history` earlier items are dropped (the first ratings of each user have none).
    """
    if history_len < 1:
        raise ConfigError(f"ctr.history_len: expected a positive integer, got {history_len}")
    inter = dataset.interactions
    if not len(inter):
        raise DataError("no interactions to build CTR impressions from", field="interactions")
    ratings = inter["rating"].to_numpy(dtype=np.float32)
    if np.all(ratings == ratings[0]) and ratings[0] == 1.0:
        raise DataError(f"dataset '{dataset.name}' has no ratings (every rating is 1): CTR labels need rated data "
                        "(label = rating >= 4)", field="rating")
    users = inter["user_id"].to_numpy(dtype=np.int64)
    times = inter["timestamp"].to_numpy(dtype=np.int64)
    order = np.lexsort((times, users))  # stable: equal (user, time) keep file order
    users, items, times, ratings = users[order], inter["item_id"].to_numpy(np.int64)[order], times[order], ratings[order]

    n = len(users)
    new_user = np.r_[True, users[1:] != users[:-1]]
    new_tie = new_user | np.r_[True, times[1:] != times[:-1]]
    user_start = np.maximum.accumulate(np.where(new_user, np.arange(n), 0))
    tie_start = np.maximum.accumulate(np.where(new_tie, np.arange(n), 0))  # first row of this (user, time) group
    # history of row r: rows [max(user_start, tie_start - H), tie_start), placed right-aligned in H slots
    idx = tie_start[:, None] - history_len + np.arange(history_len)[None, :]
    valid = idx >= user_start[:, None]
    safe = np.where(valid, idx, 0)
    history = np.where(valid, items[safe], -1)
    history_rating = np.where(valid, ratings[safe], 0.0).astype(np.float32)

    keep = (tie_start - user_start) >= min_history
    names, codes, sizes = _user_feature_codes(dataset)
    rows = np.flatnonzero(keep)
    return Impressions(
        user=users[rows], item=items[rows], label=(ratings[rows] >= threshold).astype(np.float32),
        rating=ratings[rows], timestamp=times[rows], history=history[rows].astype(np.int64),
        history_rating=history_rating[rows], user_features=codes[users[rows]], feature_names=names,
        feature_sizes=sizes, n_users=dataset.n_users, n_items=dataset.n_items)


def _user_feature_codes(dataset: Dataset) -> tuple[tuple[str, ...], np.ndarray, tuple[int, ...]]:
    """(names, [n_users, F] codes with 0 = missing, sizes) for the USER_FEATURES the user table has."""
    table = dataset.users.sort_values("user_id")
    names = tuple(c for c in USER_FEATURES if c in table.columns)
    codes = np.zeros((dataset.n_users, len(names)), dtype=np.int64)
    sizes = []
    for j, name in enumerate(names):
        column = table[name]
        missing = column.isna().to_numpy()
        if name == "age":  # ages become MovieLens-1M's 7 age groups (ML-1M already stores the group's lower bound)
            values = np.digitize(column.fillna(0).to_numpy(dtype=np.float64), AGE_BINS) + 1
            size = len(AGE_BINS) + 2
        else:
            text = column.fillna("").astype(str).to_numpy(dtype=object)
            uniques = np.unique(text[~missing].astype(str))  # sorted: the codes do not depend on row order
            values = np.searchsorted(uniques, text.astype(str)) + 1
            size = len(uniques) + 1
        codes[:, j] = np.where(missing, 0, values)
        sizes.append(size)
    return names, codes, tuple(sizes)


def split_users(impressions: Impressions, fractions: Sequence[float] = (0.8, 0.1, 0.1),
                seed: int = 0) -> dict[str, np.ndarray]:
    """Row indices of train / valid / test: a seeded random partition of the USERS (no user in two parts)."""
    fractions = [float(f) for f in fractions]
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ConfigError(f"ctr.split: expected three positive fractions summing to 1, got {fractions}")
    present = np.unique(impressions.user)
    if len(present) < 3:
        raise DataError(f"a user split needs at least 3 users, found {len(present)}", field="user")
    shuffled = np.random.default_rng(seed).permutation(present)
    bounds = np.round(np.cumsum(fractions)[:2] * len(present)).astype(int)
    bounds = np.clip(bounds, [1, 2], [len(present) - 2, len(present) - 1])
    parts = np.split(shuffled, [bounds[0], max(bounds[1], bounds[0] + 1)])
    return {name: np.flatnonzero(np.isin(impressions.user, part))
            for name, part in zip(("train", "valid", "test"), parts)}


def to_batch(impressions: Impressions, knowledge: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    """Model inputs as tensors: item [N], history [N, H] (-1 = padding), features [N, F], label [N], knowledge."""
    batch = {
        "item": torch.from_numpy(np.ascontiguousarray(impressions.item)),
        "history": torch.from_numpy(np.ascontiguousarray(impressions.history)),
        "features": torch.from_numpy(np.ascontiguousarray(impressions.user_features)),
        "label": torch.from_numpy(np.ascontiguousarray(impressions.label)),
    }
    if knowledge is not None:
        if len(knowledge) != len(impressions):
            raise DataError(f"knowledge has {len(knowledge)} rows, expected one per impression ({len(impressions)})")
        batch["knowledge"] = torch.from_numpy(np.ascontiguousarray(knowledge, dtype=np.float32))
    return batch
