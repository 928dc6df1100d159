"""Delimited raw files with errors that name the file, line and field; and the `tabular` source for any table.

`tabular` reads an interaction table (CSV, TSV, Parquet or a RecBole atomic `.inter` file) with a column mapping
(`user=`, `item=`, `rating=`, `timestamp=`) and, optionally, an item table (`items=FILE` with `item_title=`,
`item_categories=`, `item_text=`), so a user's own data loads from the command line without code.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
from pydantic import Field, field_validator

from recalign.data.dataset import Dataset, build_dataset
from recalign.data.rawfile import check_raw_file, read_raw_text
from recalign.data.sources import Source, SourceConfig
from recalign.errors import DataError

ID_BOUND = 2 ** 63  # numeric ids must fit a signed 64-bit integer


def read_delimited(path: Path, sep: str, columns: list[str], *, numeric: tuple[str, ...] = (),
                   ids: tuple[str, ...] = (), encoding: str = "utf-8", fallback_encoding: str | None = None,
                   min_columns: int | None = None, header: bool = False) -> pd.DataFrame:
    """Read a delimited file as strings; check the column count, numeric fields and integer ids per line.

    `header=True` skips the first line (RecBole atomic files); `columns` always names the fields.
    `sep` may be several characters (MovieLens-1M's '::'): it is rewritten to a tab first so the fast C parser runs.
    Lines with fewer than `min_columns` (default: all) fields, a non-numeric value in a `numeric` column, or an `ids`
    value that is not an integer in 0..2^63-1 raise DataError naming path:line and the field.
    `fallback_encoding` is tried when the file is not `encoding` (MovieLens-1M: UTF-8 copies of Latin-1 files).
    """
    original_sep = sep
    text = read_raw_text(path, encoding, fallback_encoding)
    if len(sep) > 1:
        if "\t" in text:
            text = text.replace("\t", " ")
        text = text.replace(sep, "\t")
        sep = "\t"
    need = len(columns) if min_columns is None else min_columns
    shown = "tab" if original_sep == "\t" else repr(original_sep)
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, header=None, names=columns, dtype=str,
                            keep_default_na=False, quoting=3, engine="c", skip_blank_lines=True,
                            skiprows=1 if header else None)
    except pd.errors.ParserError as exc:
        match = re.search(r"line (\d+)", str(exc))
        line = int(match.group(1)) + int(header) if match else None
        raise DataError(f"expected {len(columns)} {shown}-separated fields ({', '.join(columns)})",
                        path=path, line=line) from None
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame({c: pd.Series([], dtype=str) for c in columns})

    def line_of(row: int) -> int:
        # only computed on error: a Python pass over the lines costs time on big files
        return int(_line_numbers(text, skip=int(header))[row])
    if need and len(frame):
        short = frame[columns[need - 1]].isna() | (frame[columns[need - 1]] == "")
        if short.any():
            row = int(np.flatnonzero(short.to_numpy())[0])
            raise DataError(f"expected {need} {shown}-separated fields", path=path, line=line_of(row),
                            field=columns[need - 1])
    for name in dict.fromkeys(numeric + ids):
        values = pd.to_numeric(frame[name], errors="coerce")
        bad = values.isna().to_numpy()
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(f"expected a number, got {frame[name].iloc[row]!r}", path=path,
                            line=line_of(row), field=name)
        if name in ids:
            as_float = values.to_numpy(dtype=np.float64)
            bad = (as_float < 0) | (as_float >= ID_BOUND) | (as_float != np.floor(as_float))
            if bad.any():
                row = int(np.flatnonzero(bad)[0])
                raise DataError(f"expected an integer id in 0..2^63-1, got {frame[name].iloc[row]!r}", path=path,
                                line=line_of(row), field=name)
        frame[name] = values
    return frame


def _line_numbers(text: str, skip: int = 0) -> np.ndarray:
    """1-based file line number of each non-blank line after the first `skip` lines (pandas skips blank lines)."""
    lines = text.split("\n")
    return np.asarray([i + 1 for i, line in enumerate(lines) if i >= skip and line.strip() != ""], dtype=np.int64)


# ---- the `tabular` source -----------------------------------------------------------------------------------

_SEPARATORS = {".csv": ",", ".tsv": "\t", ".inter": "\t", ".item": "\t", ".txt": "\t", ".dat": "\t"}


class TabularSourceConfig(SourceConfig):
    """Column mapping of the interaction table and of the optional item table."""

    user: str = Field("user_id", description="user column name (or 0-based column number with header=false)")
    item: str = Field("item_id", description="item column name (or 0-based column number with header=false)")
    rating: str | None = Field(None, description="rating column; default: a column named 'rating' if any, else 1.0")
    timestamp: str | None = Field(None, description="time column (numbers); default: a column named 'timestamp' "
                                                    "if any, else the row order within each user")
    sep: str | None = Field(None, description="field separator; default by extension: .csv ',', else tab; names: "
                                              "tab, comma, space, semicolon, pipe, colons (::), or the characters")
    items_sep: str | None = Field(None, description="separator of the item table; default by its extension")
    header: bool = Field(True, description="the first line names the columns (RecBole 'name:type' headers are "
                                           "matched by name)")
    min_rating: float | None = Field(None, description="keep only rows with rating >= this value")
    items: str | None = Field(None, description="item table file (CSV/TSV/Parquet/RecBole .item), relative to "
                                                "--raw's folder or absolute")
    item_key: str | None = Field(None, description="item id column of the item table; default: the `item` name")
    item_title: str | None = Field(None, description="title column of the item table")
    item_categories: str | None = Field(None, description="categories column of the item table")
    categories_sep: str = Field(",", description="separator between categories in item_categories (names as for sep)")
    item_text: str | None = Field(None, description="text column of the item table; default: the title")
    @field_validator("user", "item", "rating", "timestamp", "item_key", "item_title", "item_categories",
                     "item_text", mode="before")
    @classmethod
    def _column_number_as_name(cls, value):
        """`user=0` on the command line arrives as an int: column names are strings."""
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("sep", "items_sep", "categories_sep", mode="before")
    @classmethod
    def _separator(cls, value):
        """Separator names to characters; YAML turns `|` and a tab into '' and `::` into a mapping."""
        if value == {":": None}:
            return "::"
        if value is None:
            return None
        if not isinstance(value, str) or value == "":
            raise ValueError("write the separator by name: sep=tab, comma, space, semicolon, pipe or colons")
        return _SEP_NAMES.get(value, value)

    encoding: str = Field("utf-8", description="text encoding of the files (e.g. latin-1 for MovieLens' u.item)")
    name: str | None = Field(None, description="dataset name; default: the file name without extension")


_SEP_NAMES = {"tab": "\t", "comma": ",", "space": " ", "semicolon": ";", "pipe": "|", "colons": "::", "\\t": "\t"}


def read_table(path: Path, sep: str | None, header: bool,
               encoding: str = "utf-8") -> tuple[pd.DataFrame, np.ndarray | None]:
    """A raw table as strings (RecBole ':type' suffixes stripped from names) and each row's 1-based file line."""
    check_raw_file(path)
    if path.suffix == ".parquet":
        try:
            frame = pd.read_parquet(path)
        except (OSError, ValueError) as exc:
            raise DataError(f"not a readable Parquet file ({type(exc).__name__})", path=path) from None
        return frame.astype(str).rename(columns=lambda c: str(c).split(":")[0]), None
    sep = sep if sep is not None else _SEPARATORS.get(path.suffix, "\t")
    try:
        text = read_raw_text(path, encoding)
    except LookupError:
        raise DataError(f"unknown encoding {encoding!r}", path=path, field="encoding") from None
    if not text.strip():
        raise DataError("empty file", path=path)
    try:
        frame = pd.read_csv(io.StringIO(text), sep=re.escape(sep) if len(sep) > 1 else sep,
                            header=0 if header else None, dtype=str,
                            keep_default_na=False, engine="c" if len(sep) == 1 else "python",
                            skip_blank_lines=True)
    except pd.errors.ParserError as exc:
        match = re.search(r"line (\d+)", str(exc))
        raise DataError(f"rows have different numbers of {sep!r}-separated fields", path=path,
                        line=int(match.group(1)) if match else None) from None
    frame.columns = [str(c).split(":")[0] for c in frame.columns]
    return frame, _line_numbers(text, skip=int(header))


def _column(frame: pd.DataFrame, name: str, path: Path, option: str) -> pd.Series:
    if name not in frame.columns:
        shown = ", ".join(repr(c) for c in frame.columns[:8])
        raise DataError(f"no column {name!r} (columns: {shown}); set {option}=COLUMN, or sep=/header= if the file "
                        "is split wrongly", path=path, field=option)
    return frame[name]


def _numeric(values: pd.Series, path: Path, lines: np.ndarray | None, field: str) -> pd.Series:
    numbers = pd.to_numeric(values, errors="coerce")
    bad = numbers.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise DataError(f"expected a number, got {values.iloc[row]!r}", path=path,
                        line=int(lines[row]) if lines is not None else None, field=field)
    return numbers


def load_tabular(raw: Path, options: TabularSourceConfig) -> Dataset:
    """Interactions from the mapped columns; items in first-appearance order, then metadata from `items=`."""
    frame, lines = read_table(raw, options.sep, options.header, options.encoding)
    if not options.header:
        frame.columns = [str(c) for c in frame.columns]
    inter = pd.DataFrame({"user": _column(frame, options.user, raw, "user"),
                          "item": _column(frame, options.item, raw, "item")})
    for column in ("user", "item"):
        empty = (inter[column].str.strip() == "").to_numpy()
        if empty.any():
            row = int(np.flatnonzero(empty)[0])
            raise DataError("empty id", path=raw, line=int(lines[row]) if lines is not None else None,
                            field=getattr(options, column))
    for target in ("rating", "timestamp"):
        name = getattr(options, target) or (target if target in frame.columns else None)
        if name is not None:
            inter[target] = _numeric(_column(frame, name, raw, target), raw, lines, name)
    if options.min_rating is not None:
        if "rating" not in inter.columns:
            raise DataError("min_rating needs a rating column (set rating=COLUMN)", path=raw, field="min_rating")
        inter = inter[inter["rating"] >= options.min_rating]
    repeated = inter.duplicated().to_numpy()  # with timestamps, build_dataset finds them; without, rows are equal
    if "timestamp" not in inter.columns and repeated.any():
        inter = inter[~repeated]
    files = [raw]
    items = None
    if options.items is not None:
        item_path = Path(options.items) if Path(options.items).is_absolute() else raw.parent / options.items
        items = _read_item_table(item_path, options)
        files.append(item_path)
    name = options.name or raw.name.split(".")[0]
    dataset = build_dataset(inter, items=items, name=name, source="tabular", raw_files=files,
                            options=options.model_dump())
    if "timestamp" not in inter.columns and repeated.any():
        dataset.warn(f"dropped {int(repeated.sum())} duplicated rows (same user, item and rating)")
    return dataset


def _read_item_table(path: Path, options: TabularSourceConfig) -> pd.DataFrame:
    """item, title, categories, text from the item table's mapped columns."""
    table, _ = read_table(path, options.items_sep, options.header, options.encoding)
    if not options.header:
        table.columns = [str(c) for c in table.columns]
    key = options.item_key or options.item
    items = pd.DataFrame({"item": _column(table, key, path, "item_key")})
    if options.item_title is not None:
        items["title"] = _column(table, options.item_title, path, "item_title").str.strip()
    if options.item_categories is not None:
        raw_cats = _column(table, options.item_categories, path, "item_categories")
        items["categories"] = raw_cats.map(
            lambda s: [c.strip() for c in str(s).split(options.categories_sep) if c.strip()])
    if options.item_text is not None:
        items["text"] = _column(table, options.item_text, path, "item_text")
    elif "title" in items.columns:
        items["text"] = items["title"]
    return items


TABULAR = Source("tabular", TabularSourceConfig, load_tabular,
                 "any interaction table: CSV/TSV/Parquet/RecBole .inter with user=, item=, rating=, timestamp= "
                 "columns, + optional items=FILE (item_title=, item_categories=, item_text=)")
