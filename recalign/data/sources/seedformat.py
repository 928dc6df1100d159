"""The seed repositories' own dataset files, read with the restricted unpickler (never plain pickle.load).

- RecLM-gen raw folder: `sequential.pickle` (user -> items in time order), `meta.pickle` (item -> {"title": ...}),
  `category.pickle` (category -> items), optional `ranking_candidate.pickle` (user -> 100 negatives). The same
  content as `.json` files is accepted too. Ranking candidates are not part of a Dataset (they are per-user lists);
  `read_ranking_candidates` returns them and `info["ranking_candidates"]` says how many users have them.
- RecGPT `test.pkl` / `cold_test.pkl`: dict user (int) -> items (list of int) in time order; ids only, no titles.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.rawfile import read_raw_json
from recalign.data.safe_pickle import safe_load
from recalign.data.sources import Source, SourceConfig
from recalign.errors import DataError


def _read_mapping(folder: Path, stem: str, required: bool = True) -> tuple[dict | None, Path | None]:
    """`stem.pickle` (restricted unpickler) or `stem.json` from `folder`, which must hold a dict."""
    for path, reader in ((folder / f"{stem}.pickle", safe_load), (folder / f"{stem}.pkl", safe_load),
                         (folder / f"{stem}.json", read_raw_json)):
        if path.is_file():
            value = reader(path)
            if not isinstance(value, dict):
                raise DataError(f"expected a dict, got {type(value).__name__}", path=path)
            return value, path
    if required:
        raise DataError(f"missing file {stem}.pickle (or {stem}.json)", path=folder)
    return None, None


def flatten_sequences(sequences: dict, path: Path, what: str = "user") -> pd.DataFrame:
    """(user, item, timestamp=position) rows from a dict user -> list of items; checks the value types."""
    for key, value in sequences.items():
        if not isinstance(value, (list, tuple)):
            raise DataError(f"{what} {key!r}: expected a list of item ids, got {type(value).__name__}", path=path)
    lengths = np.fromiter((len(v) for v in sequences.values()), dtype=np.int64, count=len(sequences))
    items = list(itertools.chain.from_iterable(sequences.values()))
    try:  # fast path: numpy infers a plain int or str array when every id is one
        array = np.array(items) if items else np.zeros(0, dtype=np.int64)
        ok = array.ndim == 1 and array.dtype.kind in "iuU" and not (array.dtype.kind == "i" and (array < 0).any())
    except (ValueError, TypeError, OverflowError):
        ok = False
    if not ok:
        bad = next(i for i, x in enumerate(items) if isinstance(x, bool) or not isinstance(x, (int, str))
                   or (isinstance(x, int) and not 0 <= x < 2 ** 63))
        owner = list(sequences)[int(np.searchsorted(np.cumsum(lengths), bad, side="right"))]
        problem = (f"integer item ids must be in 0..2^63-1, got {items[bad]}" if isinstance(items[bad], int)
                   and not isinstance(items[bad], bool) else
                   f"item ids must be int or str, got {type(items[bad]).__name__}")
        raise DataError(f"{what} {owner!r}: {problem}", path=path)
    users = np.repeat(np.asarray([str(k) for k in sequences], dtype=object), lengths)
    positions = np.arange(len(items)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    return pd.DataFrame({"user": users, "item": array.astype(str), "timestamp": positions})


# ---- RecLM-gen ----------------------------------------------------------------------------------------------

class RecLMGenSourceConfig(SourceConfig):
    """The folder holds everything; no options yet (kept so unknown keys are errors)."""

    name: str = Field("reclmgen", description="dataset name recorded in dataset.json")


def load_reclmgen(raw: Path, options: RecLMGenSourceConfig) -> Dataset:
    """Items in meta order (titles, categories inverted from category.pickle); users in sequential order."""
    folder = raw if raw.is_dir() else raw.parent
    sequential, seq_path = _read_mapping(folder, "sequential")
    meta, meta_path = _read_mapping(folder, "meta")
    category, cat_path = _read_mapping(folder, "category", required=False)
    candidates, cand_path = _read_mapping(folder, "ranking_candidate", required=False)
    interactions = flatten_sequences(sequential, seq_path)

    item_ids = [str(k) for k in meta]
    titles, texts = [], []
    for key, fields in meta.items():
        if not isinstance(fields, dict) or not isinstance(fields.get("title", ""), str):
            raise DataError(f"item {key!r}: expected {{'title': str, ...}}", path=meta_path, field="title")
        title = fields.get("title", "")
        extras = [f"{k}: {v}" for k, v in fields.items() if k != "title" and isinstance(v, (str, int, float))]
        titles.append(title)
        texts.append(". ".join([title] + extras) if extras else title)
    item_categories: dict[str, list[str]] = {}
    for name, members in (category or {}).items():
        if not isinstance(members, (list, tuple, set)):
            raise DataError(f"category {name!r}: expected a list of item ids", path=cat_path)
        for item in members:
            item_categories.setdefault(str(item), []).append(str(name))
    items = pd.DataFrame({"item": item_ids, "title": titles, "text": texts,
                          "categories": [item_categories.get(i, []) for i in item_ids]})
    files = [p for p in (seq_path, meta_path, cat_path, cand_path) if p is not None]
    dataset = build_dataset(interactions, items=items, name=options.name, source="reclmgen-pickle",
                            raw_files=files, options=options.model_dump())
    dataset.info["ranking_candidates"] = len(candidates) if candidates is not None else 0
    return dataset


def read_ranking_candidates(raw: str | Path) -> dict[str, list[str]]:
    """RecLM-gen `ranking_candidate.pickle|json` as user original id -> candidate item original ids."""
    raw = Path(raw)
    candidates, path = _read_mapping(raw if raw.is_dir() else raw.parent, "ranking_candidate")
    frame = flatten_sequences(candidates, path)
    return {u: g.tolist() for u, g in frame.groupby("user", sort=False)["item"]}


RECLMGEN = Source("reclmgen-pickle", RecLMGenSourceConfig, load_reclmgen,
                  "RecLM-gen raw folder: sequential/meta/category(.pickle|.json), optional ranking_candidate")


# ---- RecGPT -------------------------------------------------------------------------------------------------

class RecGPTSourceConfig(SourceConfig):
    """Which pickle of the folder to read."""

    file: Literal["test", "cold_test"] = Field("test", description="test.pkl (full sequences) or cold_test.pkl "
                                                                   "(2-4 item windows); ignored when --raw is a file")


def load_recgpt(raw: Path, options: RecGPTSourceConfig) -> Dataset:
    """Users in file order; items sorted by their integer id (original ids kept); timestamps = positions."""
    path = raw if raw.is_file() else raw / f"{options.file}.pkl"
    if not path.is_file():
        raise DataError("missing file", path=path)
    sequences = safe_load(path)
    if not isinstance(sequences, dict):
        raise DataError(f"expected a dict user -> list of item ids, got {type(sequences).__name__}", path=path)
    interactions = flatten_sequences(sequences, path)
    unique = pd.unique(interactions["item"])
    numeric = pd.to_numeric(pd.Series(unique), errors="coerce")
    order = np.argsort(numeric.to_numpy(), kind="stable") if not numeric.isna().any() else np.arange(len(unique))
    items = pd.DataFrame({"item": unique[order]})
    return build_dataset(interactions, items=items, name=f"steam-{path.stem}", source="recgpt-pickle",
                         raw_files=[path], options=options.model_dump())


RECGPT = Source("recgpt-pickle", RecGPTSourceConfig, load_recgpt,
                "RecGPT test.pkl / cold_test.pkl (dict user -> item ids), read with the restricted unpickler")
