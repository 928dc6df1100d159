"""The Dataset every recalign method reads: items, users, interactions; saved as Parquet + dataset.json."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch

from recalign.data.rawfile import check_raw_file
from recalign.errors import DataError
from recalign.io import atomic_folder, read_json

ITEM_COLUMNS = ["item_id", "original_id", "title", "categories", "text"]
USER_COLUMNS = ["user_id", "original_id"]
INTERACTION_COLUMNS = ["user_id", "item_id", "timestamp", "rating"]
FORMAT_VERSION = 1


def sha256_file(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Dataset:
    """Items, users and interactions with dense ids 0..n-1; original ids and titles live in the tables.

    items:        item_id, original_id (str), title (str), categories (list[str]), text (str)
    users:        user_id, original_id (str), then any user feature columns the source has (e.g. gender, age)
    interactions: user_id, item_id, timestamp (int64; sequence position where the source has no time), rating
    info:         name, source, raw_files {name: sha256}, options, counts, warnings (list of str)
    """

    items: pd.DataFrame
    users: pd.DataFrame
    interactions: pd.DataFrame
    info: dict = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def name(self) -> str:
        return self.info.get("name", "dataset")

    def warn(self, message: str) -> None:
        """Record a data warning (kept in dataset.json and shown by `recalign data stats`)."""
        self.info.setdefault("warnings", []).append(message)

    def titles(self) -> list[str]:
        """Item titles indexed by dense item id."""
        return self.items["title"].tolist()

    def item_categories(self) -> list[list[str]]:
        """Category lists indexed by dense item id."""
        return [list(c) for c in self.items["categories"]]

    def category_index(self) -> dict[str, np.ndarray]:
        """Category name -> sorted array of item ids carrying it."""
        index: dict[str, list[int]] = {}
        for item, cats in zip(self.items["item_id"].to_numpy(), self.items["categories"]):
            for c in cats:
                index.setdefault(str(c), []).append(int(item))
        return {c: np.asarray(v, dtype=np.int64) for c, v in index.items()}

    def sequences(self, interactions: pd.DataFrame | None = None) -> "UserSequences":
        """Per-user item sequences in time order (stable), from `interactions` or the whole dataset."""
        frame = self.interactions if interactions is None else interactions
        return UserSequences.from_interactions(frame, self.n_users, self.n_items)

    def fingerprint(self) -> str:
        """A short hash of the dataset content, recorded in run folders."""
        digest = hashlib.sha256()
        for frame in (self.interactions[INTERACTION_COLUMNS],):
            digest.update(pd.util.hash_pandas_object(frame, index=False).to_numpy().tobytes())
        digest.update(json.dumps([self.n_users, self.n_items, self.info.get("raw_files", {})], sort_keys=True).encode())
        return digest.hexdigest()[:16]

    def timestamp_ties(self) -> float:
        """Share of a user's consecutive interactions (in time order) that have the same timestamp as the one
        before: their order, and so a leave-one-out target among them, is the file's row order, not time."""
        frame = self.interactions
        if len(frame) < 2:
            return 0.0
        users, stamps = frame["user_id"].to_numpy(), frame["timestamp"].to_numpy()
        order = np.lexsort((stamps, users))
        users, stamps = users[order], stamps[order]
        same_user = users[1:] == users[:-1]
        pairs = int(same_user.sum())
        return float((same_user & (stamps[1:] == stamps[:-1])).sum() / pairs) if pairs else 0.0

    def stats(self) -> dict:
        """Counts, density, sequence-length quantiles, the share of timestamp ties, and data warnings (a tie
        warning when more than 5% of consecutive interactions share a timestamp)."""
        lengths = np.diff(self.sequences().indptr)
        ties = self.timestamp_ties()
        warnings = list(self.info.get("warnings", []))
        if ties > 0.05:
            warnings.append(f"{ties:.0%} of consecutive interactions of a user share a timestamp: their order "
                            "is the file's row order, so sequence models and leave-one-out targets see an "
                            "arbitrary order among them")
        q = np.quantile(lengths, [0.0, 0.25, 0.5, 0.75, 0.9, 1.0]) if len(lengths) else np.zeros(6)
        n_inter = len(self.interactions)
        return {
            "name": self.name,
            "source": self.info.get("source"),
            "users": self.n_users,
            "items": self.n_items,
            "interactions": n_inter,
            "density": n_inter / max(1, self.n_users * self.n_items),
            "items_with_title": int((self.items["title"].str.len() > 0).sum()),
            "categories": len(self.category_index()),
            "sequence_length": {
                "min": int(q[0]), "p25": float(q[1]), "median": float(q[2]), "p75": float(q[3]),
                "p90": float(q[4]), "max": int(q[5]), "mean": float(lengths.mean()) if len(lengths) else 0.0,
            },
            "timestamp_ties": ties,
            "user_features": [c for c in self.users.columns if c not in USER_COLUMNS],
            "warnings": warnings,
        }

    # ---- persistence -------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike) -> Path:
        """Write items/users/interactions Parquet + dataset.json atomically (a temp folder renamed into place)."""
        out = Path(directory)
        with atomic_folder(out) as tmp:
            self.items.to_parquet(tmp / "items.parquet", index=False)
            self.users.to_parquet(tmp / "users.parquet", index=False)
            self.interactions.to_parquet(tmp / "interactions.parquet", index=False)
            info = dict(self.info)
            info.update(format_version=FORMAT_VERSION, counts={
                "users": self.n_users, "items": self.n_items, "interactions": len(self.interactions)})
            info["fingerprint"] = self.fingerprint()
            (tmp / "dataset.json").write_text(json.dumps(info, indent=2, sort_keys=True))
        return out

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "Dataset":
        """Read a folder written by `save`."""
        path = Path(directory)
        meta = path / "dataset.json"
        if not meta.is_file():
            raise DataError("not a prepared dataset folder (no dataset.json); run `recalign data prepare` first",
                            path=path)
        for name in ("dataset.json", "items.parquet", "users.parquet", "interactions.parquet"):
            if (path / name).is_file():  # a clone without `git lfs pull` holds pointer files
                check_raw_file(path / name)
        try:
            info = read_json(meta)
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", path=meta, line=exc.lineno) from None
        try:
            items = pd.read_parquet(path / "items.parquet")
            users = pd.read_parquet(path / "users.parquet")
            interactions = pd.read_parquet(path / "interactions.parquet")
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read Parquet table: {exc}", path=path) from None
        items["categories"] = items["categories"].map(lambda c: [str(x) for x in c] if c is not None else [])
        return cls(items=items, users=users, interactions=interactions, info=info)


