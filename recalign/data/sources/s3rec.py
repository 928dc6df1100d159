"""S3-Rec sequence files (`Name.txt`: `user item item ...` per line) with optional `Name_item2attributes.json`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.rawfile import read_raw_json, read_raw_text
from recalign.data.sources import Source, SourceConfig
from recalign.errors import ConfigError, DataError


class S3RecSourceConfig(SourceConfig):
    """Which file of a folder to read."""

    name: str | None = Field(None, description="dataset name inside a folder, e.g. Beauty (reads Beauty.txt); "
                                               "not needed when --raw is the .txt file")


def _resolve(raw: Path, options: S3RecSourceConfig) -> Path:
    if raw.is_file():
        return raw
    if options.name is None:
        choices = sorted(p.stem for p in raw.glob("*.txt"))
        raise ConfigError(f"{raw} is a folder: pass name=NAME (one of: {', '.join(choices) or 'none found'})")
    path = raw / f"{options.name}.txt"
    if not path.is_file():
        raise DataError("missing file", path=path)
    return path


def read_sequences(path: Path) -> pd.DataFrame:
    """(user, item, timestamp=position) rows from a `user item item ...` file: one line per user, ids >= 0.

    A user on two lines, tab-separated fields, or a file whose every line holds exactly one item (a two-column
    table, not sequences) are errors naming the line.
    """
    text = read_raw_text(path)
    if "\t" in text:
        line = text.count("\n", 0, text.index("\t")) + 1
        raise DataError("tab-separated fields: sequence files are 'user item item ...' separated by spaces "
                        "(for a table use the tabular source)", path=path, line=line)
    lines = [line for line in text.splitlines() if line.strip()]
    lengths = np.fromiter((len(line.split()) for line in lines), dtype=np.int64, count=len(lines))
    try:  # fast path: every token a non-negative int64, every line a user and at least one item
        tokens = np.array(" ".join(lines).split(), dtype=np.int64)
        ok = bool(len(lines)) and bool((lengths >= 2).all()) and bool((tokens >= 0).all())
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        _locate_bad_line(path, text)
    starts = np.cumsum(lengths) - lengths
    user_ids = tokens[starts]
    seen, first = np.unique(user_ids, return_index=True)
    if len(seen) < len(user_ids):
        repeat = np.ones(len(user_ids), dtype=bool)
        repeat[first] = False
        row = int(np.flatnonzero(repeat)[0])
        earlier = int(np.flatnonzero(user_ids[: row] == user_ids[row])[0])
        raise DataError(f"user {int(user_ids[row])} already has a line (line {_line_of(text, earlier)}); "
                        "sequence files hold one line per user", path=path, line=_line_of(text, row), field="user")
    if len(lines) > 1 and bool((lengths == 2).all()):
        raise DataError("every line holds exactly one item: this looks like a two-column table, not sequences "
                        "(use the tabular source for user,item tables)", path=path, line=1)
    is_user = np.zeros(len(tokens), dtype=bool)
    is_user[starts] = True
    n_items = lengths - 1
    users = np.repeat(user_ids, n_items)
    items = tokens[~is_user]
    positions = np.arange(len(items)) - np.repeat(np.cumsum(n_items) - n_items, n_items)
    return pd.DataFrame({"user": users.astype(str), "item": items.astype(str), "timestamp": positions})


def _line_of(text: str, row: int) -> int:
    """1-based file line of the `row`-th non-blank line (computed only for an error message)."""
    return [i + 1 for i, line in enumerate(text.splitlines()) if line.strip()][row]


def load_s3rec(raw: Path, options: S3RecSourceConfig) -> Dataset:
    """One line per user, items in time order; timestamps are sequence positions."""
    path = _resolve(raw, options)
    interactions = read_sequences(path)
    item_ids = np.unique(interactions["item"].astype(np.int64))
    meta = pd.DataFrame({"item": item_ids.astype(str)})
    files = [path]
    attributes_path = path.with_name(f"{path.stem}_item2attributes.json")
    if attributes_path.is_file():
        attributes = read_raw_json(attributes_path)
        if not isinstance(attributes, dict):
            raise DataError("expected an object item -> attributes", path=attributes_path)
        meta["categories"] = [[str(a) for a in attributes.get(i, [])] for i in meta["item"]]
        files.append(attributes_path)
    return build_dataset(interactions, items=meta, name=path.stem, source="s3rec", raw_files=files,
                         options=options.model_dump())


def _locate_bad_line(path: Path, text: str) -> None:
    """Slow scan run only after the fast parse failed: raise a DataError naming the first bad line and field."""
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 2:
            raise DataError("expected 'user item [item ...]'", path=path, line=number, field="item")
        bad = next((f for f in fields if not f.isdigit()), None)
        if bad is not None:
            raise DataError(f"expected integer ids >= 0, got {bad!r}", path=path, line=number,
                            field="user" if bad == fields[0] else "item")
        big = next((f for f in fields if int(f) >= 2 ** 63), None)
        if big is not None:
            raise DataError(f"id {big} does not fit 64 bits", path=path, line=number,
                            field="user" if big == fields[0] else "item")
    raise DataError("no sequences (expected lines 'user item [item ...]')", path=path)


S3REC = Source("s3rec", S3RecSourceConfig, load_s3rec,
               "S3-Rec sequences: Name.txt (user item item ...) + optional Name_item2attributes.json")
