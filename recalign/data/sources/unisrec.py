"""UniSRec / VQ-Rec processed Amazon data (RecBole atomic files): `X.text`, `X.{train,valid,test}.inter`,
`X.item2index`, `X.user2index`.

The `.inter` files hold (user index, space-separated history, target) rows: every prefix of the training sequence
in `train`, the second-to-last item in `valid`, the last in `test`; histories are cut to the last 50 items. A user's
full sequence is rebuilt as train's length-1 history followed by the train targets (rows are written latest first),
the valid target and the test target, which also recovers items cut from long histories; it is checked against the test
row's history. Users without train rows fall back to the test row (history + target).

Titles: `X.text` holds "title. categories. brand. " per item, so the title is what precedes the last two sentences
(this keeps titles such as "24 Oz. Sprayer Bottles" whole); a text with fewer sentences yields its first sentence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.sources import Source, SourceConfig
from recalign.data.sources.tabular import read_delimited
from recalign.errors import ConfigError, DataError

_SUFFIXES = (".text", ".train.inter", ".valid.inter", ".test.inter", ".item2index", ".user2index")


class UniSRecSourceConfig(SourceConfig):
    """Which dataset of a folder to read."""

    name: str | None = Field(None, description="dataset name inside the folder, e.g. Scientific (reads "
                                               "Scientific.text, ...); found automatically when the folder has one")


def _resolve(raw: Path, options: UniSRecSourceConfig) -> tuple[Path, str]:
    """(folder, dataset name) from a folder or any one of the dataset's files."""
    if raw.is_file():
        for suffix in _SUFFIXES:
            if raw.name.endswith(suffix):
                return raw.parent, raw.name[: -len(suffix)]
        raise DataError(f"not a UniSRec file (expected a name ending in one of {', '.join(_SUFFIXES)})", path=raw)
    names = sorted(p.name[: -len(".item2index")] for p in raw.glob("*.item2index"))
    if options.name is not None:
        return raw, options.name
    if len(names) == 1:
        return raw, names[0]
    if not names:
        raise DataError("no UniSRec dataset here (no NAME.item2index file)", path=raw)
    raise ConfigError(f"{raw} holds several datasets: pass name=NAME (one of: {', '.join(names)})")


def _require(folder: Path, name: str) -> Path:
    path = folder / name
    if not path.is_file():
        raise DataError("missing file", path=path)
    return path


def title_from_text(texts: pd.Series) -> pd.Series:
    """The title part of "title. categories. brand. " texts (first sentence when there are fewer parts)."""
    body = texts.str.strip().str.replace(r"\.$", "", regex=True)
    parts = body.str.rsplit(". ", n=2)
    first = body.str.split(". ", n=1).str[0]
    return pd.Series(np.where(parts.str.len() == 3, parts.str[0], first), index=texts.index)


def _read_inter(path: Path) -> pd.DataFrame:
    """Rows (user, history list of ints, target) of a `.inter` file, plus its 1-based file line."""
    frame = read_delimited(path, "\t", ["user", "history", "target"], numeric=("user", "target"), header=True,
                           min_columns=3)
    history = frame["history"].str.split()
    flat = pd.to_numeric(history.explode(), errors="coerce")
    if flat.isna().any():
        row = int(np.flatnonzero(flat.isna().groupby(level=0).any().to_numpy())[0])
        raise DataError(f"expected space-separated item indexes, got {frame['history'].iloc[row]!r}", path=path,
                        line=row + 2, field="item_id_list")
    frame["history"] = history.map(lambda h: np.asarray(h, dtype=np.int64))
    frame["length"] = history.str.len()
    return frame.astype({"user": np.int64, "target": np.int64})


def load_unisrec(raw: Path, options: UniSRecSourceConfig) -> Dataset:
    """Items in item2index order (dense id = index), users in user2index order, full per-user sequences."""
    folder, name = _resolve(raw, options)
    item_path, user_path = _require(folder, f"{name}.item2index"), _require(folder, f"{name}.user2index")
    test_path = _require(folder, f"{name}.test.inter")
    items, users = _read_indexes(item_path, user_path)
    item_ids, user_ids = items["asin"].to_numpy(), users["reviewer"].to_numpy()
    files = [item_path, user_path, test_path]

    test = _read_inter(test_path)
    train_path, valid_path = folder / f"{name}.train.inter", folder / f"{name}.valid.inter"
    rebuilt, parts = np.zeros(len(users), dtype=bool), []
    if train_path.is_file() and valid_path.is_file():
        train, valid = _read_inter(train_path), _read_inter(valid_path)
        files += [train_path, valid_path]
        rebuilt, parts = _train_valid_parts(train, valid, test, len(users))
    seq = _full_sequences(parts + _test_parts(test, rebuilt))
    _check_against_test(seq, test, test_path)
    _check_bounds(seq, len(items), len(users), item_path, user_path, test_path)

    interactions = pd.DataFrame({"user": user_ids[seq["user"].to_numpy()], "item": item_ids[seq["item"].to_numpy()],
                                 "timestamp": seq["timestamp"].to_numpy()})
    catalog = _read_catalog(item_ids, folder / f"{name}.text", files)
    return build_dataset(interactions, items=catalog, name=name, source="unisrec", raw_files=files,
                         options=options.model_dump())