def build_dataset(
    interactions: pd.DataFrame,
    *,
    items: pd.DataFrame | None = None,
    name: str,
    source: str,
    raw_files: Iterable[str | os.PathLike] = (),
    options: dict | None = None,
    keep_items_without_interactions: bool = True,
    users: pd.DataFrame | None = None,
    drop_duplicate_rows: bool = True,
) -> Dataset:
    """Build a Dataset from frames with *original* ids; assigns dense ids.

    interactions: columns user, item (any hashable original ids), optional timestamp, rating.
    items:        optional item metadata with column item (original id) and optional title, categories, text.
    users:        optional user features with column user (original id); other columns are kept in the user table.
    Dense item ids follow the order of `items` (then unseen interaction items by first appearance);
    dense user ids follow first appearance in `interactions`. Rows without a timestamp get their position
    within the user's sequence (the row order) as timestamp. No interactions is an error; exactly repeated rows
    (same user, item, timestamp and rating) are dropped (kept when `drop_duplicate_rows` is false) with a warning
    in `info["warnings"]`.
    """
    raw_files = list(raw_files)
    inter, warnings = _clean_interactions(interactions, source, raw_files, drop_duplicate_rows)
    items = _ordered_items(items, inter, keep_items_without_interactions)
    item_ids = pd.Index(items["item"])
    user_ids = pd.Index(pd.unique(inter["user"]))
    item_table = _item_table(items, item_ids)
    user_table = _user_table(user_ids, users)
    inter_table = pd.DataFrame({
        "user_id": user_ids.get_indexer(inter["user"]).astype(np.int64),
        "item_id": item_ids.get_indexer(inter["item"]).astype(np.int64),
        "timestamp": pd.to_numeric(inter["timestamp"]).astype(np.int64).to_numpy(),
        "rating": pd.to_numeric(inter["rating"]).astype(np.float32).to_numpy(),
    })
    raw = {Path(p).name: sha256_file(p) for p in raw_files}
    info = {"name": name, "source": source, "raw_files": raw, "options": options or {}}
    if warnings:
        info["warnings"] = warnings
    return Dataset(items=item_table, users=user_table, interactions=inter_table.reset_index(drop=True), info=info)


