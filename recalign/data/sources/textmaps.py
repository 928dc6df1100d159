"""Sequence datasets that come with item text: P5/TransRec text maps, LC-Rec JSON, RecBole `.item` + `.inter`.

- `p5-text`: `sequential_data.txt` (`user item item ...`, item ids 0-based) + `title_maps.npy` ({"id2title"}) +
  `category_map.npy` ({"id2category": id -> list of category paths}); the `.npy` files are pickles, read with the
  restricted loader that allows only NumPy's array reconstruction (never `np.load(allow_pickle=True)`).
- `lcrec`: `NAME.item.json` ({id: {title, description, brand, categories: "a, b, c"}}) + `NAME.inter.json`
  ({user: [item, ...]} in interaction order).
- `recbole`: a RecBole `.inter` file whose rows are (user_id, item_id_list, item_id), i.e. a user's whole history
  and its target (LLMRank's `NAME.test.inter`), + an optional `.item` file (item_id, title[, categories]).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.rawfile import read_raw_json
from recalign.data.safe_pickle import load_npy_object
from recalign.data.sources import Source, SourceConfig
from recalign.data.sources.amazon import categories_from_paths
from recalign.data.sources.s3rec import read_sequences
from recalign.data.sources.seedformat import flatten_sequences
from recalign.data.sources.tabular import read_table
from recalign.errors import ConfigError, DataError


def _sorted_ids(keys) -> list[str]:
    """Item ids as strings, numeric ids in numeric order."""
    keys = [str(k) for k in keys]
    return sorted(keys, key=lambda k: (0, int(k), "") if k.isdigit() else (1, 0, k))


def _text(*parts: str) -> str:
    return ". ".join(p for p in parts if p) + "." if any(parts) else ""


def _map(value, key: str, path: Path) -> dict:
    if not isinstance(value, dict) or not isinstance(value.get(key), dict):
        raise DataError(f"expected {{'{key}': {{item id: ...}}}}", path=path, field=key)
    return value[key]


# ---- P5 / TransRec text maps ----------------------------------------------------------------------------------

class P5TextSourceConfig(SourceConfig):
    """The folder holds everything (sequential_data.txt, title_maps.npy, category_map.npy)."""

    name: str | None = Field(None, description="dataset name recorded in dataset.json; default: the folder name")


def load_p5_text(raw: Path, options: P5TextSourceConfig) -> Dataset:
    """Catalog in item-id order with titles and category-path categories; one user per sequence line."""
    folder = raw if raw.is_dir() else raw.parent
    seq_path = raw if raw.is_file() else folder / "sequential_data.txt"
    if not seq_path.is_file():
        raise DataError("missing file sequential_data.txt", path=folder)
    interactions = read_sequences(seq_path)
    files = [seq_path]
    title_path, category_path = folder / "title_maps.npy", folder / "category_map.npy"
    titles, categories = {}, {}
    if title_path.is_file():
        titles = _map(load_npy_object(title_path), "id2title", title_path)
        files.append(title_path)
    if category_path.is_file():
        categories = _map(load_npy_object(category_path), "id2category", category_path)
        files.append(category_path)
    ids = _sorted_ids(set(titles) | set(categories) | set(pd.unique(interactions["item"])))
    items = pd.DataFrame({"item": ids, "title": [str(titles.get(i, "")).strip() for i in ids],
                          "categories": [categories_from_paths(categories.get(i, [])) for i in ids]})
    items["text"] = [_text(t, ", ".join(c)) for t, c in zip(items["title"], items["categories"])]
    dataset = build_dataset(interactions, items=items, name=options.name or folder.name, source="p5-text",
                            raw_files=files, options=options.model_dump())
    for path in (title_path, category_path):
        if not path.is_file():
            dataset.warn(f"{path.name} not found: items have no {'titles' if path == title_path else 'categories'}")
    return dataset


P5_TEXT = Source("p5-text", P5TextSourceConfig, load_p5_text,
                 "P5/TransRec folder: sequential_data.txt + title_maps.npy + category_map.npy (restricted unpickler)")


# ---- LC-Rec JSON ---------------------------------------------------------------------------------------------

class LCRecSourceConfig(SourceConfig):
    """Which dataset of a folder to read."""

    name: str | None = Field(None, description="dataset name, e.g. Office (reads Office.item.json and "
                                               "Office.inter.json); found automatically when the folder has one")


def load_lcrec(raw: Path, options: LCRecSourceConfig) -> Dataset:
    """Items in id order (title, brand, description; categories split on commas); users in file order."""
    folder = raw if raw.is_dir() else raw.parent
    name = options.name
    if name is None and raw.is_file():
        name = raw.name.split(".")[0]
    if name is None:
        names = sorted(p.name[: -len(".inter.json")] for p in folder.glob("*.inter.json"))
        if len(names) != 1:
            raise ConfigError(f"{folder}: pass name=NAME (found {len(names)} NAME.inter.json files: "
                              f"{', '.join(names) or 'none'})")
        name = names[0]
    inter_path, item_path = folder / f"{name}.inter.json", folder / f"{name}.item.json"
    sequences = read_raw_json(inter_path)
    if not isinstance(sequences, dict):
        raise DataError("expected an object user -> list of item ids", path=inter_path)
    interactions = flatten_sequences(sequences, inter_path)
    meta = read_raw_json(item_path)
    if not isinstance(meta, dict):
        raise DataError("expected an object item id -> {title, description, brand, categories}", path=item_path)
    ids = _sorted_ids(meta)
    rows = []
    for key in ids:
        fields = meta[key] if key in meta else meta.get(int(key)) if key.isdigit() else None
        if not isinstance(fields, dict):
            raise DataError(f"item {key}: expected an object", path=item_path)
        values = {f: fields.get(f) or "" for f in ("title", "description", "brand", "categories")}
        bad = next((f for f, v in values.items() if not isinstance(v, str)), None)
        if bad is not None:
            raise DataError(f"item {key}: expected a string", path=item_path, field=bad)
        cats = [c.strip() for c in values["categories"].split(",") if c.strip()]
        rows.append((key, values["title"].strip(), cats,
                     _text(values["title"].strip(), values["brand"].strip(), values["description"].strip())))
    items = pd.DataFrame(rows, columns=["item", "title", "categories", "text"])
    return build_dataset(interactions, items=items, name=name, source="lcrec", raw_files=[inter_path, item_path],
                         options=options.model_dump())


LCREC = Source("lcrec", LCRecSourceConfig, load_lcrec, "LC-Rec JSON: NAME.item.json (title, description, brand, "
                                                   "categories) + NAME.inter.json (user -> items)")


# ---- RecBole history/target .inter + .item ---------------------------------------------------------------------

class RecBoleSourceConfig(SourceConfig):
    """Which files of a folder to read."""

    name: str | None = Field(None, description="dataset name, e.g. Games-6k; found when the folder has one "
                                               "NAME.<split>.inter")
    split: str = Field("test", description="the .inter file whose rows hold each user's whole history + target")
    items: str | None = Field(None, description="item file inside the folder; default: NAME.item, else the "
                                                "folder's only *.item file")


def _resolve_recbole(raw: Path, options: RecBoleSourceConfig) -> tuple[Path, Path | None]:
    folder = raw if raw.is_dir() else raw.parent
    if raw.is_file():
        inter = raw
    else:
        names = sorted({p.name[: -len(f".{options.split}.inter")]
                        for p in folder.glob(f"*.{options.split}.inter")}) if options.name is None else [options.name]
        if len(names) != 1:
            raise ConfigError(f"{folder}: pass name=NAME (found {len(names)} NAME.{options.split}.inter files: "
                              f"{', '.join(names) or 'none'})")
        inter = folder / f"{names[0]}.{options.split}.inter"
    if options.items is not None:
        item = folder / options.items
        if not item.is_file():
            raise DataError("missing item file", path=item)
        return inter, item
    stem = inter.name.split(".")[0]
    if (folder / f"{stem}.item").is_file():
        return inter, folder / f"{stem}.item"
    found = sorted(folder.glob("*.item"))
    return inter, (found[0] if len(found) == 1 else None)


def load_recbole(raw: Path, options: RecBoleSourceConfig) -> Dataset:
    """One user per row: the history list then the target, positions as timestamps; catalog from the .item file."""
    inter_path, item_path = _resolve_recbole(raw, options)
    table, lines = read_table(inter_path, "\t", True)
    for column in ("user_id", "item_id_list", "item_id"):
        if column not in table.columns:
            raise DataError(f"no column '{column}' in the header (expected user_id:token, "
                            "item_id_list:token_seq, item_id:token)", path=inter_path, field=column)
    repeated = table["user_id"].duplicated().to_numpy()
    if repeated.any():
        row = int(np.flatnonzero(repeated)[0])
        raise DataError(f"user {table['user_id'].iloc[row]} has a second row; expected one row per user",
                        path=inter_path, line=int(lines[row]), field="user_id")
    empty = (table["item_id"].str.strip() == "").to_numpy() | (table["user_id"].str.strip() == "").to_numpy()
    if empty.any():
        row = int(np.flatnonzero(empty)[0])
        raise DataError("empty user_id or item_id", path=inter_path, line=int(lines[row]))
    sequences = (table["item_id_list"].str.split() + table["item_id"].str.strip().map(lambda t: [t]))
    flat = pd.DataFrame({"user": table["user_id"], "item": sequences}).explode("item", ignore_index=True)
    flat["timestamp"] = flat.groupby("user", sort=False).cumcount()
    files = [inter_path]
    items = None
    if item_path is not None:
        item_table, _ = read_table(item_path, "\t", True)
        if "item_id" not in item_table.columns:
            raise DataError("no column 'item_id' in the header", path=item_path, field="item_id")
        items = pd.DataFrame({"item": item_table["item_id"]})
        items["title"] = item_table["title"].str.strip() if "title" in item_table.columns else ""
        if "categories" in item_table.columns:
            items["categories"] = item_table["categories"].map(lambda s: [c for c in str(s).split() if c])
        items["text"] = items["title"]
        files.append(item_path)
    name = inter_path.name.split(".")[0]
    return build_dataset(flat, items=items, name=name, source="recbole", raw_files=files,
                         options=options.model_dump())


RECBOLE = Source("recbole", RecBoleSourceConfig, load_recbole,
                 "RecBole atomic files: NAME.test.inter rows (user_id, item_id_list, item_id) = whole history + "
                 "target, + optional .item (item_id, title)")
