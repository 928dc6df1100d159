"""S3-Rec sequence files (`Name.txt`: `user item item ...` per line) with optional `Name_item2attributes.json`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.sources import Source, SourceOptions
from recalign.errors import ConfigError, DataError


class S3RecOptions(SourceOptions):
    """Which file of a folder to read."""

    name: str | None = Field(None, description="dataset name inside a folder, e.g. Beauty (reads Beauty.txt); "
                                               "not needed when --raw is the .txt file")


def _resolve(raw: Path, options: S3RecOptions) -> Path:
    if raw.is_file():
        return raw
    if options.name is None:
        choices = sorted(p.stem for p in raw.glob("*.txt"))
        raise ConfigError(f"{raw} is a folder: pass name=NAME (one of: {', '.join(choices) or 'none found'})")
    path = raw / f"{options.name}.txt"
    if not path.is_file():
        raise DataError("missing file", path=path)
    return path


def load_s3rec(raw: Path, options: S3RecOptions) -> Dataset:
    """One line per user, items in time order; timestamps are sequence positions."""
    path = _resolve(raw, options)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    lengths = np.fromiter((len(line.split()) for line in lines), dtype=np.int64, count=len(lines))
    try:  # fast path: every token an integer, every line a user and at least one item
        tokens = np.array(" ".join(lines).split(), dtype=np.int64)
        ok = bool(len(lines)) and bool((lengths >= 2).all())
    except (ValueError, OverflowError):
        ok = False
    if not ok:
        _locate_bad_line(path)
    starts = np.cumsum(lengths) - lengths
    is_user = np.zeros(len(tokens), dtype=bool)
    is_user[starts] = True
    n_items = lengths - 1
    users = np.repeat(tokens[starts], n_items)
    items = tokens[~is_user]
    positions = np.arange(len(items)) - np.repeat(np.cumsum(n_items) - n_items, n_items)
    interactions = pd.DataFrame({"user": users.astype(str), "item": items.astype(str), "timestamp": positions})
    item_ids = np.unique(items)
    meta = pd.DataFrame({"item": item_ids.astype(str)})
    files = [path]
    attributes_path = path.with_name(f"{path.stem}_item2attributes.json")
    if attributes_path.is_file():
        try:
            attributes = json.loads(attributes_path.read_text())
        except json.JSONDecodeError as exc:
            raise DataError(f"invalid JSON: {exc.msg}", path=attributes_path, line=exc.lineno) from None
        meta["categories"] = [[str(a) for a in attributes.get(i, [])] for i in meta["item"]]
        files.append(attributes_path)
    return build_dataset(interactions, items=meta, name=path.stem, source="s3rec", raw_files=files,
                         options=options.model_dump())


def _locate_bad_line(path: Path) -> None:
    """Slow scan run only after the fast parse failed: raise a DataError naming the first bad line and field."""
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise DataError("expected 'user item [item ...]'", path=path, line=number, field="item")
            bad = next((f for f in fields if not f.isdigit()), None)
            if bad is not None:
                raise DataError(f"expected integer ids, got {bad!r}", path=path, line=number,
                                field="user" if bad == fields[0] else "item")
    raise DataError("no sequences (expected lines 'user item [item ...]')", path=path)


S3REC = Source("s3rec", S3RecOptions, load_s3rec,
               "S3-Rec sequences: Name.txt (user item item ...) + optional Name_item2attributes.json")