def _clean_interactions(interactions: pd.DataFrame, source: str, raw_files: list, drop_duplicate_rows: bool
                        ) -> tuple[pd.DataFrame, list[str]]:
    """(a copy with str user/item ids, a timestamp and a rating column, repeated rows dropped unless kept;
    the warnings about repeated rows)."""
    inter = interactions.copy()
    for col in ("user", "item"):
        if col not in inter.columns:
            raise DataError(f"interactions need a '{col}' column", field=col)
    if not len(inter):
        raise DataError(f"no interactions: source '{source}' found no usable rows (empty file, or every row "
                        "filtered out)", path=raw_files[0] if raw_files else None)
    inter["user"] = inter["user"].astype(str)
    inter["item"] = inter["item"].astype(str)
    if "timestamp" not in inter.columns:
        inter["timestamp"] = inter.groupby("user", sort=False).cumcount()
    if "rating" not in inter.columns:
        inter["rating"] = 1.0
    repeated = inter.duplicated(["user", "item", "timestamp", "rating"]).to_numpy()
    warnings = []
    if repeated.any() and drop_duplicate_rows:
        inter = inter[~repeated]
        warnings.append(f"dropped {int(repeated.sum())} duplicated rows (same user, item, timestamp and rating)")
    elif repeated.any():
        warnings.append(f"kept {int(repeated.sum())} duplicated rows (same user, item, timestamp and rating)")
    return inter, warnings


def _ordered_items(items: pd.DataFrame | None, inter: pd.DataFrame, keep_items_without_interactions: bool
                   ) -> pd.DataFrame:
    """The item rows in dense-id order: `items` (str ids, first of repeats), then interaction items it lacks."""
    if items is None:
        items = pd.DataFrame({"item": pd.unique(inter["item"])})
    items = items.copy()
    items["item"] = items["item"].astype(str)
    items = items.drop_duplicates("item", keep="first")
    if not keep_items_without_interactions:
        items = items[items["item"].isin(set(inter["item"]))]
    missing = pd.unique(inter.loc[~inter["item"].isin(set(items["item"])), "item"])
    if len(missing):
        items = pd.concat([items, pd.DataFrame({"item": missing})], ignore_index=True)
    return items


def _item_table(items: pd.DataFrame, item_ids: pd.Index) -> pd.DataFrame:
    """ITEM_COLUMNS: dense ids, original ids, and title / categories / text ("" / [] where missing)."""
    title = items["title"] if "title" in items.columns else pd.Series([""] * len(items))
    text = items["text"] if "text" in items.columns else pd.Series([""] * len(items))
    cats = items["categories"] if "categories" in items.columns else pd.Series([[]] * len(items))
    return pd.DataFrame({
        "item_id": np.arange(len(items), dtype=np.int64),
        "original_id": item_ids.astype(str),
        "title": title.fillna("").astype(str).to_numpy(),
        "categories": [list(map(str, c)) if isinstance(c, (list, tuple, np.ndarray)) else [] for c in cats],
        "text": text.fillna("").astype(str).to_numpy(),
    })


