"""Train/valid/test splits (leave-one-out, global temporal, random, cold-start windows) and k-core filtering
(docs/metrics.md §3)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from recalign.data.dataset import INTERACTION_COLUMNS, Dataset
from recalign.errors import ConfigError

# Order in which parts happen; `Split.history(part)` is everything before `part` in this order.
PART_ORDER = ("train", "train2", "valid", "test")


@dataclass
class Split:
    """Interaction frames (dense ids) per part; `extra` holds further parts such as TRD's "train2".

    info: what the split did (sizes, cut timestamps, users/items first seen in a later part, ...).
    """

    name: str
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    extra: dict[str, pd.DataFrame] = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    def part(self, name: str) -> pd.DataFrame:
        """The frame of one part by name ("train", "valid", "test" or a key of `extra`)."""
        if name in ("train", "valid", "test"):
            return getattr(self, name)
        if name in self.extra:
            return self.extra[name]
        raise ConfigError(f"split {self.name!r} has no part {name!r}; parts: {', '.join(self.parts())}")

    def parts(self) -> list[str]:
        """Part names in time order (train, train2 when present, valid, test, then other extras)."""
        known = [p for p in PART_ORDER if p in ("train", "valid", "test") or p in self.extra]
        return known + [p for p in self.extra if p not in known]

    def history(self, part: str) -> pd.DataFrame:
        """All interactions that precede `part`: valid -> train (+ train2); test -> train + train2 + valid."""
        if part not in PART_ORDER:
            self.part(part)  # raises for unknown names
            before = ["train"]
        else:
            before = [p for p in PART_ORDER[:PART_ORDER.index(part)] if p in ("train", "valid") or p in self.extra]
        frames = [self.part(p) for p in before]
        if not frames:
            return self.train.iloc[:0].copy()
        return pd.concat(frames, ignore_index=True)


def _check_fractions(fractions: tuple[float, ...], count: int, kind: str) -> np.ndarray:
    values = np.asarray(fractions, dtype=np.float64)
    if len(values) != count:
        raise ConfigError(f"split.fractions: {kind} takes {count} fractions, got {len(values)}")
    if (values < 0).any() or not np.isclose(values.sum(), 1.0, atol=1e-6):
        raise ConfigError(f"split.fractions: {kind} fractions must be >= 0 and sum to 1, got {list(fractions)}")
    return values


def _frame(inter: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    return inter.iloc[rows].reset_index(drop=True)


def leave_one_out_split(dataset: Dataset) -> Split:
    """Per user, time-sorted (stable): last = test, second-to-last = valid, rest = train.

    Users with fewer than 3 interactions keep everything in train (they have no valid/test row).
    """
    inter = dataset.interactions[INTERACTION_COLUMNS]
    users = inter["user_id"].to_numpy()
    # lexsort is stable: equal (user, timestamp) keep file order, as in UserSequences.
    order = np.lexsort((inter["timestamp"].to_numpy(), users))
    sorted_users = users[order]
    counts = np.bincount(users, minlength=dataset.n_users)
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    from_end = counts[sorted_users] - 1 - (np.arange(len(order)) - starts[sorted_users])
    eligible = counts[sorted_users] >= 3
    test_rows = order[eligible & (from_end == 0)]
    valid_rows = order[eligible & (from_end == 1)]
    train_rows = order[~eligible | (from_end >= 2)]
    info = {"kind": "leave_one_out", "users_all_in_train": int(((counts > 0) & (counts < 3)).sum()),
            "sizes": {"train": len(train_rows), "valid": len(valid_rows), "test": len(test_rows)}}
    return Split(name="leave_one_out", train=_frame(inter, train_rows), valid=_frame(inter, valid_rows),
                 test=_frame(inter, test_rows), info=info)


def _first_seen_report(parts: dict[str, pd.DataFrame]) -> dict:
    """Per later part: users/items absent from every earlier part, and absent from the first (training) part."""
    names = list(parts)
    seen_users, seen_items = set(), set()
    train_users = set(parts[names[0]]["user_id"].tolist())
    train_items = set(parts[names[0]]["item_id"].tolist())
    only_later, not_in_train = {}, {}
    for i, name in enumerate(names):
        u = set(parts[name]["user_id"].tolist())
        it = set(parts[name]["item_id"].tolist())
        if i > 0:
            only_later[name] = {"users": len(u - seen_users), "items": len(it - seen_items)}
            not_in_train[name] = {"users": len(u - train_users), "items": len(it - train_items)}
        seen_users |= u
        seen_items |= it
    return {"new_in_part": only_later, "not_in_first_part": not_in_train}


def global_temporal_split(dataset: Dataset, fractions: tuple[float, ...] = (0.6, 0.1, 0.1, 0.2)) -> Split:
    """Global split of all interactions by timestamp (stable): train (train1), extra["train2"], valid, test.

    A cut never separates equal timestamps: interactions sharing the timestamp at a cut go to the earlier part.
    `info` reports the cut timestamps and the users/items that first appear in a later part.
    """
    values = _check_fractions(tuple(fractions), 4, "global_temporal")
    inter = dataset.interactions[INTERACTION_COLUMNS]
    ts = inter["timestamp"].to_numpy()
    order = np.argsort(ts, kind="stable")
    ts_sorted = ts[order]
    n = len(order)
    cuts = []
    previous = 0
    for frac in np.cumsum(values)[:-1]:
        cut = int(round(frac * n))
        if cut > 0:
            # Move the cut past every interaction that shares the timestamp of the earlier part's last row.
            cut = int(np.searchsorted(ts_sorted, ts_sorted[cut - 1], side="right"))
        cut = max(cut, previous)
        cuts.append(cut)
        previous = cut
    bounds = [0, *cuts, n]
    names = ["train", "train2", "valid", "test"]
    parts = {name: _frame(inter, order[bounds[i]:bounds[i + 1]]) for i, name in enumerate(names)}
    info = {
        "kind": "global_temporal",
        "fractions": [float(v) for v in values],
        "sizes": {name: len(frame) for name, frame in parts.items()},
        "cut_timestamps": [int(ts_sorted[c - 1]) if c > 0 else None for c in cuts],
        **_first_seen_report(parts),
    }
    return Split(name="global_temporal", train=parts["train"], valid=parts["valid"], test=parts["test"],
                 extra={"train2": parts["train2"]}, info=info)


def random_split(dataset: Dataset, fractions: tuple[float, ...] = (0.8, 0.1, 0.1), seed: int = 0) -> Split:
    """Random split of interactions into train/valid/test by `fractions` (seeded); rows keep dataset order."""
    values = _check_fractions(tuple(fractions), 3, "random")
    inter = dataset.interactions[INTERACTION_COLUMNS]
    n = len(inter)
    perm = np.random.default_rng(seed).permutation(n)
    cuts = [int(round(c * n)) for c in np.cumsum(values)[:-1]]
    bounds = [0, *cuts, n]
    rows = [np.sort(perm[bounds[i]:bounds[i + 1]]) for i in range(3)]
    parts = dict(zip(("train", "valid", "test"), (_frame(inter, r) for r in rows)))
    info = {"kind": "random", "fractions": [float(v) for v in values], "seed": seed,
            "sizes": {name: len(frame) for name, frame in parts.items()}, **_first_seen_report(parts)}
    return Split(name="random", train=parts["train"], valid=parts["valid"], test=parts["test"], info=info)


def kcore_filter(dataset: Dataset, k_user: int, k_item: int) -> Dataset:
    """Keep interactions whose user has >= k_user and item >= k_item interactions, iterated to a fixed point.

    Returns a new Dataset with dense ids re-assigned in the old id order; item metadata is kept.
    Users/items left with fewer interactions than their k (including zero) are dropped.
    """
    inter = dataset.interactions
    users = inter["user_id"].to_numpy()
    items = inter["item_id"].to_numpy()
    keep = np.ones(len(inter), dtype=bool)
    iterations = 0
    while True:
        iterations += 1
        user_counts = np.bincount(users[keep], minlength=dataset.n_users)
        item_counts = np.bincount(items[keep], minlength=dataset.n_items)
        new_keep = keep & (user_counts[users] >= k_user) & (item_counts[items] >= k_item)
        if (new_keep == keep).all():
            break
        keep = new_keep
    kept_users = np.flatnonzero(user_counts >= k_user)
    kept_items = np.flatnonzero(item_counts >= k_item)
    user_map = np.full(dataset.n_users, -1, dtype=np.int64)
    user_map[kept_users] = np.arange(len(kept_users))
    item_map = np.full(dataset.n_items, -1, dtype=np.int64)
    item_map[kept_items] = np.arange(len(kept_items))

    new_inter = inter.loc[keep].reset_index(drop=True).copy()
    new_inter["user_id"] = user_map[new_inter["user_id"].to_numpy()]
    new_inter["item_id"] = item_map[new_inter["item_id"].to_numpy()]
    # Item/user tables are indexed by dense id, so row i describes id i.
    items_table = dataset.items.sort_values("item_id", kind="stable").iloc[kept_items].reset_index(drop=True)
    items_table["item_id"] = np.arange(len(kept_items), dtype=np.int64)
    users_table = dataset.users.sort_values("user_id", kind="stable").iloc[kept_users].reset_index(drop=True)
    users_table["user_id"] = np.arange(len(kept_users), dtype=np.int64)
    info = dict(dataset.info)
    info["options"] = {**info.get("options", {}), "kcore": [int(k_user), int(k_item)]}
    info["kcore"] = {"k_user": int(k_user), "k_item": int(k_item), "iterations": iterations,
                     "removed_interactions": int((~keep).sum()),
                     "removed_users": int(dataset.n_users - len(kept_users)),
                     "removed_items": int(dataset.n_items - len(kept_items))}
    return Dataset(items=items_table, users=users_table, interactions=new_inter, info=info)


def cold_start_split(dataset: Dataset, min_items: int = 2, max_items: int = 4, seed: int = 0) -> Split:
    """Cold-start users: each user keeps only a window of their last L interactions, L seeded in [min, max].

    history = the window minus its last item (part `train`, 1 to max-1 items per user), target = the window's last
    item (part `test`); `valid` is empty. Users with fewer than `min_items` interactions are dropped; a user with
    fewer than L keeps all of them. Interactions before the window are not used (the user is new).
    """
    if min_items < 2 or max_items < min_items:
        raise ConfigError(f"split.window: needs 2 <= min <= max, got [{min_items}, {max_items}]")
    inter = dataset.interactions[INTERACTION_COLUMNS]
    users = inter["user_id"].to_numpy()
    order = np.lexsort((inter["timestamp"].to_numpy(), users))  # stable: equal timestamps keep file order
    sorted_users = users[order]
    counts = np.bincount(users, minlength=dataset.n_users)
    starts = np.zeros(len(counts), dtype=np.int64)
    np.cumsum(counts[:-1], out=starts[1:])
    from_end = counts[sorted_users] - 1 - (np.arange(len(order)) - starts[sorted_users])
    window = np.minimum(np.random.default_rng(seed).integers(min_items, max_items + 1, size=len(counts)), counts)
    eligible = counts[sorted_users] >= min_items
    in_window = eligible & (from_end < window[sorted_users])
    test_rows = order[in_window & (from_end == 0)]
    train_rows = order[in_window & (from_end > 0)]
    info = {"kind": "cold_start", "window": [int(min_items), int(max_items)], "seed": int(seed),
            "users": int(len(test_rows)), "users_dropped": int(((counts > 0) & (counts < min_items)).sum()),
            "sizes": {"train": len(train_rows), "valid": 0, "test": len(test_rows)}}
    return Split(name="cold_start", train=_frame(inter, train_rows), valid=_frame(inter, order[:0]),
                 test=_frame(inter, test_rows), info=info)