def _read_indexes(item_path: Path, user_path: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The item2index (asin, index) and user2index (reviewer, index) tables, sorted by index; both read before
    either is checked to hold the indexes 0..n-1."""
    items = read_delimited(item_path, "\t", ["asin", "index"], numeric=("index",)).sort_values("index")
    users = read_delimited(user_path, "\t", ["reviewer", "index"], numeric=("index",)).sort_values("index")
    for table, path in ((items, item_path), (users, user_path)):
        if not np.array_equal(table["index"].to_numpy(), np.arange(len(table))):
            raise DataError("indexes must be 0..n-1 without gaps or repeats", path=path, field="index")
    return items, users


def _train_valid_parts(train: pd.DataFrame, valid: pd.DataFrame, test: pd.DataFrame, n_users: int
                       ) -> tuple[np.ndarray, list[pd.DataFrame]]:
    """(users rebuilt from train + valid, their (user, item, order key) frames up to the valid target).

    A user is rebuilt when it has a length-1 train row, a valid row and a test row; the order key sorts the pieces
    of one sequence.
    """
    rebuilt = np.zeros(n_users, dtype=bool)
    starts = train[train["length"] == 1]
    rebuilt[starts["user"].to_numpy()] = True
    rebuilt &= np.isin(np.arange(n_users), valid["user"]) & np.isin(np.arange(n_users), test["user"])
    keep = lambda frame: frame[rebuilt[frame["user"].to_numpy()]]  # noqa: E731
    starts, train, valid = keep(starts), keep(train), keep(valid)
    parts = [
        pd.DataFrame({"user": starts["user"], "item": starts["history"].map(lambda h: h[0]), "key": 0}),
        # rows are written latest first; once histories hit the 50-item cut only that order tells them apart
        pd.DataFrame({"user": train["user"], "item": train["target"],
                      "key": 1 + train.groupby("user").cumcount(ascending=False)}),
        pd.DataFrame({"user": valid["user"], "item": valid["target"], "key": 1 << 40}),
    ]
    return rebuilt, parts


def _test_parts(test: pd.DataFrame, rebuilt: np.ndarray) -> list[pd.DataFrame]:
    """(user, item, order key) frames from the test rows: the target of rebuilt users; history + target of the
    others (the fallback)."""
    rebuilt_test = test[rebuilt[test["user"].to_numpy()]]
    parts = [pd.DataFrame({"user": rebuilt_test["user"], "item": rebuilt_test["target"], "key": 1 << 41})]
    fallback = test[~rebuilt[test["user"].to_numpy()]]
    if len(fallback):
        hist = fallback[["user", "history"]].explode("history")
        hist["key"] = hist.groupby(level=0).cumcount()
        parts += [pd.DataFrame({"user": hist["user"], "item": hist["history"].astype(np.int64), "key": hist["key"]}),
                  pd.DataFrame({"user": fallback["user"], "item": fallback["target"], "key": 1 << 41})]
    return parts


def _full_sequences(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The pieces in (user, order key) order, with each item's sequence position as timestamp."""
    seq = pd.concat(parts, ignore_index=True).sort_values(["user", "key"], kind="stable")
    seq["timestamp"] = seq.groupby("user").cumcount()
    return seq


def _check_bounds(seq: pd.DataFrame, n_items: int, n_users: int, item_path: Path, user_path: Path,
                  test_path: Path) -> None:
    """Every item and user index of the sequences must be a row of item2index / user2index."""
    for column, bound, path in (("item", n_items, item_path), ("user", n_users, user_path)):
        values = seq[column].to_numpy()
        if len(values) and (values.min() < 0 or values.max() >= bound):
            raise DataError(f"{column} index {int(values.max())} is not in {path.name} (0..{bound - 1})",
                            path=test_path)


def _read_catalog(item_ids: np.ndarray, text_path: Path, files: list[Path]) -> pd.DataFrame:
    """Items (original ids) with text and title from `X.text` when it exists (then appended to `files`)."""
    catalog = pd.DataFrame({"item": item_ids})
    if text_path.is_file():
        text = read_delimited(text_path, "\t", ["asin", "text"], header=True, min_columns=1)
        text = text.drop_duplicates("asin").set_index("asin")["text"]
        catalog["text"] = catalog["item"].map(text).fillna("")
        catalog["title"] = title_from_text(catalog["text"])
        files.append(text_path)
    return catalog


def _check_against_test(seq: pd.DataFrame, test: pd.DataFrame, test_path: Path) -> None:
    """Each test row's history + target must be the tail of the rebuilt sequence (vectorised comparison)."""
    lengths = seq.groupby("user").size()
    expected = test[["user", "history", "target"]].copy()
    expected["full"] = [np.append(h, t) for h, t in zip(expected["history"], expected["target"])]
    flat = expected[["user", "full"]].explode("full")
    flat["from_end"] = flat.groupby(level=0).cumcount(ascending=False)
    flat["position"] = lengths.reindex(flat["user"]).to_numpy() - 1 - flat["from_end"].to_numpy()
    got = seq.set_index(["user", "timestamp"])["item"]
    index = pd.MultiIndex.from_arrays([flat["user"].to_numpy(), flat["position"].to_numpy()])
    actual = got.reindex(index).to_numpy()
    bad = (flat["position"].to_numpy() < 0) | (actual != flat["full"].to_numpy().astype(np.int64))
    if bad.any():
        row = int(flat.index[np.flatnonzero(bad)[0]])
        raise DataError(f"user {int(test['user'].iloc[row])}: test history does not continue the train/valid "
                        "sequence", path=test_path, line=row + 2, field="item_id_list")


UNISREC = Source("unisrec", UniSRecSourceConfig, load_unisrec,
                 "UniSRec/VQ-Rec processed Amazon folder: NAME.text, NAME.{train,valid,test}.inter, "
                 "NAME.item2index, NAME.user2index")