def _user_table(user_ids: pd.Index, users: pd.DataFrame | None) -> pd.DataFrame:
    """USER_COLUMNS, then the feature columns of `users` joined on the original id (first row per user)."""
    user_table = pd.DataFrame({"user_id": np.arange(len(user_ids), dtype=np.int64),
                               "original_id": user_ids.astype(str)})
    if users is not None:
        features = users.assign(user=users["user"].astype(str)).drop_duplicates("user").set_index("user")
        features = features.drop(columns=[c for c in USER_COLUMNS if c in features.columns])
        user_table = user_table.join(features, on="original_id")
    return user_table


@dataclass(frozen=True)
class UserSequences:
    """Per-user item sequences in CSR form: items of user u are items[indptr[u]:indptr[u+1]], in time order."""

    indptr: np.ndarray
    items: np.ndarray
    n_items: int

    @classmethod
    def from_interactions(cls, interactions: pd.DataFrame, n_users: int, n_items: int) -> "UserSequences":
        """Sort by (user, timestamp) with a stable sort, so equal timestamps keep file order."""
        frame = interactions[["user_id", "item_id", "timestamp"]]
        order = np.lexsort((frame["timestamp"].to_numpy(), frame["user_id"].to_numpy()))
        users = frame["user_id"].to_numpy()[order]
        items = frame["item_id"].to_numpy()[order].astype(np.int64)
        counts = np.bincount(users, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        return cls(indptr=indptr, items=items, n_items=n_items)

    @property
    def n_users(self) -> int:
        return len(self.indptr) - 1

    def __getitem__(self, user: int) -> np.ndarray:
        return self.items[self.indptr[user]:self.indptr[user + 1]]

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def concat(self, other: "UserSequences") -> "UserSequences":
        """Append `other`'s items after this one's, user by user (e.g. train + valid as test history)."""
        la, lb = self.lengths(), other.lengths()
        indptr = np.zeros_like(self.indptr)
        np.cumsum(la + lb, out=indptr[1:])
        items = np.empty(indptr[-1], dtype=np.int64)
        pos_a = np.repeat(indptr[:-1], la) + (np.arange(la.sum()) - np.repeat(self.indptr[:-1], la))
        pos_b = np.repeat(indptr[:-1] + la, lb) + (np.arange(lb.sum()) - np.repeat(other.indptr[:-1], lb))
        items[pos_a] = self.items
        items[pos_b] = other.items
        return UserSequences(indptr=indptr, items=items, n_items=self.n_items)

    def padded(self, users: Sequence[int] | np.ndarray, max_len: int, pad: int = -1) -> torch.Tensor:
        """Last `max_len` items of each user, left-padded with `pad`: LongTensor [len(users), max_len]."""
        users = np.asarray(users, dtype=np.int64)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        starts = np.maximum(starts, ends - max_len)
        lens = ends - starts
        out = np.full((len(users), max_len), pad, dtype=np.int64)
        rows = np.repeat(np.arange(len(users)), lens)
        cols = max_len - np.repeat(lens, lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))
        out[rows, cols] = self.items[np.repeat(starts, lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))]
        return torch.from_numpy(out)

    def mask_coordinates(self, users: Sequence[int] | np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, item) index pairs of the given users' history items, for masking a score matrix."""
        users = np.asarray(users, dtype=np.int64)
        starts, ends = self.indptr[users], self.indptr[users + 1]
        lens = ends - starts
        rows = np.repeat(np.arange(len(users)), lens)
        offsets = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
        cols = self.items[np.repeat(starts, lens) + offsets]
        return torch.from_numpy(rows), torch.from_numpy(cols)
